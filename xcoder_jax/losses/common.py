"""What every loss kind shares: the reconstruction error and the checks at its boundary.

The checks are on shapes and dtypes only, known when a function is traced: they cost
nothing in a jitted step and hold with and without jit.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder


def squared_error(x: jax.Array, x_hat: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-row squared error summed over models and d, weighted mean over the batch."""
    per_row = jnp.square(x_hat - x).sum((1, 2))
    return (per_row * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def check_inputs(model: Crosscoder, x, weights, dead=None) -> None:
    """x [batch, n_models, d_model] and weights [batch] floating; dead [n_latents] bool."""
    m, d, h = model.W_enc[...].shape
    chex.assert_shape(x, (None, m, d))
    chex.assert_shape(weights, (x.shape[0],))
    chex.assert_type([x, weights], float)
    if dead is not None:
        chex.assert_shape(dead, (h,))
        chex.assert_type(dead, bool)


def check_outputs(model: Crosscoder, x, loss, aux: dict) -> None:
    """loss [] and aux["mse"] [] float32, aux["f"] [batch, n_latents], aux["x_hat"] like x."""
    m, d, h = model.W_enc[...].shape
    chex.assert_shape([loss, aux["mse"]], ())
    chex.assert_type([loss, aux["mse"]], jnp.float32)
    chex.assert_shape(aux["f"], (x.shape[0], h))
    chex.assert_shape(aux["x_hat"], (x.shape[0], m, d))
    chex.assert_type([aux["f"], aux["x_hat"]], jnp.float32)
