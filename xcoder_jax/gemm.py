"""The crosscoder's two GEMMs, with weight gradients computed in the layout fast GEMM kernels
take.

Autodiff writes a weight gradient `a.T @ g` as a dot contracting both operands' first axis.
XLA's CPU backend runs that form outside its fast GEMM path: at the paper's width (a
[1024, 3072], g [1024, 32768]) it took 3.2 s against 1.5 s for the same product with `a.T`
materialised first (`bench.train_step --breakdown`; 12 MB copied). `matmul` does that: its
backward transposes the small operand explicitly, behind an optimization barrier so that
XLA cannot fold the transpose back into the dot. Values and gradients are those of
`jnp.dot(a, w, preferred_element_type=float32)`; the input gradient is computed only when
`a` is differentiated (the encoder's input never is in training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """a [B, K] @ w [K, N] -> [B, N] float32 (accumulated in float32 whatever the inputs'
    dtype)."""
    return _dot(a, w)


def _fwd(a, w):
    # Which gradients are needed is static: a residual of None means "not needed".
    a_needed, w_needed = a.perturbed, w.perturbed
    a, w = a.value, w.value
    dtypes = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), w.dtype))  # residuals are arrays
    return _dot(a, w), (a if w_needed else None, w if a_needed else None, dtypes)


def _bwd(saved, g):
    a, w, (a_dtype, w_dtype) = saved  # a: kept when w's gradient is needed; w: for a's
    if isinstance(g, SymbolicZero):
        return None, None
    da = None if w is None else _dot(g.astype(w.dtype), w.T).astype(a_dtype.dtype)
    if a is None:
        return da, None
    a_t = jax.lax.optimization_barrier(a.T)  # [K, B], materialised: a plain GEMM follows
    dw = _dot(a_t, g.astype(a.dtype)).astype(w_dtype.dtype)
    return da, dw


matmul.defvjp(_fwd, _bwd, symbolic_zeros=True)
