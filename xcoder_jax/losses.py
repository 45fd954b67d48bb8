"""The crosscoder's training objectives, each a small value object the train step calls.

A loss kind is a frozen dataclass (hashable, so a jitted step takes it as a static
hyperparameter) with three methods:

    __call__(model, x, weights, step, dead) -> (loss [], aux)   the training objective
    update(rest, aux) -> rest        non-trained variables after a step (BatchTopK threshold)
    encode(model, x) -> f            the inference encoder, with no batch dependence
    threshold_on_f(model) -> [n_latents] or None   the exported JumpReLU threshold, if any

x is [batch, n_models, d_model] in NORMALISED units, weights [batch] 0/1 (rows that count),
step the 0-based step, dead [n_latents] bool. aux holds at least f [batch, n_latents], x_hat,
and the scalar terms mse, sparsity, aux, lam. Adding a loss: a class with these methods, and
an entry in `KINDS` built from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder, batchtopk_loss, l1_loss, update_threshold
from xcoder_jax.errors import ConfigError
from xcoder_jax.sparse_topk import batchtopk_loss_sparse, use_sparse


def l1_lambda(step, l1_coeff: float, warmup_frac: float, steps: int) -> jax.Array:
    """The L1 coefficient at a 0-based step: linear from 0 at step 0 to `l1_coeff` at step
    `warmup_frac * steps` (at least 1), constant after. Returns float32 []."""
    warmup = max(1.0, warmup_frac * steps)
    return l1_coeff * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)


@dataclass(frozen=True)
class L1:
    """The paper's loss: squared error plus lambda * decoder-norm-weighted L1 of f, lambda
    warmed up linearly over the first `warmup_frac * steps` steps."""

    l1_coeff: float
    warmup_frac: float
    steps: int
    name: str = "l1"

    def __call__(self, model: Crosscoder, x, weights, step, dead):
        lam = l1_lambda(step, self.l1_coeff, self.warmup_frac, self.steps)
        loss, aux = l1_loss(model, x, weights, lam)
        return loss, {**aux, "lam": lam}

    def update(self, rest, aux):
        return rest

    def encode(self, model: Crosscoder, x):
        return model.encode(x, self.name)

    def threshold_on_f(self, model: Crosscoder):
        return None


@dataclass(frozen=True)
class BatchTopK:
    """k decoder-norm-weighted activations per row on average over the batch, AuxK on dead
    latents, and an EMA of the batch threshold for the inference JumpReLU. `sparse`: the
    step computes over the kept pairs only (`sparse_topk`), with the same result."""

    k: int
    aux_k: int
    aux_coeff: float
    threshold_ema: float
    sparse: bool = False
    name: str = "batchtopk"

    def __call__(self, model: Crosscoder, x, weights, step, dead):
        fn = batchtopk_loss_sparse if self.sparse else batchtopk_loss
        loss, aux = fn(model, x, weights, self.k, dead, self.aux_k, self.aux_coeff)
        return loss, {**aux, "lam": jnp.zeros(())}

    def update(self, rest, aux):
        new = update_threshold(rest["threshold"][...], aux["batch_threshold"], self.threshold_ema)
        rest = jax.tree.map(lambda v: v, rest)  # a new State; the caller's is left as it was
        rest["threshold"] = rest["threshold"].replace(new)
        return rest

    def encode(self, model: Crosscoder, x):
        return model.encode(x, self.name)

    def threshold_on_f(self, model: Crosscoder):
        """Training keeps the threshold on decoder-norm-weighted f; the export's is on f,
        divided by the final norms."""
        norms = model.decoder_norms().sum(-1)
        return model.threshold[...] / jnp.maximum(norms, 1e-12)


KINDS = {
    "l1": lambda cc, tc: L1(cc.l1_coeff, cc.l1_warmup_frac, tc.steps),
    "batchtopk": lambda cc, tc: BatchTopK(
        cc.k,
        cc.aux_k,
        cc.aux_coeff,
        cc.threshold_ema,
        sparse=use_sparse(cc.get("topk_path", "auto"), cc.n_latents, cc.k),
    ),
}


def from_config(config):
    """The loss object `config.crosscoder.loss` names; ConfigError for an unknown kind."""
    kind = config.crosscoder.loss
    if kind not in KINDS:
        raise ConfigError(f"unknown crosscoder.loss {kind!r} ({', '.join(KINDS)})")
    return KINDS[kind](config.crosscoder, config.train)
