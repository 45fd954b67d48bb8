"""Activation extraction from Hugging Face models and the on-disk activation store."""

from xcoder_jax.activations.extract import extract, merge, part_dir
from xcoder_jax.activations.manifest import FORMAT_VERSION, StoreError
from xcoder_jax.activations.models import PairError
from xcoder_jax.activations.reader import ActivationStore, BatchStream

__all__ = [
    "FORMAT_VERSION",
    "ActivationStore",
    "BatchStream",
    "PairError",
    "StoreError",
    "extract",
    "merge",
    "part_dir",
]
