"""Activation extraction from Hugging Face models and the on-disk activation store.

The store's reader needs neither torch nor transformers: the extraction's names are imported
on first use, so a training process (one per host) does not load torch.
"""

import importlib

from xcoder_jax.activations.manifest import FORMAT_VERSION, StoreError
from xcoder_jax.activations.reader import ActivationStore, BatchStream

_LAZY = {
    "extract": "xcoder_jax.activations.extract",
    "merge": "xcoder_jax.activations.extract",
    "part_dir": "xcoder_jax.activations.extract",
    "PairError": "xcoder_jax.activations.models",
}

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


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
