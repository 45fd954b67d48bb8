"""The facts the analysis reports per latent, each computed once, in one typed structure.

`DecoderFacts` come from the export alone (relative decoder norms, NRN bands, decoder norms
per model, the cosine of the two decoder rows, the diffing toolkit's `dec_norm_diff`); they
decide which latents get a latent-scaling fit before the store is read. `LatentFacts` add
what the pass over the store measured (firing frequencies, alive or dead, the class every
output reports). summary.json, latents.jsonl, the report and the browser all read them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from xcoder_jax import exclusive as excl
from xcoder_jax import nrn as nrn_math


@dataclass(frozen=True)
class DecoderFacts:
    """Per latent, from the decoder alone (arrays of length h; norms [h, m], normalised units).

    base, distilled: the model slots of the two roles.
    """

    base: int
    distilled: int
    nrn: np.ndarray  # NRN with the configured norm (0 base-only, 1 distilled-only)
    bands: np.ndarray  # int8 NRN band (`nrn.classify` without deadness)
    norms_l1: np.ndarray
    norms_l2: np.ndarray
    cosine: np.ndarray  # cosine of the base and distilled decoder rows
    dec_norm_diff: np.ndarray  # the diffing toolkit's relative norm (1 base-only)
    # int8 class a dedicated latent is held to by construction (0 base-only, 2 distilled-only;
    # 1: free to use both models), `exclusive.structural_classes`
    structural: np.ndarray

    @classmethod
    def build(cls, w_norm: np.ndarray, roles: list[str], ac, exclusive=None) -> DecoderFacts:
        """From the decoder [h, m, d] in NORMALISED units (`ExportedCrosscoder.
        normalised_decoder`), the slots' roles, the `analysis` config section and the
        dedicated latents' ranges (`ExportedCrosscoder.exclusive`, None: none)."""
        base, dist = roles.index("base"), roles.index("distilled")
        nrn = nrn_math.latent_nrn(w_norm, roles, ac.norm)
        n_l2 = nrn_math.decoder_norms(w_norm, "l2")
        return cls(
            base=base,
            distilled=dist,
            nrn=nrn,
            # The NRN bands alone: which latents get a latent-scaling fit is decided before
            # the store pass that tells which latents are dead.
            bands=nrn_math.classify(nrn, ac.base_only_max, ac.distilled_only_min),
            norms_l1=nrn_math.decoder_norms(w_norm, "l1"),
            norms_l2=n_l2,
            cosine=nrn_math.decoder_cosine(w_norm, base, dist),
            dec_norm_diff=nrn_math.dec_norm_diff(n_l2, base, dist),
            structural=excl.structural_classes(len(nrn), exclusive),
        )


@dataclass(frozen=True)
class LatentFacts(DecoderFacts):
    """`DecoderFacts` and what the store pass measured (arrays of length h)."""

    freq_heldout: np.ndarray  # share of held-out rows with f > 0
    freq_store: np.ndarray  # share of all store rows with f > 0
    alive: np.ndarray  # bool: fired on a held-out row (the rows of FVE and dead fraction)
    alive_store: np.ndarray  # bool: fired on any store row (the rows categories are read on)
    classes: np.ndarray  # int8 class every output reports: the NRN band, or dead

    @classmethod
    def measured(cls, decoder: DecoderFacts, scan, *, store_rows: int, ac) -> LatentFacts:
        """`decoder` with the firing of `scan` (`stream.ScanResult`) over a store of
        `store_rows` rows; classes with the bands of the `analysis` config section `ac`."""
        alive = scan.fire_heldout > 0
        return cls(
            **{f.name: getattr(decoder, f.name) for f in fields(DecoderFacts)},
            freq_heldout=scan.fire_heldout / max(scan.heldout_rows, 1),
            freq_store=scan.fire_count / max(store_rows, 1),
            alive=alive,
            alive_store=scan.fire_count > 0,
            classes=nrn_math.classify(decoder.nrn, ac.base_only_max, ac.distilled_only_min, alive),
        )

    @property
    def n_latents(self) -> int:
        return len(self.nrn)
