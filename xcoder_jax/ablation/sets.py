"""The ablation's targeted latent sets: chosen by a rule, cut by a quantile, described.

A rule scores every latent for a category on the TRAINING shards and says which pass
(`specificity.Specificity`, `attribution.Attribution`). The quantile `frac` is taken over
the latents that pass AND have NRN above the cut, ranked by score: frac 0.5 keeps the better
half of them, frac 0.1 the top tenth (at least one), so a frac sweep is a dose-response of
ever more selective sets, not one set repeated.

Every set is reported with what it is (`selection.describe`): its size, NRN summary, how
many latents are distilled-only, and each latent's score and top token.
"""

from __future__ import annotations

import math

import numpy as np


def qualifying_pool(passes, nrn, min_nrn: float) -> np.ndarray:
    """Ids of the latents that pass a rule (passes [h] bool) with NRN (nrn [h]) > min_nrn."""
    return np.flatnonzero(np.asarray(passes, bool) & (np.asarray(nrn) > min_nrn))


def targeted_latents(score, passes, nrn, *, frac: float, min_nrn: float) -> np.ndarray:
    """Ids (by descending score) of the top `frac` of `qualifying_pool`.

    score, passes, nrn: [h]. Empty when none qualifies.
    """
    score = np.asarray(score)
    pool = qualifying_pool(passes, nrn, min_nrn)
    if not len(pool):
        return np.zeros(0, np.int64)
    ranked = pool[np.argsort(-score[pool], kind="stable")]
    return ranked[: max(1, math.ceil(frac * len(ranked)))].astype(np.int64)


def pool_size(passes, nrn, min_nrn: float) -> int:
    return len(qualifying_pool(passes, nrn, min_nrn))
