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
- geometry: the structure gain at the largest size and its trend over sizes, against the base
  and against the sham-distilled model (same steps on replay and concise solutions, no traces);
- the negative-control pair (version 2): the same base distilled on the no-loop teacher. Steering
  its self-reflection set must not lengthen traces or add rounds as the loop pair's does, nor
  its deductive set shorten them as much (`Finding.minus`: the loop pair's effect minus the
  no-loop pair's, both over a random direction).

Version 2 (declared before any run of the reflective zoo, `zoo.teacher = "rounds"`) predicts, on
the loop pair: steering the self-reflection set raises self-reflection markers, reflection
rounds and trace length over a random direction and a random latent; steering the deductive set
shortens traces; both effects exceed the no-loop pair's; ablating the self-reflection set lowers
the reasoning-form " Wait" log-probability more than random latents, a random direction, and
the clean model's other likely tokens at the same positions; the distilled model's relations are
more structured than the sham's at the largest size, increasingly so with size.

Seeds in `EXPLORATORY_SEEDS` (seed 0, the `make demo` seed that was looked at while the study
was built) are run and shown, but never enter the confirmatory statistics.

Each finding reads one result key, an interval dict (`stats`), from one stage's results
(`replicate.STAGE_RESULTS`); a missing key is None: not measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from xcoder_jax import stats
from xcoder_jax.lexicon import CATEGORY_NAMES

FAMILY_VERSION = 2
FAMILY_SHA256 = "b155fc68f46a525a1254d51c698b3c719e603163ed10e7e135efc1ca3775eb3c"
EXPLORATORY_SEEDS: tuple[int, ...] = (0,)
ALPHA = 0.05  # family-wise error rate of the Holm correction

# Placeholders in a path, resolved from the geometry results it reads.
LARGEST, PCA_K = "<largest>", "<k>"


@dataclass(frozen=True)
class Finding:
    """A claim: the effect at `path` of stage `stage`'s results has sign `sign`; with `minus`
    (another (stage, path)), the effect is the difference of the two."""

    name: str
    claim: str
    sign: int  # +1: the effect is expected above 0; -1: below 0
    stage: str  # a key of `replicate.STAGE_RESULTS`
    path: tuple[str, ...]
    minus: tuple[str, tuple[str, ...]] | None = None

    @property
    def key(self) -> str:
        key = f"{self.stage}: {'.'.join(self.path)}"
        if self.minus is not None:
            key += f" - {self.minus[0]}: {'.'.join(self.minus[1])}"
        return key

    def read(self, results: dict) -> dict | None:
        """This finding's interval dict in one seed's {stage: results}, None if absent.

        A difference of two effects measured on different models (two crosscoders, two
        sets of steering samples) gets the interval of independent estimates
        (`stats.difference_ci`): mean a - b, SE sqrt(SE_a^2 + SE_b^2) from their 95%
        intervals, a zero-width interval counting as SE 0. The two pairs share prompts and
        sampling seeds, which can only correlate the two effects positively, so treating them
        as independent overstates the SE of the difference: conservative."""
        a = _read(results, self.stage, self.path)
        if self.minus is None or a is None:
            return a
        b = _read(results, *self.minus)
        return None if b is None else stats.difference_ci(a, b)


def _read(results: dict, stage: str, path: tuple[str, ...]) -> dict | None:
    obj = results.get(stage)
    if not isinstance(obj, dict):
        return None
    resolve = {LARGEST: obj.get("largest"), PCA_K: obj.get("plot_n_components")}
    for step in path:
        step = resolve.get(step, step)
        if not isinstance(obj, dict) or step is None or str(step) not in obj:
            return None
        obj = obj[str(step)]
    return obj if isinstance(obj, dict) else None


def _analysis_findings() -> list[Finding]:
    """Per reasoning category: its latents lean distilled (NRN) and its top latents are
    distilled-only more often than chance."""
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
    return out


def _ablation_findings() -> list[Finding]:
    """Per reasoning category, the three ablation contrasts of its headline set."""
    out = []
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
    return out


# (steered set, metric, expected sign, what the steering does)
_STEERED = (
    ("self_reflection:1", "self_reflection_per_100", +1, "raises self-reflection markers"),
    ("self_reflection:1", "reflection_rounds", +1, "adds reflection rounds"),
    ("self_reflection:1", "tokens", +1, "lengthens traces"),
    ("deductive:1", "tokens", -1, "shortens traces"),
)


def _steering_findings() -> list[Finding]:
    """Every steered set and metric against a random direction and a random latent."""
    out = []
    for spec, metric, sign, what in _STEERED:
        for control, against in (("direction", "a random direction"),
                                 ("latent", "a random latent")):  # fmt: skip
            out.append(Finding(
                f"steer_{spec.split(':')[0]}_{metric}_vs_random_{control}",
                f"steering along {spec} {what}, against {against}",
                sign, "steering", ("headline", spec, f"vs_random_{control}", metric),
            ))  # fmt: skip
    return out


def _no_loop_findings() -> list[Finding]:
    """The negative control: the loop pair's effect over a random direction minus the no-loop
    pair's, for the set and metrics that should loop only where the teacher looped."""
    out = []
    for spec, metric, sign, what in _STEERED[1:]:
        path = ("headline", spec, "vs_random_direction", metric)
        out.append(Finding(
            f"steer_{spec.split(':')[0]}_{metric}_loop_pair_minus_no_loop_pair",
            f"steering along {spec} {what} (over a random direction) more on the loop pair "
            "than on the no-loop pair",
            sign, "steering", path, minus=("steering_no_loop", path),
        ))  # fmt: skip
    return out


def _own_token_finding() -> Finding:
    """Ablating the self-reflection set hits its marker more than the other likely tokens."""
    return Finding(
        "ablate_self_reflection_lowers_marker_more_than_other_tokens",
        "ablating self_reflection latents lowers the reasoning-form marker's log-prob more "
        "than the clean model's likely non-marker tokens at the same positions (distilled)",
        -1, "ablation", ("categories", "self_reflection", "headline", "own_minus_others",
                         "distilled"),
    )  # fmt: skip


def _geometry_findings() -> list[Finding]:
    """The structure gain over the base and over the sham, at the largest size and its
    trend over sizes."""
    return [
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
        Finding(
            "geometry_distilled_more_structured_than_sham_at_largest_size",
            "largest size: the distilled model's relations beat shuffled pairings by more "
            "than the sham-distilled model's (structure gain over sham)",
            -1, "geometry", ("pairs", LARGEST, "pooled", PCA_K, "sham_gain"),
        ),
        Finding(
            "geometry_gain_over_sham_grows_with_size",
            "the structure gain over sham grows with size (slope against log10 parameters)",
            -1, "geometry", ("trend", "sham_gain_slope"),
        ),
    ]  # fmt: skip


def _declare() -> tuple[Finding, ...]:
    """The family, in its declared order: the order is part of `FAMILY_SHA256`."""
    return (
        *_analysis_findings(),
        *_ablation_findings(),
        *_steering_findings(),
        *_no_loop_findings(),
        _own_token_finding(),
        *_geometry_findings(),
    )


FAMILY: tuple[Finding, ...] = _declare()


def digest(family=FAMILY) -> str:
    """sha256 of what the family tests: names, expected signs, stages and paths (not the
    claims' wording)."""
    rows = [[f.name, f.sign, f.stage, list(f.path)] for f in family]
    rows = [r + ([f.minus[0], list(f.minus[1])] if f.minus else []) for r, f in zip(rows, family)]
    text = json.dumps(rows)
    return hashlib.sha256(text.encode()).hexdigest()
