"""The declared family of findings: every claim the replication tests, in one list.

The family was written down before any replication seed was run and is never edited after
seeing results. It is the study's whole set of confirmatory hypotheses, and the multiplicity
correction (`replicate`: Holm over the family) counts every one of them, so a finding cannot
be dropped, added or re-aimed once its numbers are known. Changing the family means a new
`FAMILY_VERSION` and a new replication; `FAMILY_SHA256` pins the declaration (names, expected
signs, the result keys read), and the tests fail when the two disagree.

What it holds, regardless of which way any run leaned:

- every reasoning category (`lexicon.CATEGORY_NAMES`) in every per-category test: the
  analysis' NRN and distilled-only tests and the three ablation contrasts;
- every causal test with each of its controls: ablation against activity-matched random
  latents and against a random direction of the same norm, and distilled against base;
  steering against a random direction and against a random latent;
- geometry: the structure gain at the largest size and its trend over sizes.

Seeds in `EXPLORATORY_SEEDS` (seed 0, the `make demo` seed that was looked at while the study
was built) are run and shown, but never enter the confirmatory statistics.

Each finding reads one result key, an interval dict (`stats`), from one stage's results
(`replicate.STAGE_RESULTS`); a missing key is None: not measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from xcoder_jax.lexicon import CATEGORY_NAMES

FAMILY_VERSION = 1
FAMILY_SHA256 = "5c23d226aa31d427e4ad0b01aecde19cc7f47fee1104b24a410c3f04857b33de"
EXPLORATORY_SEEDS: tuple[int, ...] = (0,)
ALPHA = 0.05  # family-wise error rate of the Holm correction

# Placeholders in a path, resolved from the geometry results it reads.
LARGEST, PCA_K = "<largest>", "<k>"


@dataclass(frozen=True)
class Finding:
    """A claim: the effect at `path` of stage `stage`'s results has sign `sign`."""

    name: str
    claim: str
    sign: int  # +1: the effect is expected above 0; -1: below 0
    stage: str  # "analysis", "ablation", "steering" or "geometry"
    path: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.stage}: {'.'.join(self.path)}"

    def read(self, results: dict) -> dict | None:
        """This finding's interval dict in one seed's {stage: results}, None if absent."""
        obj = results.get(self.stage)
        if not isinstance(obj, dict):
            return None
        resolve = {LARGEST: obj.get("largest"), PCA_K: obj.get("plot_n_components")}
        for step in self.path:
            step = resolve.get(step, step)
            if not isinstance(obj, dict) or step is None or str(step) not in obj:
                return None
            obj = obj[str(step)]
        return obj if isinstance(obj, dict) else None


def _declare() -> tuple[Finding, ...]:
    out = []
    for cat in CATEGORY_NAMES:
        out += [
            Finding(
                f"{cat}_latents_lean_distilled",
                f"{cat} latents: mean NRN above the other alive latents",
                +1, "analysis", ("categories", cat, "nrn_minus_alive"),
            ),
            Finding(
                f"{cat}_top_latents_distilled_only",
                f"{cat} latents: distilled-only over-represented among the top ones",
                +1, "analysis", ("categories", cat, "top_distilled_only", "excess"),
            ),
        ]  # fmt: skip
    for cat in CATEGORY_NAMES:
        head = ("categories", cat, "headline")
        out += [
            Finding(
                f"ablate_{cat}_beats_random_latents",
                f"ablating {cat} latents lowers the marker log-prob more than matched "
                "random latents (distilled)",
                -1, "ablation", (*head, "distilled", "targeted_minus_random"),
            ),
            Finding(
                f"ablate_{cat}_beats_random_direction",
                f"ablating {cat} latents lowers the marker log-prob more than a random "
                "direction of the same norm (distilled)",
                -1, "ablation", (*head, "distilled", "targeted_minus_direction"),
            ),
            Finding(
                f"ablate_{cat}_distilled_more_than_base",
                f"ablating {cat} latents lowers the marker log-prob more in the distilled "
                "model than in the base",
                -1, "ablation", (*head, "distilled_minus_base"),
            ),
        ]  # fmt: skip
    steered = (
        ("self_reflection:1", "self_reflection_per_100", +1, "raises self-reflection markers"),
        ("self_reflection:1", "reflection_rounds", +1, "adds reflection rounds"),
        ("deductive:1", "tokens", -1, "shortens traces"),
    )
    for spec, metric, sign, what in steered:
        for control, against in (("direction", "a random direction"),
                                 ("latent", "a random latent")):  # fmt: skip
            out.append(Finding(
                f"steer_{spec.split(':')[0]}_{metric}_vs_random_{control}",
                f"steering along {spec} {what}, against {against}",
                sign, "steering", ("headline", spec, f"vs_random_{control}", metric),
            ))  # fmt: skip
    out += [
        Finding(
            "geometry_distilled_more_structured_at_largest_size",
            "largest size: the distilled model's relations beat shuffled pairings by more "
            "than the base's (structure gain)",
            -1, "geometry", ("pairs", LARGEST, "pooled", PCA_K, "structure_gain"),
        ),
        Finding(
            "geometry_structure_gain_grows_with_size",
            "the structure gain grows with size (slope against log10 parameters)",
            -1, "geometry", ("trend", "slope"),
        ),
    ]  # fmt: skip
    return tuple(out)


FAMILY: tuple[Finding, ...] = _declare()


def digest(family=FAMILY) -> str:
    """sha256 of what the family tests: names, expected signs, stages and paths (not the
    claims' wording)."""
    text = json.dumps([[f.name, f.sign, f.stage, list(f.path)] for f in family])
    return hashlib.sha256(text.encode()).hexdigest()
