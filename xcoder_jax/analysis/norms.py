"""Relative decoder norms as the analysis reports them: the NRN math and the latent classes
live in `xcoder_jax.nrn` (re-exported here), the JSON histograms of the summary here.
"""

from __future__ import annotations

import numpy as np

from xcoder_jax.nrn import (
    CLASSES,
    DEAD,
    classify,
    dec_norm_diff,
    decoder_cosine,
    decoder_norms,
    latent_nrn,
    relative_norms,
)

__all__ = [
    "CLASSES",
    "DEAD",
    "classify",
    "dec_norm_diff",
    "decoder_cosine",
    "decoder_norms",
    "histogram",
    "latent_nrn",
    "relative_norms",
]


def histogram(values: np.ndarray, bins: int, lo: float = 0.0, hi: float = 1.0) -> dict:
    """{"edges": [bins + 1], "counts": [bins]} of `values` over [lo, hi] (JSON-ready)."""
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}
