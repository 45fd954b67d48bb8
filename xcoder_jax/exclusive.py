"""Dedicated latents (Jiralerspong & Bricken 2026): which latents are base-only or
distilled-only BY CONSTRUCTION. The one place that states the layout.

`crosscoder.exclusive = (f_base, f_distilled)` (fractions of n_latents; (0, 0), the default,
makes none) gives n_b = round(f_base * h) base-only and n_d = round(f_distilled * h)
distilled-only latents, the LAST ones of the dictionary (h = n_latents):

    [0, h - n_b - n_d)        shared: both models' encoder and decoder rows train
    [h - n_b - n_d, h - n_d)  base-only: the distilled model's rows are 0
    [h - n_d, h)              distilled-only: the base model's rows are 0

Model slot 0 is the base model and slot 1 the distilled one (the store's order,
`workdir.ROLES`). A latent's rows for model m are W_enc[m, :, i] and W_dec[i, m]. The
crosscoder masks them at init and in every forward pass (`Crosscoder.model_mask`), so they
start at exactly 0 and their gradients, Adam moments and updates are exactly 0. The export
records the ranges in config.json (`record`, read back and checked by `from_export`) and
its weights hold the zeros: the normalisation scales multiply W_enc and divide W_dec, and a
centring mean moves the biases only.

Learned exclusives are the other kind: latents free to use both models whose NRN says they
use one (`nrn.classify`); the analysis reports the two apart.

Pure Python and NumPy: the analysis reads it without JAX.
"""

from __future__ import annotations

import numpy as np

from xcoder_jax.export import ExportError
from xcoder_jax.nrn import CLASSES

KEY = "exclusive"  # the export config.json's field
SIDES = ("base_only", "distilled_only")
NONE = (0, 0)


def counts(fractions, n_latents: int) -> tuple[int, int]:
    """(n_base_only, n_distilled_only) from the fractions (f_base, f_distilled)."""
    f_base, f_distilled = fractions
    return round(f_base * n_latents), round(f_distilled * n_latents)


def from_crosscoder(cc) -> tuple[int, int]:
    """The counts of a `config.crosscoder` section ((0, 0) without `exclusive`)."""
    return counts(cc.get(KEY, (0.0, 0.0)), cc.n_latents)


def ranges(n_latents: int, n: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """{"base_only": (lo, hi), "distilled_only": (lo, hi)}: half-open latent ranges of the
    counts `n` = (n_base_only, n_distilled_only)."""
    h, (nb, nd) = n_latents, n
    if nb < 0 or nd < 0 or nb + nd > h:
        raise ValueError(f"exclusive latent counts {n} do not fit in {h} latents")
    return {"base_only": (h - nb - nd, h - nd), "distilled_only": (h - nd, h)}


def record(n_latents: int, n: tuple[int, int]) -> dict:
    """The export config.json's fields for the counts `n`: {"exclusive": {"base_only":
    [lo, hi], "distilled_only": [lo, hi]}}, or {} without dedicated latents."""
    if tuple(n) == NONE:
        return {}
    return {KEY: {side: list(r) for side, r in ranges(n_latents, n).items()}}


def from_export(config: dict, n_latents: int | None = None) -> dict[str, tuple[int, int]] | None:
    """The ranges an export's config.json records; None when it records none.

    ExportError unless they are the layout above for `n_latents` (default: the config's
    "n_latents", else the end of the distilled-only range): both sides present, each a
    [lo, hi] pair, together the last latents, base-only before distilled-only."""
    config = config or {}
    found = config.get(KEY)
    if not found:
        return None
    try:
        got = {side: (int(found[side][0]), int(found[side][1])) for side in SIDES}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ExportError(f"{KEY} = {found!r}: must map {SIDES} to [lo, hi] latent ranges") from e
    h = int(n_latents if n_latents is not None else config.get("n_latents", got[SIDES[1]][1]))
    n = tuple(hi - lo for lo, hi in (got[side] for side in SIDES))
    fits = min(n) >= 0 and sum(n) <= h
    if not fits or got != ranges(h, n):
        expected = f"for counts {n}: {ranges(h, n)}" if fits else f"counts {n} do not fit"
        raise ExportError(
            f"{KEY} = {found!r}: must be the last latents of the export's {h}, base-only "
            f"then distilled-only ({expected})"
        )
    return got


def export_counts(config: dict, n_latents: int | None = None) -> tuple[int, int]:
    """(n_base_only, n_distilled_only) an export's config.json records; (0, 0) if none
    (`from_export`: ExportError for ranges that are not the documented layout)."""
    found = from_export(config, n_latents)
    if found is None:
        return NONE
    return tuple(hi - lo for lo, hi in (found[s] for s in SIDES))


def structural_classes(n_latents: int, found: dict | None) -> np.ndarray:
    """[n_latents] int8 in `nrn.CLASSES` indices: "base_only" (0) structurally base-only,
    "distilled_only" (2) structurally distilled-only, "shared" (1) free to use both models;
    `found`: `from_export`'s ranges or None."""
    out = np.full(n_latents, CLASSES.index("shared"), np.int8)
    for side in SIDES:
        lo, hi = (found or {}).get(side, (0, 0))
        out[lo:hi] = CLASSES.index(side)
    return out
