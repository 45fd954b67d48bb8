"""The BatchTopK loss (Minder et al. 2025), whole: the objective on its dense and sparse
paths, the inference threshold, and its defaults.

Training keeps the k * batch largest decoder-norm-weighted activations of the batch, plus
an AuxK term that lets dead latents model the residual. An EMA of the batch's cut on the
weighted activations (`update_threshold`) makes inference a per-latent JumpReLU (`encode`).

Two paths compute the same loss, gradients and updates to float tolerance
(`tests/test_sparse_topk.py`); `use_sparse` chooses. The dense one multiplies every row by
every latent. The sparse one touches only the K = k * batch kept (row, latent) pairs after
the encoder's forward GEMM has chosen them (the machinery, shared with Matryoshka: `pairs`):

    choose      pre = ReLU(x W_enc + b_enc) [B, h] (no gradient); the kept pairs are the
                K largest weighted entries (`flat_top_k`: the same set, ties included, as
                the dense path)
    values      f_j = pre[r_j, c_j]; its gradient goes to W_enc[:, c_j] and b_enc[c_j] as
                scatter-adds of x[r_j] (`pairs.gathered_pre`), never through a dense GEMM
    decode      x_hat[r] = b_dec + sum_{j: r_j = r} f_j W_dec[c_j]   (gather + segment sum)

AuxK decodes each row's aux_k largest dead pre-activations the same way, as a tail of the
same pairs that the custom ops skip (and its cost) in every step where no latent is dead
(`pairs.aux_selection`).

k-annealing (`k_at`): k falls linearly from k_max to k over the first steps, at static
shapes (one compilation): the selection runs at size k_max * batch and keeps its first
k_step * n_valid entries; the EMA threshold and AuxK follow the step's kept set.
"""

from __future__ import annotations

from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError
from xcoder_jax.losses.common import check_inputs, check_outputs, squared_error
from xcoder_jax.losses.flat_topk import flat_top_k
from xcoder_jax.losses.pairs import auxk_loss, decode_selection, select_pairs

NAME = "batchtopk"

# The sparse step is run where n_latents / k is at least this: where the two paths cross.
# Measured on 2 CPU cores at d = 2 x 256, 4096 latents, batch 1024 (`python -m
# bench.batchtopk_step --shapes 256x4096x32,256x4096x64,256x4096x128 --paths dense,sparse`):
# sparse / dense 1.53x, 0.98x and 0.63x at n_latents / k = 128, 64 and 32.
SPARSE_MIN_RATIO = 64


def dec_init_norm(cc) -> float:
    """The L2 norm of every decoder row at init: `crosscoder.batchtopk_dec_init_norm`
    (default `crosscoder.dec_init_norm`). With the L1 loss's small rows about half of the
    latents die (measured in the README)."""
    return cc.get("batchtopk_dec_init_norm", cc.dec_init_norm)


def use_sparse(path: str, n_latents: int, k: int) -> bool:
    """Whether the step runs sparse: "dense", "sparse", or "auto" (sparse when
    n_latents / k >= SPARSE_MIN_RATIO)."""
    if path == "auto":
        return n_latents >= SPARSE_MIN_RATIO * k
    if path not in ("dense", "sparse"):
        raise ValueError(f"unknown BatchTopK path {path!r} (auto, dense, sparse)")
    return path == "sparse"


def encode(model: Crosscoder, x: jax.Array) -> jax.Array:
    """The inference encoder [batch, n_latents], without any batch dependence: ReLU where
    the decoder-norm-weighted activation reaches the learned threshold, else 0."""
    f = jax.nn.relu(model.pre_acts(x))
    weighted = f * model.decoder_norms().sum(-1)
    return jnp.where(weighted >= model.threshold[...], f, 0.0)


def update_threshold(old: jax.Array, batch_threshold: jax.Array, ema: float) -> jax.Array:
    """The inference threshold after one step.

    old: [n_latents] float32, on decoder-norm-weighted activations (0 until first set);
    batch_threshold: [] the batch's smallest kept weighted activation (+inf if none kept).

    A batch that kept nothing leaves the threshold as it was: mixing its +inf in would make
    the threshold +inf for good, and the exported encoder would never fire. An unset (0) or
    non-finite threshold takes the batch's value; otherwise the EMA
    `ema * old + (1 - ema) * batch_threshold`.
    """
    chex.assert_rank([old, batch_threshold], [1, 0])
    batch_threshold = jnp.asarray(batch_threshold, old.dtype)
    is_set = (old > 0) & jnp.isfinite(old)
    mixed = jnp.where(is_set, ema * old + (1 - ema) * batch_threshold, batch_threshold)
    return jnp.where(jnp.isfinite(batch_threshold), mixed, old)


def k_at(step, k: int, k_max: int, anneal_steps: int):
    """k at 0-based `step`: int(k_max (1 - r) + k r), r = min(step, anneal_steps) /
    anneal_steps (as dictionary_learning), in integers; k when anneal_steps is 0."""
    if anneal_steps <= 0:
        return k
    s = jnp.minimum(jnp.asarray(step, jnp.int32), anneal_steps)
    return k_max - ((k_max - k) * s + anneal_steps - 1) // anneal_steps


def batch_topk(weighted: jax.Array, k, n_valid=None, k_max: int | None = None) -> jax.Array:
    """Mask [batch, n_latents] keeping the k * n_valid largest positive entries of the whole
    batch. `n_valid` []: the number of rows that count (masked rows are weighted by 0);
    default: every row. `k_max`: the static size that bounds a traced k (annealing)."""
    flat = weighted.reshape(-1)
    n_max = min((k if k_max is None else k_max) * weighted.shape[0], flat.shape[0])
    _, idx = flat_top_k(weighted, n_max)  # descending: `lax.top_k` over `flat`
    # The slots of masked-out rows are not handed to the valid ones: k per valid row.
    rank_kept = jnp.arange(n_max) < k * (weighted.shape[0] if n_valid is None else n_valid)
    mask = jnp.zeros(flat.shape, bool).at[idx].set(rank_kept)
    return (mask & (flat > 0)).reshape(weighted.shape)


def _result(model, x, mse, aux, aux_coeff, f, x_hat, kept):
    """(loss, aux dict) of either path; `kept`: the weighted activations kept, +inf
    elsewhere. Their minimum is the batch's cut, for the EMA: +inf when nothing is kept
    (every row masked out, or no positive activation), which `update_threshold` ignores."""
    loss = mse + aux_coeff * aux
    out = {"f": f, "x_hat": x_hat, "mse": mse, "sparsity": 0.0, "aux": aux}
    out["batch_threshold"] = jnp.min(kept)
    check_outputs(model, x, loss, out)
    return loss, out


def batchtopk_loss(model: Crosscoder, x, weights, k, dead, aux_k, aux_coeff, k_max=None):
    """BatchTopK reconstruction plus AuxK on dead latents: the dense path.

    x: [batch, n_models, d_model] normalised; weights: [batch] 0/1; dead: [n_latents] bool.
    The batch keeps its k*batch largest decoder-norm-weighted activations. AuxK: each row's
    aux_k largest (ReLU) pre-activations among the dead latents decode, without b_dec, the
    residual x - x_hat left by the kept ones (gradient stopped); its squared error, summed
    over models and d and averaged over valid rows like the main term (not divided by the
    residual's variance), is zero when no latent is dead and enters the loss times
    `aux_coeff`. Returns (loss, aux) like `l1.l1_loss`, plus `batch_threshold` [].
    While annealing, k is a traced int32 [] and `k_max` (static) the selection's size.
    """
    check_inputs(model, x, weights, dead)
    pre = jax.nn.relu(model.pre_acts(x))
    weighted = pre * model.decoder_norms().sum(-1)
    # Rows that are masked out (non-finite in the store) never claim a top-k slot.
    weighted = weighted * weights[:, None]
    f = jnp.where(batch_topk(weighted, k, weights.sum(), k_max), pre, 0.0)
    x_hat = model.decode(f)
    mse = squared_error(x, x_hat, weights)
    # AuxK: the top aux_k dead latents of each row reconstruct what the live ones missed.
    residual = jax.lax.stop_gradient(x - x_hat)
    n_aux = min(aux_k, pre.shape[1])

    def auxk(_):
        dead_pre = jnp.where(dead[None, :], pre, -jnp.inf)
        vals, idx = jax.lax.top_k(dead_pre, n_aux)
        aux_f = (
            jnp.zeros_like(pre)
            .at[jnp.arange(pre.shape[0])[:, None], idx]
            .set(jnp.where(jnp.isfinite(vals), vals, 0.0))
        )
        aux_hat = model.decode(aux_f) - model.b_dec[...].astype(jnp.float32)
        return squared_error(residual, aux_hat, weights)

    # Zero, and not computed, in a step where no latent is dead.
    aux = jax.lax.cond(dead.any(), auxk, lambda _: jnp.zeros((), jnp.float32), None)
    kept = jnp.where(f > 0, weighted, jnp.inf)
    return _result(model, x, mse, aux, aux_coeff, f, x_hat, kept)


# --- The sparse path -------------------------------------------------------------------


def batchtopk_loss_sparse(model: Crosscoder, x, weights, k, dead, aux_k, aux_coeff, k_max=None):
    """`batchtopk_loss` over the kept pairs only; same arguments and returns.

    aux["f"] is the dense [batch, n_latents] activation matrix, rebuilt without gradient
    for the metrics (L0, firing); the loss never multiplies by it.
    """
    check_inputs(model, x, weights, dead)
    sel = select_pairs(model, x, weights, k, k_max, dead, aux_k)
    x_hat, aux_hat = decode_selection(model, sel, sel.rows, x.shape[0])
    x_hat = x_hat + model.b_dec[...].astype(jnp.float32)
    mse = squared_error(x, x_hat, weights)
    residual = jax.lax.stop_gradient(x - x_hat)
    aux = auxk_loss(sel, aux_hat, residual, weights)
    return _result(model, x, mse, aux, aux_coeff, sel.f_dense, x_hat, sel.kept)


# --- The loss object ---------------------------------------------------------------------


def topk_step(loss, paths, model: Crosscoder, x, weights, step, dead, *extra):
    """The training objective of a BatchTopK-like loss object `loss` (fields k, aux_k,
    aux_coeff, sparse, k_max, anneal_steps): k at `step` (`k_at`), then the path of
    `paths` = (dense, sparse) that `loss.sparse` chooses, called as `batchtopk_loss` with
    `extra` (e.g. Matryoshka's groups) before the selection's static size."""
    fn = paths[1] if loss.sparse else paths[0]
    k = k_at(step, loss.k, loss.k_max, loss.anneal_steps)
    size = loss.k_max if loss.anneal_steps > 0 else None  # static: k is traced
    out, aux = fn(model, x, weights, k, dead, loss.aux_k, loss.aux_coeff, *extra, size)
    return out, {**aux, "lam": jnp.zeros(()), "k": jnp.asarray(k, jnp.float32)}


@dataclass(frozen=True)
class BatchTopK:
    """k decoder-norm-weighted activations per row on average over the batch, AuxK on dead
    latents, and an EMA of the batch threshold for the inference JumpReLU. `sparse`: the
    step computes over the kept pairs only, with the same result. `anneal_steps` > 0: k
    falls from `k_max` over the first anneal_steps steps (`k_at`)."""

    k: int
    aux_k: int
    aux_coeff: float
    threshold_ema: float
    sparse: bool = False
    k_max: int = 0
    anneal_steps: int = 0
    name: str = NAME

    def __call__(self, model: Crosscoder, x, weights, step, dead):
        paths = (batchtopk_loss, batchtopk_loss_sparse)
        return topk_step(self, paths, model, x, weights, step, dead)

    def update(self, rest, aux):
        new = update_threshold(rest["threshold"][...], aux["batch_threshold"], self.threshold_ema)
        rest = jax.tree.map(lambda v: v, rest)  # a new State; the caller's is left as it was
        rest["threshold"] = rest["threshold"].replace(new)
        return rest

    def encode(self, model: Crosscoder, x):
        return encode(model, x)

    def threshold_on_f(self, model: Crosscoder) -> jax.Array:
        """The exported JumpReLU threshold [n_latents]: training keeps it on decoder-norm-
        weighted f, the export on f, divided by the final norms."""
        return model.threshold[...] / jnp.maximum(model.decoder_norms().sum(-1), 1e-12)


def from_config(cc, tc) -> BatchTopK:
    """The loss object of `config.crosscoder` (cc); `crosscoder.topk_path` (default "auto")
    chooses the path for the selection's size: k_max (0: 4 k) while annealing, else k."""
    del tc
    anneal = cc.get("k_anneal_steps", 0)
    k_max = (cc.get("k_max", 0) or 4 * cc.k) if anneal > 0 else cc.k
    if k_max < cc.k:
        raise ConfigError(f"crosscoder.k_max = {k_max}: must be >= crosscoder.k = {cc.k}")
    path = use_sparse(cc.get("topk_path", "auto"), cc.n_latents, k_max)
    return BatchTopK(cc.k, cc.aux_k, cc.aux_coeff, cc.threshold_ema, path, k_max, anneal)
