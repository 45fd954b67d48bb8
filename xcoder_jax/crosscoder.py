"""The sparse crosscoder: one shared latent code over the residual streams of several models.

    pre     = sum_m x_m W_enc[m] + b_enc                        [batch, n_latents]
    x_hat_m = f W_dec[:, m] + b_dec[m]                         [batch, n_models, d_model]

With dedicated latents (`exclusive`, layout in `xcoder_jax.exclusive`) the masked rows of
W_enc and W_dec are zero at init and every computation reads the weights through
`enc_weight` / `dec_weight`, which mask them again: their gradients are exactly zero.

Inputs and outputs here are in NORMALISED units (each model's raw activations times its
store scale, so that the mean norm is sqrt(d_model)); the export folds the scales into the
weights for the portable raw-unit file.

This module holds what every loss kind shares: the weights, the pre-activations, the
decoder and its row norms, and the per-latent threshold a kind may learn. How pre becomes
the code f (ReLU, BatchTopK, a JumpReLU threshold) and what training minimises belong to
the loss kinds, one module each in `xcoder_jax.losses`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from xcoder_jax import exclusive as excl
from xcoder_jax.gemm import matmul

# The mesh axis the latent dimension is split over; every other axis is replicated, and the
# batch is split over "data". Each variable states its own layout (Flax partition metadata),
# from which the train state's shardings, Adam moments included, are derived.
LATENT_AXIS = "model"
DATA_AXIS = "data"


def _laid_out(variable_type, value, *axes):
    # eager_sharding=False: the layout is metadata only; the variable is placed on devices by
    # the jitted init's out_shardings, so a module can be built without a mesh (analysis).
    return variable_type(value, out_sharding=axes, eager_sharding=False)


class Threshold(nnx.Variable):
    """A per-latent inference threshold that a loss kind may learn (BatchTopK's, on
    decoder-norm-weighted activations); not trained by the optimiser, 0 otherwise."""


class Crosscoder(nnx.Module):
    """Weights: W_enc [n_models, d_model, n_latents], b_enc [n_latents],
    W_dec [n_latents, n_models, d_model], b_dec [n_models, d_model].

    `dtype` is the compute dtype (e.g. bfloat16); parameters stay in `param_dtype`.
    `exclusive`: (n_base_only, n_distilled_only) dedicated latents, the last ones
    (`xcoder_jax.exclusive`); (0, 0) masks nothing.
    """

    def __init__(
        self,
        n_models: int,
        d_model: int,
        n_latents: int,
        *,
        rngs: nnx.Rngs,
        dec_init_norm: float = 0.08,
        param_dtype=jnp.float32,
        dtype=None,
        exclusive: tuple[int, int] = excl.NONE,
    ):
        self.exclusive = tuple(int(n) for n in exclusive)  # static: part of the graphdef
        if self.exclusive != excl.NONE and n_models != 2:
            raise ValueError(f"exclusive latents need 2 models (base, distilled), not {n_models}")
        excl.ranges(n_latents, self.exclusive)  # raises for counts that do not fit
        w = jax.random.normal(rngs.params(), (n_latents, n_models, d_model), jnp.float32)
        # Every (latent, model) decoder row starts at the same L2 norm; W_enc = W_dec^T.
        w = w * (dec_init_norm / jnp.linalg.norm(w, axis=-1, keepdims=True))
        w = self._masked(w, "dec")  # the masked rows start at exactly 0
        lat = LATENT_AXIS
        self.W_dec = _laid_out(nnx.Param, w.astype(param_dtype), lat, None, None)
        w_enc = jnp.transpose(w, (1, 2, 0)).astype(param_dtype)
        self.W_enc = _laid_out(nnx.Param, w_enc, None, None, lat)
        self.b_enc = _laid_out(nnx.Param, jnp.zeros((n_latents,), param_dtype), lat)
        self.b_dec = _laid_out(nnx.Param, jnp.zeros((n_models, d_model), param_dtype), None, None)
        self.threshold = _laid_out(Threshold, jnp.zeros((n_latents,), jnp.float32), lat)
        self.dtype = dtype

    def _keep(self, h: int, m: int) -> jax.Array:
        """[h, m] bool: whether latent i may use model m (iota: no stored variable, so it
        works under jit and with the latent axis sharded)."""
        lat = jax.lax.broadcasted_iota(jnp.int32, (h, m), 0)
        slot = jax.lax.broadcasted_iota(jnp.int32, (h, m), 1)
        r = excl.ranges(h, self.exclusive)
        base_only = (lat >= r["base_only"][0]) & (lat < r["base_only"][1])
        distilled_only = lat >= r["distilled_only"][0]
        return ~((base_only & (slot == 1)) | (distilled_only & (slot == 0)))

    def _masked(self, w: jax.Array, layout: str) -> jax.Array:
        """w with the masked rows 0: `layout` "enc" ([m, d, h]) or "dec" ([h, m, d])."""
        if self.exclusive == excl.NONE:
            return w  # nothing masked: the weights as they are
        if layout == "enc":
            keep = self._keep(w.shape[2], w.shape[0]).T[:, None, :]
        else:
            keep = self._keep(w.shape[0], w.shape[1])[:, :, None]
        return jnp.where(keep, w, jnp.zeros((), w.dtype))

    def model_mask(self) -> jax.Array:
        """[n_latents, n_models] float32: 1 where latent i may use model m, 0 where it is
        dedicated to the other model."""
        h, m = self.W_dec.shape[:2]
        return self._keep(h, m).astype(jnp.float32)

    def enc_weight(self) -> jax.Array:
        """W_enc [n_models, d_model, n_latents] with the dedicated latents' masked rows 0."""
        return self._masked(self.W_enc[...], "enc")

    def dec_weight(self) -> jax.Array:
        """W_dec [n_latents, n_models, d_model] with the dedicated latents' masked rows 0."""
        return self._masked(self.W_dec[...], "dec")

    def _cast(self, *arrays):
        if self.dtype is None:
            return arrays
        return tuple(a.astype(self.dtype) for a in arrays)

    def pre_acts(self, x: jax.Array) -> jax.Array:
        """x: [batch, n_models, d_model] (normalised) -> [batch, n_latents], float32."""
        x, w = self._cast(x, self.enc_weight())
        # One [batch, m*d] x [m*d, h] GEMM: XLA lowers the equivalent einsum to a batched
        # dot plus a sum over models, measured ~15% slower on CPU. `matmul`: its weight
        # gradient in the fast GEMM layout.
        m, d, h = w.shape
        chex.assert_shape(x, (None, m, d))
        chex.assert_type(x, float)
        pre = matmul(x.reshape(-1, m * d), w.reshape(m * d, h))
        return pre + self.b_enc[...].astype(jnp.float32)

    def decoder_norms(self) -> jax.Array:
        """L2 norm of each decoder row: [n_latents, n_models]."""
        return jnp.linalg.norm(self.dec_weight().astype(jnp.float32), axis=-1)

    def encode(self, x: jax.Array, kind: str = "l1") -> jax.Array:
        """The inference encoder of loss `kind`: latent activations [batch, n_latents]
        without any batch dependence (each kind defines its own, `losses.encoder`)."""
        from xcoder_jax import losses  # the loss kinds are built on this module

        return losses.encoder(kind)(self, x)

    def decode(self, f: jax.Array) -> jax.Array:
        """f: [batch, n_latents] -> x_hat [batch, n_models, d_model] (normalised)."""
        f, w = self._cast(f, self.dec_weight())
        h, m, d = w.shape
        chex.assert_shape(f, (None, h))
        chex.assert_type(f, float)
        out = matmul(f, w.reshape(h, m * d))
        return out.reshape(-1, m, d) + self.b_dec[...].astype(jnp.float32)

    def __call__(self, x: jax.Array, kind: str = "l1") -> jax.Array:
        return self.decode(self.encode(x, kind))
