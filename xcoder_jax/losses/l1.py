"""The L1 loss (the paper's), whole: its objective, its inference encoder, its defaults.

    loss = sum_{m,d} (x_hat - x)^2                                    mean over valid rows
         + lambda * sum_i f_i * sum_m ||W_dec[i, m]||_2                  mean over valid rows

with f = ReLU(pre-activations) and lambda warmed up linearly over the first
`warmup_frac * steps` steps. The inference encoder is the same ReLU: no threshold.

Two paths compute the same loss and gradients to float tolerance: the dense one
(`l1_loss`) and the sparse one (`l1_loss_sparse`, over the active (row, latent) pairs only,
`l1_sparse`), which pays once L0 is a small share of the latents. `crosscoder.l1_path`
chooses: "dense", "sparse", or "auto", which training switches per step on the logged L0
(`xcoder_jax.l1_switch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError
from xcoder_jax.losses import l1_sparse, packing
from xcoder_jax.losses.common import check_inputs, check_outputs, squared_error

NAME = "l1"
PATHS = ("dense", "sparse", "auto")  # `crosscoder.l1_path`


def dec_init_norm(cc) -> float:
    """The L2 norm of every decoder row at init: `crosscoder.dec_init_norm`."""
    return cc.dec_init_norm


def l1_lambda(step, l1_coeff: float, warmup_frac: float, steps: int) -> jax.Array:
    """The L1 coefficient at a 0-based step: linear from 0 at step 0 to `l1_coeff` at step
    `warmup_frac * steps` (at least 1), constant after. Returns float32 []."""
    warmup = max(1.0, warmup_frac * steps)
    return l1_coeff * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)


def encode(model: Crosscoder, x: jax.Array) -> jax.Array:
    """The inference encoder: ReLU of the pre-activations, [batch, n_latents] float32."""
    return jax.nn.relu(model.pre_acts(x))


def l1_loss(model: Crosscoder, x: jax.Array, weights: jax.Array, lam: jax.Array):
    """The paper's loss. x: [batch, n_models, d_model] normalised; weights: [batch] 0/1.

    Returns (loss, aux) with aux holding f [batch, n_latents], x_hat and the loss terms.
    """
    check_inputs(model, x, weights)
    f = encode(model, x)
    x_hat = model.decode(f)
    mse = squared_error(x, x_hat, weights)
    per_row = (f * model.decoder_norms().sum(-1)).sum(-1)
    sparsity = (per_row * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    loss = mse + lam * sparsity
    aux = {"f": f, "x_hat": x_hat, "mse": mse, "sparsity": sparsity, "aux": 0.0}
    check_outputs(model, x, loss, aux)
    return loss, aux


def l1_loss_sparse(model: Crosscoder, x, weights, lam, capacity: int):
    """`l1_loss` over the active (row, latent) pairs, at most `capacity` (static) of them;
    same arguments and returns (the x_hat of rows of weight 0 is b_dec: see `l1_sparse`).

    A batch with more active pairs (in rows of nonzero weight) than `capacity` runs
    `l1_loss` instead, chosen by `lax.cond`: the step stays exact, and such a batch costs a
    dense step plus the encoder's forward GEMM and the packing computed here.
    """
    check_inputs(model, x, weights)
    pre = jax.lax.stop_gradient(model.pre_acts(x))  # [B, h] float32, with b_enc
    *pairs, count = packing.active_pairs((pre > 0) & (weights[:, None] != 0), capacity)
    loss, aux = jax.lax.cond(
        count <= capacity,
        lambda: l1_sparse.pairs_loss(model, x, weights, lam, pre, pairs),
        lambda: l1_loss(model, x, weights, lam),
    )
    check_outputs(model, x, loss, aux)
    return loss, aux


@dataclass(frozen=True)
class L1:
    """The paper's loss: squared error plus lambda * decoder-norm-weighted L1 of f, lambda
    warmed up linearly over the first `warmup_frac * steps` steps. `sparse`: the step runs
    over the active pairs, at most `capacity` of them (static; a batch with more runs dense),
    with the same result."""

    l1_coeff: float
    warmup_frac: float
    steps: int
    sparse: bool = False
    capacity: int = 0
    name: str = NAME

    def __call__(self, model: Crosscoder, x, weights, step, dead):
        lam = l1_lambda(step, self.l1_coeff, self.warmup_frac, self.steps)
        if self.sparse:
            loss, aux = l1_loss_sparse(model, x, weights, lam, self.capacity)
        else:
            loss, aux = l1_loss(model, x, weights, lam)
        return loss, {**aux, "lam": lam}

    def update(self, rest, aux):
        return rest

    def encode(self, model: Crosscoder, x):
        return encode(model, x)

    def threshold_on_f(self, model: Crosscoder):
        return None


def from_config(cc, tc) -> L1:
    """The loss object of `config.crosscoder` (cc) and `config.train` (tc). Its path is
    `crosscoder.l1_path` (default "dense"): "sparse" starts at the largest capacity
    (`l1_sparse.max_capacity`), "auto" dense; training moves both with the logged L0."""
    path = cc.get("l1_path", "dense")
    if path not in PATHS:
        raise ConfigError(f"crosscoder.l1_path = {path!r}: must be one of {', '.join(PATHS)}")
    sparse = path == "sparse"
    capacity = l1_sparse.max_capacity(tc.batch_size, cc.n_latents) if sparse else 0
    return L1(cc.l1_coeff, cc.l1_warmup_frac, tc.steps, sparse, capacity)
