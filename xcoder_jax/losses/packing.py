"""The True entries of a [B, h] mask as a static number of (row, column) slots, without a
scatter or a cumulative sum over every entry (both cost more than the encoder's GEMM on a
CPU): what the sparse L1 step's active pairs and BatchTopK's fast selection are packed
with."""

from __future__ import annotations

import jax
import jax.numpy as jnp

WORD = 32  # bits of the words `active_pairs` packs the active entries into


def _select_bit(words: jax.Array, k: jax.Array) -> jax.Array:
    """The position of the (k + 1)-th set bit of each word (uint32 [C], k int32 [C]): a
    binary search over halves, by the population counts of their lower bits."""
    pos = jnp.zeros_like(k)
    for width in (16, 8, 4, 2, 1):
        low = jax.lax.population_count(words & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
        up = k >= low  # past the lower `width` bits
        k, pos = jnp.where(up, k - low, k), jnp.where(up, pos + width, pos)
        words = jnp.where(up, words >> width, words)
    return pos


def active_pairs(active: jax.Array, capacity: int):
    """The True entries of `active` [B, h] in row-major order, packed into `capacity` slots:
    (rows, cols, valid, count): int32 [capacity] x 2, bool [capacity] and the number of True
    entries int32 []. The slots past the count hold (0, 0), not valid; when the entries
    overflow the capacity, the slots hold the first ones.

    One pass over B x h packs the entries into 32-bit words; a cumulative sum over the words'
    population counts and a binary search per slot find each slot's word, and `_select_bit`
    its bit: O(B h / 32 + capacity log(B h)), with no scatter over B x h (a cumulative sum or
    a scatter over every entry costs more than the encoder's GEMM on a CPU)."""
    n, h = active.shape
    if n * h >= 2**31:
        raise ValueError(f"{n} x {h} entries: the pair indices would overflow int32")
    flat = active.reshape(-1)
    flat = jnp.pad(flat, (0, (-flat.shape[0]) % WORD)).reshape(-1, WORD).astype(jnp.uint32)
    words = (flat << jnp.arange(WORD, dtype=jnp.uint32)).sum(1, dtype=jnp.uint32)  # OR
    counts = jax.lax.population_count(words).astype(jnp.int32)
    inclusive = jnp.cumsum(counts)
    slot = jnp.arange(capacity, dtype=jnp.int32)
    word = jnp.searchsorted(inclusive, slot + 1, side="left", method="scan_unrolled")
    word = jnp.minimum(word, words.shape[0] - 1)  # slots past the count: any word
    rank = slot - (inclusive[word] - counts[word])  # among the word's set bits
    valid = slot < inclusive[-1]
    index = jnp.where(valid, word * WORD + _select_bit(words[word], rank), 0)
    return index // h, index % h, valid, inclusive[-1]
