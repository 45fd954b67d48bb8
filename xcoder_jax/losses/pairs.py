"""Sparse (row, latent) pairs: what every loss's sparse path computes with, in one place.

A sparse path never multiplies the batch by every latent. After the encoder's forward GEMM
(no gradient) has given the pre-activations, it works on K chosen pairs (r_j, c_j):

    values      f_j = ReLU(pre[r_j, c_j]); its gradient goes to W_enc[:, c_j] and b_enc[c_j]
                as scatter-adds of x[r_j] (`gathered_pre`, `pairs_values`), never through a
                dense GEMM
    decode      sum_{j: r_j = r} f_j W_dec[c_j]   (gather + segment sum, `decode_pairs`;
                its gradient gathers again, `sparse_decode`)

`select_pairs` is the batch top-k selection of BatchTopK and Matryoshka (the same set, ties
included, as `batchtopk.batch_topk`), and `auxk_pairs` their AuxK term over each row's
largest dead pre-activations. Both losses call these, so their sparse paths cannot drift
apart.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.losses.common import squared_error
from xcoder_jax.losses.flat_topk import flat_top_k


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gathered_pre(x2, w2, b, rows, cols, h, pre):
    """pre[rows, cols] (float32 [K]) with the gradient of x2 @ w2 + b at those entries.

    x2 [B, m*d] and w2 [m*d, h] are the GEMM's operands, `pre` [B, h] its (already
    computed) value; only W and b get gradients, as scatter-adds over the K pairs."""
    del x2, w2, b, h
    return pre[rows, cols]


def _gathered_pre_fwd(x2, w2, b, rows, cols, h, pre):
    return pre[rows, cols], (x2, rows, cols)


def _gathered_pre_bwd(h, res, g):
    x2, rows, cols = res  # the weights are float32 masters (`Crosscoder` param_dtype)
    g = g.astype(jnp.float32)
    # [h, m*d]: each kept pair adds g_j x[r_j] to its latent's encoder column.
    gw_t = jax.ops.segment_sum(x2[rows].astype(jnp.float32) * g[:, None], cols, num_segments=h)
    gb = jax.ops.segment_sum(g, cols, num_segments=h)
    return None, gw_t.T, gb, None, None, None


gathered_pre.defvjp(_gathered_pre_fwd, _gathered_pre_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sparse_decode(f, rows, cols, w2, n_rows):
    """sum_{j: r_j = r} f_j w2[c_j] for r < n_rows: float32 [n_rows, N]; f [K], rows and
    cols int32 [K], w2 [h, N].

    Its backward gathers what it needs again rather than keeping the forward's [K, N]
    gathered rows: nothing of that size outlives the forward, and a conditional around it
    (AuxK's) passes only [K] vectors across."""
    contrib = f[:, None] * w2[cols].astype(jnp.float32)
    return jax.ops.segment_sum(contrib, rows, num_segments=n_rows)


def _sparse_decode_fwd(f, rows, cols, w2, n_rows):
    return sparse_decode(f, rows, cols, w2, n_rows), (f, rows, cols, w2)


def _sparse_decode_bwd(n_rows, res, g):
    f, rows, cols, w2 = res
    g_rows = g.astype(jnp.float32)[rows]  # [K, N]
    df = (g_rows * w2[cols].astype(jnp.float32)).sum(-1).astype(f.dtype)
    dw = jax.ops.segment_sum(f[:, None] * g_rows, cols, num_segments=w2.shape[0])
    return df, None, None, dw.astype(w2.dtype)


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def decode_pairs(model: Crosscoder, f, rows, cols, n_rows: int):
    """sum_{j: r_j = r} f_j W_dec[c_j] for r < n_rows: [n_rows, m, d], without b_dec."""
    w = model.dec_weight()  # masked before the gather: the gradient is masked too
    h, m, d = w.shape
    return sparse_decode(f, rows, cols, w.reshape(h, m * d), n_rows).reshape(n_rows, m, d)


def pairs_values(model: Crosscoder, x, pre, rows, cols):
    """ReLU(pre[rows, cols]) with the encoder's sparse gradient: [K] float32."""
    w = model.enc_weight()
    m, d, h = w.shape
    x2 = x.reshape(-1, m * d)
    return jax.nn.relu(gathered_pre(x2, w.reshape(m * d, h), model.b_enc[...], rows, cols, h, pre))


class Selection(NamedTuple):
    """The kept pairs of one batch (K = k_max * batch slots, or k * batch).

    pre [B, h] float32 pre-activations with b_enc, without gradient; rows, cols [K] the
    slots' pairs, by descending weighted activation; f [K] their values with the sparse
    gradient, 0 in slots not kept; f_dense [B, h] the same values as a matrix, without
    gradient (for the metrics); kept [K] the weighted activations kept, +inf elsewhere (their
    minimum is the batch's cut)."""

    pre: jax.Array
    rows: jax.Array
    cols: jax.Array
    f: jax.Array
    f_dense: jax.Array
    kept: jax.Array


def select_pairs(model: Crosscoder, x, weights, k, k_max=None) -> Selection:
    """The batch top-k selection over pairs: the k * n_valid largest positive decoder-norm-
    weighted activations of the batch (`lax.top_k` over the flat batch, masked rows weighted
    by 0 so they claim no slot). While annealing, k is traced and `k_max` (static) the
    selection's size."""
    n, h = x.shape[0], model.W_enc.shape[-1]
    pre = jax.lax.stop_gradient(model.pre_acts(x))  # [B, h] float32, with b_enc
    norms = jax.lax.stop_gradient(model.decoder_norms().sum(-1))
    weighted = jax.nn.relu(pre) * norms * weights[:, None]  # masked rows claim no slot
    n_max = min((k if k_max is None else k_max) * n, n * h)
    vals, flat = flat_top_k(weighted, n_max)
    keep = (jnp.arange(n_max) < k * weights.sum()) & (vals > 0)
    rows, cols = flat // h, flat % h
    f = pairs_values(model, x, pre, rows, cols) * keep
    f_dense = jnp.zeros(n * h, jnp.float32).at[flat].set(jax.lax.stop_gradient(f))
    kept = jnp.where(keep, vals, jnp.inf)
    return Selection(pre, rows, cols, f, f_dense.reshape(n, h), kept)


def auxk_pairs(model: Crosscoder, x, pre, dead, residual, weights, aux_k: int):
    """The AuxK term []: each row's aux_k largest dead (ReLU) pre-activations decode, without
    b_dec, the stopped `residual`; zero, and not computed (`lax.cond`), when no latent is
    dead. `pre` [B, h] float32 without gradient; the values' gradient is the sparse one."""
    n, h = pre.shape
    n_aux = min(aux_k, h)

    def auxk(_):
        dead_pre = jnp.where(dead[None, :], jax.nn.relu(pre), -jnp.inf)
        a_vals, a_cols = jax.lax.top_k(dead_pre, n_aux)  # [B, n_aux]
        a_rows = jnp.repeat(jnp.arange(n), n_aux)
        a_cols = a_cols.reshape(-1)
        a_f = pairs_values(model, x, pre, a_rows, a_cols)
        a_f = jnp.where(jnp.isfinite(a_vals.reshape(-1)), a_f, 0.0)
        return squared_error(residual, decode_pairs(model, a_f, a_rows, a_cols, n), weights)

    return jax.lax.cond(dead.any(), auxk, lambda _: jnp.zeros((), jnp.float32), None)
