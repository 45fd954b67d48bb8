"""The L1 loss over its active (row, latent) pairs only, and the capacities it runs at.

ReLU leaves exact zeros: where a row fires few of the latents, the decode, the decoder's
gradient and the encoder's weight gradient need only the active pairs. This path gives the
same loss and gradients as `l1.l1_loss` to float tolerance (`tests/test_sparse_l1.py`):

    choose      pre = x W_enc + b_enc [B, h]: the dense forward GEMM, without gradient; the
                active pairs are the entries with pre > 0 in rows of nonzero weight, in
                row-major order, packed into a static `capacity` (`packing.active_pairs`)
    values      f_j = ReLU(pre[r_j, c_j]), its gradient to W_enc[:, c_j] and b_enc[c_j] as
                scatter-adds of x[r_j] (`pairs.pairs_values`)
    decode      x_hat[r] = b_dec + sum_{j: r_j = r} f_j W_dec[c_j]  (`pairs.decode_pairs`)
    L1 term     sum_i s_i ||W_dec[i]|| / n_valid with s_i = sum_{j: c_j = i} weight_{r_j} f_j,
                a segment sum to a dense [h] vector

Rows of weight 0 count in neither term, so none of their pairs is gathered: their x_hat here
is b_dec alone (the dense path decodes them too); every weighted row's x_hat is the same.
`l1.l1_loss_sparse` runs the dense path instead for a batch with more active pairs than the
capacity: every step is exact, whatever the capacity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.losses.common import squared_error
from xcoder_jax.losses.pairs import decode_pairs, pairs_values

# The sparse step is run while L0 / n_latents is below this: where the two paths cross.
# Measured on 2 CPU cores at d = 2 x 256, 4096 latents, batch 1024 (`python -m
# bench.train_step --l1`): the sparse step runs at 3.2x, 2.0x, 1.15x, 1.12x, 1.05x and 0.36x
# the dense one's steps/s at densities 1/1024, 1/256, 1/128, 1/96, 1/64 and 1/32. A
# gathered or scattered (pair, d) element costs tens of times a GEMM's multiply-add here,
# which the density has to make up for; an accelerator's crossing may lie elsewhere.
SPARSE_MAX_DENSITY = 1 / 64

# Capacity = the bucket at or above HEADROOM x the expected active pairs (L0 x batch): the
# batches' spread around the logged L0 rarely exceeds it. Buckets are 2^(k / 4) (steps of
# 1.19x): a padded slot costs as much as a pair, so finer steps than powers of two waste
# less (at most 1.25 x 1.19 = 1.49x the expected pairs, against 2.5x), and a capacity still
# serves a range of L0 (`l1_switch`), so training compiles few of them.
HEADROOM = 1.25
BUCKETS_PER_OCTAVE = 4
MIN_CAPACITY = 256


def bucket(pairs: float) -> int:
    """The smallest ceil(2^(k / BUCKETS_PER_OCTAVE)), k >= 0 an integer, at or above
    `pairs`."""
    k = max(0, math.floor(BUCKETS_PER_OCTAVE * math.log2(max(pairs, 1.0))))
    while math.ceil(2 ** (k / BUCKETS_PER_OCTAVE)) < pairs:
        k += 1
    return math.ceil(2 ** (k / BUCKETS_PER_OCTAVE))


def max_capacity(batch: int, n_latents: int) -> int:
    """The largest capacity a step is given: the bucket at density SPARSE_MAX_DENSITY (an L0
    above it runs the dense step, so pairs beyond it are never needed)."""
    return min(bucket(HEADROOM * SPARSE_MAX_DENSITY * n_latents * batch), batch * n_latents)


def capacity_for(l0: float, batch: int, n_latents: int) -> int:
    """The static pair capacity for an expected L0 (active latents per row): the bucket at
    or above HEADROOM x l0 x batch, within [MIN_CAPACITY, max_capacity]."""
    top = max_capacity(batch, n_latents)
    return min(max(bucket(HEADROOM * l0 * batch), MIN_CAPACITY), top)


def pairs_loss(model: Crosscoder, x, weights, lam, pre, pairs):
    """The L1 loss over `pairs` = (rows, cols, valid) from `active_pairs` of `pre` [B, h]
    (the pre-activations, without gradient) in the rows of nonzero weight; pairs past the
    capacity are left out (`l1.l1_loss_sparse` checks the count first). Returns (loss, aux)
    like `l1.l1_loss`."""
    n, h = pre.shape
    rows, cols, valid = pairs
    f = jnp.where(valid, pairs_values(model, x, pre, rows, cols), 0.0)
    x_hat = decode_pairs(model, f, rows, cols, n) + model.b_dec[...].astype(jnp.float32)
    mse = squared_error(x, x_hat, weights)
    per_latent = jax.ops.segment_sum(f * weights[rows], cols, num_segments=h)  # [h]
    norms = model.decoder_norms().sum(-1)
    sparsity = (per_latent * norms).sum() / jnp.maximum(weights.sum(), 1.0)
    f_dense = jax.nn.relu(pre)  # the metrics' activations: the dense path's values
    aux = {"f": f_dense, "x_hat": x_hat, "mse": mse, "sparsity": sparsity, "aux": 0.0}
    return mse + lam * sparsity, aux
