"""BatchTopK computed over the active (row, latent) pairs only: the sparse path.

The dense path (`crosscoder.batchtopk_loss`) multiplies every row by every latent in the
decoder and in three of the four backward GEMMs, although a row keeps only k of n_latents
latents on average. Here only the encoder's forward GEMM sees all latents (to choose them);
everything else touches the K = k * batch kept pairs:

    choose      pre = ReLU(x W_enc + b_enc) [B, h] (no gradient); the kept pairs are the
                K largest decoder-norm-weighted entries (`lax.top_k` over the flat batch:
                the same set, ties included, as the dense path)
    values      f_j = pre[r_j, c_j]; its gradient goes to W_enc[:, c_j] and b_enc[c_j] as
                scatter-adds of x[r_j] (`_gathered_pre`), never through a dense GEMM
    decode      x_hat[r] = b_dec + sum_{j: r_j = r} f_j W_dec[c_j]   (gather + segment sum)

AuxK decodes each row's aux_k largest dead pre-activations the same way, inside a
`lax.cond` that skips it (and its cost) in every step where no latent is dead.

Same loss, gradients and updates as the dense path to float tolerance
(`tests/test_sparse_topk.py`); which one runs is chosen by `use_sparse`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder, squared_error

# CPU measurements (bench/train_step.py): the gathers and scatter-adds of the sparse path
# beat the dense GEMMs once a row keeps fewer than about 1/200 of the latents.
SPARSE_MIN_RATIO = 200


def use_sparse(path: str, n_latents: int, k: int) -> bool:
    """Whether the BatchTopK step runs sparse: "dense", "sparse", or "auto" (sparse when
    n_latents / k >= SPARSE_MIN_RATIO)."""
    if path == "auto":
        return n_latents >= SPARSE_MIN_RATIO * k
    if path not in ("dense", "sparse"):
        raise ValueError(f"unknown BatchTopK path {path!r} (auto, dense, sparse)")
    return path == "sparse"


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gathered_pre(x2, w2, b, rows, cols, h, pre):
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


_gathered_pre.defvjp(_gathered_pre_fwd, _gathered_pre_bwd)


def _decode_pairs(model: Crosscoder, f, rows, cols, n_rows: int):
    """sum_{j: r_j = r} f_j W_dec[c_j] for r < n_rows: [n_rows, m, d], without b_dec."""
    w = model.W_dec[...]
    h, m, d = w.shape
    contrib = f[:, None] * w.reshape(h, m * d)[cols].astype(jnp.float32)
    return jax.ops.segment_sum(contrib, rows, num_segments=n_rows).reshape(n_rows, m, d)


def _pairs_values(model: Crosscoder, x, pre, rows, cols):
    """ReLU(pre[rows, cols]) with the encoder's sparse gradient: [K] float32."""
    w = model.W_enc[...]
    m, d, h = w.shape
    x2 = x.reshape(-1, m * d)
    return jax.nn.relu(_gathered_pre(x2, w.reshape(m * d, h), model.b_enc[...], rows, cols, h, pre))


def batchtopk_loss_sparse(
    model: Crosscoder,
    x: jax.Array,
    weights: jax.Array,
    k: int,
    dead: jax.Array,
    aux_k: int,
    aux_coeff: float,
):
    """`crosscoder.batchtopk_loss` over the kept pairs only; same arguments and returns.

    aux["f"] is the dense [batch, n_latents] activation matrix, rebuilt without gradient
    for the metrics (L0, firing); the loss never multiplies by it.
    """
    n, h = x.shape[0], model.W_enc.shape[-1]
    pre = jax.lax.stop_gradient(model.pre_acts(x))  # [B, h] float32, with b_enc
    relu = jax.nn.relu(pre)
    norms = jax.lax.stop_gradient(model.decoder_norms().sum(-1))
    weighted = relu * norms * weights[:, None]  # masked rows claim no slot
    n_max = min(k * n, n * h)
    vals, flat = jax.lax.top_k(weighted.reshape(-1), n_max)
    keep = (jnp.arange(n_max) < k * weights.sum()) & (vals > 0)
    rows, cols = flat // h, flat % h
    f_kept = _pairs_values(model, x, pre, rows, cols) * keep
    x_hat = _decode_pairs(model, f_kept, rows, cols, n) + model.b_dec[...].astype(jnp.float32)
    mse = squared_error(x, x_hat, weights)

    residual = jax.lax.stop_gradient(x - x_hat)
    n_aux = min(aux_k, h)

    def auxk(_):
        dead_pre = jnp.where(dead[None, :], relu, -jnp.inf)
        a_vals, a_cols = jax.lax.top_k(dead_pre, n_aux)  # [B, n_aux]
        a_rows = jnp.repeat(jnp.arange(n), n_aux)
        a_cols = a_cols.reshape(-1)
        a_f = _pairs_values(model, x, pre, a_rows, a_cols)
        a_f = jnp.where(jnp.isfinite(a_vals.reshape(-1)), a_f, 0.0)
        aux_hat = _decode_pairs(model, a_f, a_rows, a_cols, n)
        return squared_error(residual, aux_hat, weights)

    aux = jax.lax.cond(dead.any(), auxk, lambda _: jnp.zeros((), jnp.float32), None)
    f_dense = jnp.zeros(n * h, jnp.float32).at[flat].set(jax.lax.stop_gradient(f_kept))
    kept = jnp.where(keep, vals, jnp.inf)
    return mse + aux_coeff * aux, {
        "f": f_dense.reshape(n, h),
        "x_hat": x_hat,
        "mse": mse,
        "sparsity": 0.0,
        "aux": aux,
        "batch_threshold": jnp.min(kept),
    }
