"""Confidence intervals every finding of the study is reported with, in one place.

Every interval is a two-sided 95% interval and comes back as a dict
`{"mean", "lo", "hi", "n", "method"}`; a statistic that cannot be computed (too few values)
has `None` for the numbers it lacks and a `"reason"`, so results files stay strict JSON.

- `t_ci`: mean of independent values, Student-t interval (the right one at small n).
- `paired_ci`: mean of paired differences a - b (same prompts, seeds or pairs), t interval.
- `welch_ci`: difference of the means of two independent groups, Welch-t interval.
- `proportion_ci`: a share k / n with its Wilson score interval, optionally minus a baseline.
- `cluster_bootstrap_ci`: mean over units (e.g. marker occurrences) when the units come in
  clusters (documents) that are not independent inside: clusters are resampled with
  replacement (percentile interval). An optional second axis of replicates (e.g. random
  latent draws) is resampled too, so a control's draw-to-draw spread widens the interval.
- `percentile_ci`: the interval of a statistic from its bootstrap replicates (any design).
- `format_ci`: "mean [lo, hi]" for summaries and reports.
- `excludes_zero`: whether an interval says the effect is real at this level (a zero-width
  interval never does: it measured no spread, not certainty).

Across replications (seeds), in `meta_analysis` and importable from here: `se_from_ci`,
`difference_ci`, `random_effects`, `holm`, `holm_adjusted`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from xcoder_jax.interval_dict import LEVEL, no_interval
from xcoder_jax.meta_analysis import (
    DIFFERENCE,
    RANDOM_EFFECTS,
    difference_ci,
    holm,
    holm_adjusted,
    random_effects,
    se_from_ci,
)

__all__ = [
    "DIFFERENCE",
    "LEVEL",
    "N_BOOT",
    "RANDOM_EFFECTS",
    "cluster_bootstrap_ci",
    "difference_ci",
    "excludes_zero",
    "format_ci",
    "holm",
    "holm_adjusted",
    "paired_ci",
    "percentile_ci",
    "proportion_ci",
    "random_effects",
    "se_from_ci",
    "sign",
    "t_ci",
    "welch_ci",
]

N_BOOT = 2000


def t_ci(values, level: float = LEVEL) -> dict:
    """Mean of independent values [n] with its Student-t interval (n - 1 dof)."""
    v = np.asarray(values, np.float64).ravel()
    n = len(v)
    method = "mean; Student-t 95% CI"
    if n == 0:
        return no_interval(0, method, "no values")
    if not np.isfinite(v).all():
        return no_interval(n, method, "non-finite values")
    mean = float(v.mean())
    if n < 2:
        return no_interval(n, method, "one value: no spread to estimate", mean)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "method": method}


def paired_ci(a, b, level: float = LEVEL) -> dict:
    """Mean of a - b over paired units (a[i] and b[i] share prompt, seed, ...), t interval."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    out = t_ci(a - b, level)
    out["method"] = "mean paired difference; Student-t 95% CI"
    return out


def welch_ci(a, b, level: float = LEVEL) -> dict:
    """Mean of a minus mean of b for independent groups, Welch-t interval."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    method = "difference of means; Welch-t 95% CI"
    n = len(a) + len(b)
    if not len(a) or not len(b):
        return no_interval(n, method, "an empty group")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return no_interval(n, method, "non-finite values")
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return no_interval(n, method, "a group with one value: no spread to estimate", mean)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # both groups constant: a zero-width "interval" would claim certainty
        return no_interval(n, method, "no spread in either group: no interval to estimate", mean)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(sps.t.ppf(0.5 + level / 2, dof) * se)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "method": method}


def proportion_ci(k: int, n: int, baseline: float = 0.0, level: float = LEVEL) -> dict:
    """k / n - baseline with the Wilson score interval of k / n (shifted by the baseline)."""
    method = "share minus baseline; Wilson score 95% CI"
    if n <= 0:
        return no_interval(0, method, "no trials")
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return {"mean": p - baseline, "lo": centre - half - baseline, "hi": centre + half - baseline,
            "n": int(n), "method": method}  # fmt: skip


def cluster_bootstrap_ci(
    values,
    clusters,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """Mean of `values` with a percentile interval from resampling `clusters`.

    values: [n] per unit, or [r, n] with r replicates per unit (e.g. random draws): the
    statistic is then the mean over replicates and units, and each bootstrap sample also
    resamples the r replicates. clusters: [n] cluster id of each unit (e.g. document id).
    """
    v = np.asarray(values, np.float64)
    v = v[None] if v.ndim == 1 else v
    groups = np.asarray(clusters)
    r, n = v.shape
    method = f"mean; 95% percentile bootstrap ({n_boot} resamples of clusters"
    method += ", and of the replicates)" if r > 1 else ")"
    if n == 0 or r == 0:
        return no_interval(0, method, "no values")
    if groups.shape != (n,):
        raise ValueError(f"clusters must have shape ({n},), got {groups.shape}")
    if not np.isfinite(v).all():
        return no_interval(n, method, "non-finite values")
    mean = float(v.mean())
    ids, inverse = np.unique(groups, return_inverse=True)
    if len(ids) < 2:
        return no_interval(n, method, "one cluster: no spread to estimate", mean)
    # Per cluster: summed value of each replicate and unit count, so one resample is a
    # weighted sum over clusters instead of a gather over units.
    sums = np.zeros((r, len(ids)))
    np.add.at(sums.T, inverse, v.T)
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=n_boot)
    reps = rng.integers(0, r, size=(n_boot, r))
    rep_sums = np.stack([sums[k].sum(0) for k in reps])  # [n_boot, clusters]
    boot = (weights * rep_sums).sum(1) / (r * (weights @ counts))
    return percentile_ci(mean, boot, n, method, level=level)


def percentile_ci(
    mean: float | None,
    replicates,
    n: int,
    method: str,
    reason: str | None = None,
    level: float = LEVEL,
) -> dict:
    """The percentile interval of a statistic (full-sample value `mean`) from its bootstrap
    `replicates` [n_boot]; None replicates give an interval-less dict with `reason`."""
    if replicates is None:
        return no_interval(n, method, reason or "no bootstrap replicates", mean)
    lo, hi = np.quantile(np.asarray(replicates, np.float64), [(1 - level) / 2, (1 + level) / 2])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": int(n), "method": method}


def excludes_zero(ci: dict | None) -> bool:
    """Whether a computed interval of non-zero width lies entirely on one side of 0.

    A zero-width interval (lo == hi: no spread was measured, e.g. constant values) is never
    decisive: it says nothing about how far the effect could be from its point estimate.
    """
    if not ci or ci.get("lo") is None or ci.get("hi") is None:
        return False
    if not ci["lo"] < ci["hi"]:
        return False
    return ci["lo"] > 0 or ci["hi"] < 0


def sign(ci: dict | None) -> int:
    """+1 / -1 when the interval lies above / below 0, 0 when it includes 0 or is missing."""
    if not excludes_zero(ci):
        return 0
    return 1 if ci["lo"] > 0 else -1


def format_ci(ci: dict | None, fmt: str = "{:+.2f}") -> str:
    """ "+0.72 [+0.45, +0.99]", "+0.72 (no CI: <reason>)" or "n/a (<reason>)"."""
    if not ci or ci.get("mean") is None:
        return f"n/a ({(ci or {}).get('reason', 'not measured')})"
    text = fmt.format(ci["mean"])
    if ci.get("lo") is None or ci.get("hi") is None:
        return f"{text} (no CI: {ci.get('reason', 'no interval')})"
    return f"{text} [{fmt.format(ci['lo'])}, {fmt.format(ci['hi'])}]"
