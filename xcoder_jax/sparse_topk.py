"""The sparse BatchTopK path now lives with the rest of its loss kind, in
`xcoder_jax.losses.batchtopk`; these names are kept for the scripts that import them here."""

from __future__ import annotations

from xcoder_jax.losses.batchtopk import SPARSE_MIN_RATIO, batchtopk_loss_sparse, use_sparse

__all__ = ["SPARSE_MIN_RATIO", "batchtopk_loss_sparse", "use_sparse"]
