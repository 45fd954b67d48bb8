"""Statistics across independent replications (seeds) of the study.

- `se_from_ci`: the standard error a 95% interval implies, (hi - lo) / (2 * 1.96).
- `difference_ci`: a - b for two independent estimates given as interval dicts.
- `random_effects`: effects of independent replications (seeds) pooled by DerSimonian-Laird
  random effects, with a Hartung-Knapp t interval and a two-sided p-value.
- `holm`, `holm_adjusted`: Holm-Bonferroni step-down decisions over a family of p-values.

Estimates and results are the interval dicts of `interval_dict`; `stats` re-exports these.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from xcoder_jax.interval_dict import LEVEL, no_interval


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
        return no_interval(n, DIFFERENCE, "an estimate without a mean")
    mean = float(a["mean"] - b["mean"])
    # An interval of zero width (every paired difference the same) is an SE of 0.
    se_a, se_b = ((se_from_ci(x, level) or 0.0) if _has_interval(x) else None for x in (a, b))
    if se_a is None or se_b is None:
        return no_interval(n, DIFFERENCE, "an estimate without an interval", mean)
    if se_a == se_b == 0.0:
        return no_interval(n, DIFFERENCE, "both intervals have zero width: no spread to use", mean)
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
        return no_interval(0, RANDOM_EFFECTS, "no replications") | extra
    if not (np.isfinite(y).all() and np.isfinite(s).all() and (s > 0).all()):
        return (
            no_interval(k, RANDOM_EFFECTS, "a non-finite effect or a standard error not > 0")
            | extra
        )
    if k < 2:
        reason = "one replication: no between-replication spread to estimate"
        return no_interval(k, RANDOM_EFFECTS, reason, float(y[0])) | extra
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
