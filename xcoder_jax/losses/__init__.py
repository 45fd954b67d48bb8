"""The crosscoder's training objectives: one module per loss kind, and their registry.

Each kind is whole in its module (`l1`, `batchtopk`, `matryoshka`): its math, its paths,
its threshold, its defaults. A kind's module defines

    NAME                        the value of `crosscoder.loss` that selects it
    from_config(cc, tc)         its loss object, from config.crosscoder and config.train
    dec_init_norm(cc) -> float  the L2 norm of every decoder row at init
    encode(model, x) -> f       its inference encoder, with no batch dependence

and its loss object is a frozen dataclass (hashable, so a jitted step takes it as a
static hyperparameter) with

    __call__(model, x, weights, step, dead) -> (loss [], aux)   the training objective
    update(rest, aux) -> rest        non-trained variables after a step (BatchTopK threshold)
    encode(model, x) -> f            the inference encoder
    threshold_on_f(model) -> [n_latents] or None   the exported JumpReLU threshold, if any

x is [batch, n_models, d_model] in NORMALISED units, weights [batch] 0/1 (rows that count),
step the 0-based step, dead [n_latents] bool. aux holds at least f [batch, n_latents], x_hat,
and the scalar terms mse, sparsity, aux, lam (BatchTopK also k, the step's k). Adding a
loss: a module like these, and an entry in `MODULES`. What every kind shares (the squared
error, the checks of shapes and dtypes at a loss's boundary) is `common`; the sparse paths'
(row, latent) pair machinery (selection, values, decoding, AuxK) is `pairs`.
"""

from __future__ import annotations

from xcoder_jax.errors import ConfigError
from xcoder_jax.losses import batchtopk, l1, matryoshka
from xcoder_jax.losses.batchtopk import BatchTopK
from xcoder_jax.losses.l1 import L1, l1_lambda
from xcoder_jax.losses.matryoshka import Matryoshka

__all__ = [
    "KINDS",
    "MODULES",
    "BatchTopK",
    "L1",
    "Matryoshka",
    "dec_init_norm",
    "encoder",
    "from_config",
    "l1_lambda",
]

# crosscoder.loss -> the module of that kind.
MODULES = {m.NAME: m for m in (l1, batchtopk, matryoshka)}

# crosscoder.loss -> the factory of its loss object, (config.crosscoder, config.train).
KINDS = {name: m.from_config for name, m in MODULES.items()}


def _module(kind: str):
    if kind not in MODULES:
        raise ConfigError(f"unknown crosscoder.loss {kind!r} ({', '.join(MODULES)})")
    return MODULES[kind]


def from_config(config):
    """The loss object `config.crosscoder.loss` names; ConfigError for an unknown kind."""
    return _module(config.crosscoder.loss).from_config(config.crosscoder, config.train)


def dec_init_norm(config) -> float:
    """The decoder rows' L2 norm at init for the loss `config.crosscoder.loss` names."""
    return _module(config.crosscoder.loss).dec_init_norm(config.crosscoder)


def encoder(kind: str):
    """The inference encoder `(model, x) -> f [batch, n_latents]` of loss `kind`."""
    return _module(kind).encode
