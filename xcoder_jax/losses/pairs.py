"""Sparse (row, latent) pairs: what every loss's sparse path computes with, in one place.

A sparse path never multiplies the batch by every latent. After the encoder's forward GEMM
(no gradient) has given the pre-activations, it works on K chosen pairs (r_j, c_j):

    values      f_j = ReLU(pre[r_j, c_j]); its gradient goes to W_enc[:, c_j] and b_enc[c_j]
                as scatter-adds of x[r_j] (`gathered_pre`, `pairs_values`), never through a
                dense GEMM
    decode      sum_{j: r_j = r} f_j W_dec[c_j]   (gather + segment sum, `decode_pairs`;
                its gradient gathers again, `sparse_decode`)

`select_pairs` is the batch top-k selection of BatchTopK and Matryoshka (the same set, ties
included, as `batchtopk.batch_topk`), with AuxK's pairs over each row's largest dead
pre-activations (`aux_selection`) as a tail the custom ops compute only when some latent
is dead; `decode_selection` and `auxk_loss` finish their sparse paths. `auxk_pairs` is the
AuxK term on its own (the dense Matryoshka path's). Both losses call these, so their sparse
paths cannot drift apart.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.losses.common import squared_error
from xcoder_jax.losses.flat_topk import flat_top_k

# The two custom ops below take K pairs in two parts: the first `split` always, the rest
# (AuxK's) only where `tail_on` is True, inside a `lax.cond` in their forward and backward
# passes. Their gradients with respect to the weights are one dense buffer each, which the
# tail's scatter-adds update in place: no weight-sized zeros, copies or sums when the tail
# is off (a conditional differentiated from outside costs all three at every step).


def _scatter_tail(body, split: int, total: int, tail_on, init):
    """body(lo, hi, acc) over the pairs [0, split), then over [split, total) inside a
    conditional on `tail_on` (acc passed through untouched when it is off)."""
    acc = body(0, split, init)
    if split == total:
        return acc
    return jax.lax.cond(tail_on, lambda a: body(split, total, a), lambda a: a, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _pre_at(x2, w2, b, rows, cols, pre, tail_on, h, split):
    del x2, w2, b, tail_on, h, split
    return pre[rows, cols]


def _pre_at_fwd(x2, w2, b, rows, cols, pre, tail_on, h, split):
    return pre[rows, cols], (x2, rows, cols, tail_on)


def _pre_at_bwd(h, split, res, g):
    x2, rows, cols, tail_on = res  # the weights are float32 masters (`Crosscoder` param_dtype)
    g = g.astype(jnp.float32)

    def scatter(lo, hi):  # each pair adds g_j x[r_j] to its latent's encoder column
        r, c, gj = rows[lo:hi], cols[lo:hi], g[lo:hi]
        gw_t = (
            jnp.zeros((h, x2.shape[1]), jnp.float32)
            .at[c]
            .add(x2[r].astype(jnp.float32) * gj[:, None])
        )
        return gw_t.T, jnp.zeros((h,), jnp.float32).at[c].add(gj)

    # Transposed as soon as scattered: XLA's fast transpose takes a scatter's output, not a
    # conditional's. The tail's own buffer is built only when it is on.
    gw, gb = scatter(0, split)
    if split < rows.shape[0]:

        def add_tail(acc):
            tail = scatter(split, rows.shape[0])
            return acc[0] + tail[0], acc[1] + tail[1]

        gw, gb = jax.lax.cond(tail_on, add_tail, lambda acc: acc, (gw, gb))
    return None, gw, gb, None, None, None, None


_pre_at.defvjp(_pre_at_fwd, _pre_at_bwd)


def gathered_pre(x2, w2, b, rows, cols, h, pre, tail_on=False, split=None):
    """pre[rows, cols] (float32 [K]) with the gradient of x2 @ w2 + b at those entries.

    x2 [B, m*d] and w2 [m*d, h] are the GEMM's operands, `pre` [B, h] its (already
    computed) value; only W and b get gradients, as scatter-adds over the K pairs (over the
    pairs past `split` only where `tail_on`)."""
    split = rows.shape[0] if split is None else split
    return _pre_at(x2, w2, b, rows, cols, pre, jnp.asarray(tail_on), h, split)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _decode(f, rows, cols, w2, tail_on, n_out, split):
    def body(lo, hi, y):
        return y.at[rows[lo:hi]].add(f[lo:hi, None] * w2[cols[lo:hi]].astype(jnp.float32))

    init = jnp.zeros((n_out, w2.shape[1]), jnp.float32)
    return _scatter_tail(body, split, rows.shape[0], tail_on, init)


def _decode_fwd(f, rows, cols, w2, tail_on, n_out, split):
    # The backward gathers again rather than keeping the forward's [K, N] gathered rows.
    return _decode(f, rows, cols, w2, tail_on, n_out, split), (f, rows, cols, w2, tail_on)


def _decode_bwd(n_out, split, res, g):
    f, rows, cols, w2, tail_on = res
    g = g.astype(jnp.float32)

    def body(lo, hi, acc):
        df, dw = acc
        g_rows = g[rows[lo:hi]]  # [hi - lo, N]
        dots = (g_rows * w2[cols[lo:hi]].astype(jnp.float32)).sum(-1)
        return df.at[lo:hi].set(dots), dw.at[cols[lo:hi]].add(f[lo:hi, None] * g_rows)

    init = (jnp.zeros(f.shape, jnp.float32), jnp.zeros(w2.shape, jnp.float32))
    df, dw = _scatter_tail(body, split, rows.shape[0], tail_on, init)
    return df.astype(f.dtype), None, None, dw.astype(w2.dtype), None


_decode.defvjp(_decode_fwd, _decode_bwd)


def sparse_decode(f, rows, cols, w2, n_out, tail_on=False, split=None):
    """sum_{j: r_j = r} f_j w2[c_j] for r < n_out: float32 [n_out, N]; f [K], rows (output
    rows) and cols int32 [K], w2 [h, N]; the pairs past `split` count only where
    `tail_on`."""
    split = rows.shape[0] if split is None else split
    return _decode(f, rows, cols, w2, jnp.asarray(tail_on), n_out, split)


def decode_pairs(model: Crosscoder, f, rows, cols, n_rows: int, tail_on=False, split=None):
    """sum_{j: r_j = r} f_j W_dec[c_j] for r < n_rows: [n_rows, m, d], without b_dec."""
    w = model.dec_weight()  # masked before the gather: the gradient is masked too
    h, m, d = w.shape
    out = sparse_decode(f, rows, cols, w.reshape(h, m * d), n_rows, tail_on, split)
    return out.reshape(n_rows, m, d)


def pairs_values(model: Crosscoder, x, pre, rows, cols, tail_on=False, split=None):
    """ReLU(pre[rows, cols]) with the encoder's sparse gradient: [K] float32."""
    w = model.enc_weight()
    m, d, h = w.shape
    x2 = x.reshape(-1, m * d)
    w2 = w.reshape(m * d, h)
    return jax.nn.relu(gathered_pre(x2, w2, model.b_enc[...], rows, cols, h, pre, tail_on, split))


class AuxSelection(NamedTuple):
    """AuxK's pairs: each row's aux_k largest dead (ReLU) pre-activations, B * aux_k slots
    (rows, cols int32, valid bool: a dead latent's slot); `on` [] bool: some latent is
    dead. With none dead the slots are invalid and nothing of AuxK is computed."""

    rows: jax.Array
    cols: jax.Array
    valid: jax.Array
    on: jax.Array


def aux_selection(pre, dead, aux_k: int) -> AuxSelection:
    """AuxK's pairs from `pre` [B, h] (without gradient) and `dead` [h] bool."""
    n, h = pre.shape
    n_aux = min(aux_k, h)
    on = dead.any()

    def pick(_):
        vals, cols = jax.lax.top_k(jnp.where(dead[None, :], jax.nn.relu(pre), -jnp.inf), n_aux)
        return cols.reshape(-1).astype(jnp.int32), jnp.isfinite(vals.reshape(-1))

    def none(_):
        return jnp.zeros(n * n_aux, jnp.int32), jnp.zeros(n * n_aux, bool)

    cols, valid = jax.lax.cond(on, pick, none, None)
    return AuxSelection(jnp.repeat(jnp.arange(n, dtype=jnp.int32), n_aux), cols, valid, on)


class Selection(NamedTuple):
    """The kept pairs of one batch (K = k_max * batch slots, or k * batch).

    pre [B, h] float32 pre-activations with b_enc, without gradient; rows, cols [K] the
    slots' pairs, by descending weighted activation; f [K] their values with the sparse
    gradient, 0 in slots not kept; f_dense [B, h] the same values as a matrix, without
    gradient (for the metrics); kept [K] the weighted activations kept, +inf elsewhere (their
    minimum is the batch's cut). With AuxK: `aux` its pairs and `aux_f` their values with
    the sparse gradient (0 in invalid slots); None otherwise."""

    pre: jax.Array
    rows: jax.Array
    cols: jax.Array
    f: jax.Array
    f_dense: jax.Array
    kept: jax.Array
    aux: AuxSelection | None = None
    aux_f: jax.Array | None = None


def select_pairs(model: Crosscoder, x, weights, k, k_max=None, dead=None, aux_k=0) -> Selection:
    """The batch top-k selection over pairs: the k * n_valid largest positive decoder-norm-
    weighted activations of the batch (`flat_top_k`, `lax.top_k` over the flat batch; masked
    rows weighted by 0 so they claim no slot). While annealing, k is traced and `k_max`
    (static) the selection's size. With `dead` [h] bool, also AuxK's pairs (`aux_selection`),
    whose values and gradients go through the same custom ops as the kept pairs' (as their
    tail, computed only when some latent is dead)."""
    n, h = x.shape[0], model.W_enc.shape[-1]
    pre = jax.lax.stop_gradient(model.pre_acts(x))  # [B, h] float32, with b_enc
    norms = jax.lax.stop_gradient(model.decoder_norms().sum(-1))
    weighted = jax.nn.relu(pre) * norms * weights[:, None]  # masked rows claim no slot
    n_max = min((k if k_max is None else k_max) * n, n * h)
    vals, flat = flat_top_k(weighted, n_max)
    keep = (jnp.arange(n_max) < k * weights.sum()) & (vals > 0)
    rows, cols = flat // h, flat % h
    aux = aux_f = None
    if dead is None:
        f = pairs_values(model, x, pre, rows, cols)
    else:
        aux = aux_selection(pre, dead, aux_k)
        both = pairs_values(
            model, x, pre, _cat(rows, aux.rows), _cat(cols, aux.cols), aux.on, n_max
        )
        f, aux_f = both[:n_max], jnp.where(aux.valid, both[n_max:], 0.0)
    f = f * keep
    f_dense = jnp.zeros(n * h, jnp.float32).at[flat].set(jax.lax.stop_gradient(f))
    kept = jnp.where(keep, vals, jnp.inf)
    return Selection(pre, rows, cols, f, f_dense.reshape(n, h), kept, aux, aux_f)


def _cat(a, b):
    return jnp.concatenate([a.astype(jnp.int32), b.astype(jnp.int32)])


def decode_selection(model: Crosscoder, sel: Selection, out_rows, n_out: int):
    """The kept pairs decoded into `out_rows` [K] (< n_out): [n_out, m, d] without b_dec;
    and with AuxK's pairs in `sel`, theirs into the batch's rows: [B, m, d] (0 when no
    latent is dead), else None."""
    if sel.aux is None:
        return decode_pairs(model, sel.f, out_rows, sel.cols, n_out), None
    n, k = sel.pre.shape[0], sel.f.shape[0]
    rows = _cat(out_rows, sel.aux.rows + n_out)
    f = jnp.concatenate([sel.f, sel.aux_f])
    out = decode_pairs(model, f, rows, _cat(sel.cols, sel.aux.cols), n_out + n, sel.aux.on, k)
    return out[:n_out], out[n_out:]


def auxk_loss(sel: Selection, aux_hat, residual, weights):
    """The AuxK term [] from `decode_selection`'s aux_hat: its squared error to the stopped
    `residual`, 0 when no latent is dead."""
    return jnp.where(sel.aux.on, squared_error(residual, aux_hat, weights), 0.0)


def auxk_pairs(model: Crosscoder, x, pre, dead, residual, weights, aux_k: int):
    """The AuxK term []: each row's aux_k largest dead (ReLU) pre-activations
    (`aux_selection`) decode, without b_dec, the stopped `residual`; zero, and not computed,
    when no latent is dead: the pairs are the custom ops' tail from the first one. `pre`
    [B, h] float32 without gradient; the values' gradient is the sparse one."""
    aux = aux_selection(pre, dead, aux_k)
    a_f = pairs_values(model, x, pre, aux.rows, aux.cols, aux.on, 0)
    a_f = jnp.where(aux.valid, a_f, 0.0)
    aux_hat = decode_pairs(model, a_f, aux.rows, aux.cols, pre.shape[0], aux.on, 0)
    return jnp.where(aux.on, squared_error(residual, aux_hat, weights), 0.0)
