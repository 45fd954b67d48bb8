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
- `se_from_ci`: the standard error a 95% interval implies, (hi - lo) / (2 * 1.96).
- `random_effects`: effects of independent replications (seeds) pooled by DerSimonian-Laird
  random effects, with a Hartung-Knapp t interval and a two-sided p-value.
- `holm`, `holm_adjusted`: Holm-Bonferroni step-down decisions over a family of p-values.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
N_BOOT = 2000


def _none(n: int, method: str, reason: str, mean: float | None = None) -> dict:
    return {"mean": mean, "lo": None, "hi": None, "n": int(n), "method": method, "reason": reason}


def t_ci(values, level: float = LEVEL) -> dict:
    """Mean of independent values [n] with its Student-t interval (n - 1 dof)."""
    v = np.asarray(values, np.float64).ravel()
    n = len(v)
    method = "mean; Student-t 95% CI"
    if n == 0:
        return _none(0, method, "no values")
    if not np.isfinite(v).all():
        return _none(n, method, "non-finite values")
    mean = float(v.mean())
    if n < 2:
        return _none(n, method, "one value: no spread to estimate", mean)
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
        return _none(n, method, "an empty group")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return _none(n, method, "non-finite values")
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return _none(n, method, "a group with one value: no spread to estimate", mean)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # both groups constant: a zero-width "interval" would claim certainty
        return _none(n, method, "no spread in either group: no interval to estimate", mean)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(sps.t.ppf(0.5 + level / 2, dof) * se)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "method": method}


def proportion_ci(k: int, n: int, baseline: float = 0.0, level: float = LEVEL) -> dict:
    """k / n - baseline with the Wilson score interval of k / n (shifted by the baseline)."""
    method = "share minus baseline; Wilson score 95% CI"
    if n <= 0:
        return _none(0, method, "no trials")
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
        return _none(0, method, "no values")
    if groups.shape != (n,):
        raise ValueError(f"clusters must have shape ({n},), got {groups.shape}")
    if not np.isfinite(v).all():
        return _none(n, method, "non-finite values")
    mean = float(v.mean())
    ids, inverse = np.unique(groups, return_inverse=True)
    if len(ids) < 2:
        return _none(n, method, "one cluster: no spread to estimate", mean)
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
        return _none(n, method, reason or "no bootstrap replicates", mean)
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


# --- Across replications (seeds) -------------------------------------------------------


def se_from_ci(ci: dict | None, level: float = LEVEL) -> float | None:
    """The standard error a two-sided `level` interval implies: (hi - lo) / (2 * 1.96) at 95%.

    Exact for a normal interval; approximate for the others (a Student-t interval's se is
    overstated by t / 1.96, a percentile bootstrap interval is read as a normal one of the
    same width). None without an interval of positive width.
    """
    if not ci or ci.get("lo") is None or ci.get("hi") is None or not ci["lo"] < ci["hi"]:
        return None
    return (ci["hi"] - ci["lo"]) / (2 * float(sps.norm.ppf(0.5 + level / 2)))


DIFFERENCE = "difference of two independent estimates; normal 95% CI, SE from their intervals"


def _has_interval(ci: dict) -> bool:
    return ci.get("lo") is not None and ci.get("hi") is not None and ci["lo"] <= ci["hi"]


def difference_ci(a: dict, b: dict, level: float = LEVEL) -> dict:
    """The interval dict of a - b for two independent estimates given as interval dicts:
    mean a - b, SE sqrt(se_a^2 + se_b^2) (`se_from_ci`), a normal interval. Without an
    interval on either side, only the mean (None when either mean is missing)."""
    n = min(a.get("n") or 0, b.get("n") or 0)
    if a.get("mean") is None or b.get("mean") is None:
        return _none(n, DIFFERENCE, "an estimate without a mean")
    mean = float(a["mean"] - b["mean"])
    # An interval of zero width (every paired difference the same) is an SE of 0.
    se_a, se_b = ((se_from_ci(x, level) or 0.0) if _has_interval(x) else None for x in (a, b))
    if se_a is None or se_b is None:
        return _none(n, DIFFERENCE, "an estimate without an interval", mean)
    if se_a == se_b == 0.0:
        return _none(n, DIFFERENCE, "both intervals have zero width: no spread to use", mean)
    half = float(sps.norm.ppf(0.5 + level / 2)) * math.hypot(se_a, se_b)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "method": DIFFERENCE}


RANDOM_EFFECTS = (
    "DerSimonian-Laird random-effects pooled effect; Hartung-Knapp t 95% CI with k - 1 dof "
    "(its variance never below the DerSimonian-Laird one); two-sided p-value"
)


def random_effects(effects, ses, level: float = LEVEL) -> dict:
    """Effects of k independent replications with their standard errors, pooled.

    DerSimonian-Laird: fixed-effect weights w_i = 1 / se_i^2 give Q = sum w_i (y_i - y_w)^2;
    the between-replication variance is tau^2 = max(0, (Q - (k - 1)) / (sum w - sum w^2 /
    sum w)); the pooled effect is the mean weighted by 1 / (se_i^2 + tau^2). Its interval is
    Hartung-Knapp's (a t quantile with k - 1 dof on the weighted spread of the effects about
    the pooled one), with that variance floored at the DerSimonian-Laird one (1 / sum of the
    weights), so a few replications that happen to agree closely do not give a narrower
    interval than their own standard errors allow. `p` is the two-sided p-value of the same
    t statistic; `tau` the between-replication SD, `I2` the share of Q beyond chance.

    Returns the interval dict (`mean, lo, hi, n, method`) plus `k, tau, tau2, Q, I2, dof,
    p`; with fewer than 2 replications only `mean` (k = 1) and a `reason`.
    """
    y, s = np.asarray(effects, np.float64).ravel(), np.asarray(ses, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"one standard error per effect, got {y.shape} and {s.shape}")
    k = len(y)
    extra = {"k": k, "tau": None, "tau2": None, "Q": None, "I2": None, "dof": None, "p": None}
    if k == 0:
        return _none(0, RANDOM_EFFECTS, "no replications") | extra
    if not (np.isfinite(y).all() and np.isfinite(s).all() and (s > 0).all()):
        return _none(k, RANDOM_EFFECTS, "a non-finite effect or a standard error not > 0") | extra
    if k < 2:
        reason = "one replication: no between-replication spread to estimate"
        return _none(k, RANDOM_EFFECTS, reason, float(y[0])) | extra
    w = 1.0 / s**2
    fixed = float((w * y).sum() / w.sum())
    q = float((w * (y - fixed) ** 2).sum())
    dof = k - 1
    tau2 = max(0.0, (q - dof) / float(w.sum() - (w**2).sum() / w.sum()))
    ws = 1.0 / (s**2 + tau2)
    mean = float((ws * y).sum() / ws.sum())
    spread = float((ws * (y - mean) ** 2).sum()) / dof
    se = math.sqrt(max(spread, 1.0) / float(ws.sum()))
    half = float(sps.t.ppf(0.5 + level / 2, dof)) * se
    p = float(2 * sps.t.sf(abs(mean) / se, dof))
    i2 = max(0.0, (q - dof) / q) if q > 0 else 0.0
    extra = {"k": k, "tau": math.sqrt(tau2), "tau2": tau2, "Q": q, "I2": i2, "dof": dof, "p": p}
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": k,
            "method": RANDOM_EFFECTS} | extra  # fmt: skip


def holm_adjusted(p_values) -> list[float | None]:
    """Holm-adjusted p-values: the i-th smallest p becomes max over j <= i of
    min(1, (m - j + 1) p_(j)), m the family size; Holm rejects where it is <= alpha.

    A None p-value (a finding that could not be measured) stays None and still counts in m:
    failing to measure a finding never loosens the correction of the others.
    """
    p = list(p_values)
    for v in p:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1] (or be None), got {v}")
    m = len(p)
    measured = sorted((v, i) for i, v in enumerate(p) if v is not None)
    out: list[float | None] = [None] * m
    running = 0.0
    for rank, (v, i) in enumerate(measured):
        running = max(running, min(1.0, (m - rank) * v))
        out[i] = running
    return out


def holm(p_values, alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni step-down decisions over one family of p-values, in their order.

    Sorted ascending, p_(i) (i = 1..m) is rejected while every p_(j), j <= i, is <= alpha /
    (m - j + 1); the first one that is not stops the procedure. None p-values are never
    rejected and count in the family size m (see `holm_adjusted`).
    """
    return [q is not None and q <= alpha for q in holm_adjusted(p_values)]
