"""Geometry against model size: a least-squares slope with a bootstrap interval.

"Larger distilled models are more structured" is a claim about a trend, so it is tested as
one: the pooled statistic of each model pair (mean over relations, `bootstrap.pooled`) is
fitted against log10 of the pair's parameter count,

    slope = sum_i (x_i - mean x) (y_i - mean y) / sum_i (x_i - mean x)^2,

per decade of parameters, and refitted on every bootstrap replicate: replicate b of the
slope uses replicate b of every size's pooled statistic. The word pairs resampled are the
same wherever the same word pairs are scored (the study seeds each relation's resamples by
its word pairs), so sizes scoring the same words are resampled jointly, as one sample of
words scored by every model; sizes scoring different words are resampled independently.
The models themselves are fixed: the interval is over the choice of word pairs only.

Fewer than 2 sizes (or one parameter count for all) leave the slope `None` with a reason.
The gain over the sham model is fitted over the sizes that have one; where fewer than 2 do,
its slope is absent (not None) and "sham_gain_reason" says why.
"""

from __future__ import annotations

import math

import numpy as np

from xcoder_jax import workdir as wd
from xcoder_jax.geometry.bootstrap import GAINS
from xcoder_jax.stats import percentile_ci

X = "log10 parameters of the pair's models"
METHOD = (
    "least-squares slope of the pooled mean over relations against log10(parameters), per "
    "decade; 95% percentile bootstrap ({} resamples of word pairs, the same word pairs "
    "resampled jointly at every size, slope refitted on each)"
)
STATS = (*GAINS, "base_minus_distilled")  # the pooled statistics fitted
# Gains over a model some sizes lack (the sham): {statistic: that model's role}.
OPTIONAL = {gain: role for gain, role in GAINS.items() if role not in wd.ROLES}


def slope_key(stat: str) -> str:
    """The key of a statistic's slope in `size_trend`: "slope" for the structure gain (the
    headline), "<stat>_slope" for the others."""
    return "slope" if stat == "structure_gain" else f"{stat}_slope"


def slopes(x, y) -> np.ndarray:
    """Least-squares slope of `y: [..., m]` against `x: [m]` over the last axis -> `[...]`."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc = x - x.mean()
    return (y - y.mean(-1, keepdims=True)) @ xc / (xc @ xc)


def slope_ci(x, means, boots, n_boot: int) -> dict | None:
    """The slope of `means: [m]` against `x: [m]` with the percentile interval of the slopes
    refitted on `boots: [m, n_boot]` (replicate b of every point), or None when it cannot
    be fitted (fewer than 2 points, or x constant)."""
    if len(x) < 2 or np.ptp(np.asarray(x, np.float64)) == 0:
        return None
    boot = slopes(x, np.stack([np.asarray(b, np.float64) for b in boots], axis=-1))
    return percentile_ci(float(slopes(x, means)), boot, len(x), METHOD.format(n_boot))


def ordered_pairs(pairs: dict) -> list[str]:
    """Pair names by hidden size when every pair has one (results.json stores its keys
    sorted as text: "h128" before "h32"), else as given."""
    if all(p.get("size") is not None for p in pairs.values()):
        return sorted(pairs, key=lambda name: pairs[name]["size"])
    return list(pairs)


def trend_pairs(pairs: dict) -> list[str]:
    """The pairs a trend runs over: the zoo's sizes when the study has any (one family of
    models), else every pair (e.g. the configured real pair and `geometry.pairs`)."""
    zoo = {name: p for name, p in pairs.items() if p.get("size") is not None}
    return ordered_pairs(zoo) if zoo else list(pairs)


def _no_slope(m: int, sizes: str) -> str:
    if m < 2:
        return f"{m} size(s) with {sizes}: a slope needs 2 or more"
    return f"every size with {sizes} has the same parameter count: no slope to fit"


def size_trend(pairs: dict, replicates: dict, k: str, n_boot: int) -> dict:
    """The trend over sizes of each pooled statistic in `STATS` at PCA size `k`.

    pairs: {name: {"size", "n_params": {role: int}[, "sham": why it has none], ...}}
    (results' "pairs"). replicates: {name: `bootstrap.pooled_replicates` of that pair}.
    Returns {"k", "x", "pairs" (by parameter count), "sizes", "params" (mean over base and
    distilled), "log10_params", one list of pooled means per statistic (aligned with
    "pairs"; None at a size without a sham model, the list absent when no size has one),
    "slope" (structure gain's; an interval dict or None), "base_minus_distilled_slope",
    "sham_gain_slope" (absent when it cannot be fitted, e.g. < 2 sizes with a sham model, with
    "sham_gain_reason" instead), "sham_gain_excluded" ({name: reason}, sizes without a sham
    model, when any), "method", "excluded" ({name: reason}) and, when the slope is None,
    "reason"}.
    """
    names, excluded = [], {}
    for name in trend_pairs(pairs):
        rep = replicates.get(name, {}).get(k)
        if rep is None or rep["structure_gain"]["boot"] is None:
            excluded[name] = (rep or {}).get("structure_gain", {}).get("reason") or (
                f"no pooled statistic at k={k}"
            )
        else:
            names.append(name)
    params = {n: float(np.mean([pairs[n]["n_params"][r] for r in wd.ROLES])) for n in names}
    names = sorted(names, key=params.get)  # stable: equal counts keep their order
    params = [params[n] for n in names]
    x = [math.log10(p) for p in params]
    out = {
        "k": int(k),
        "x": X,
        "pairs": names,
        "sizes": [pairs[n]["size"] for n in names],
        "params": params,
        "log10_params": x,
    }
    for stat in STATS:
        reps = {i: replicates[n][k][stat] for i, n in enumerate(names) if stat in replicates[n][k]}
        if reps or stat not in OPTIONAL:
            out[stat] = [reps[i]["mean"] if i in reps else None for i in range(len(names))]
        fit = slope_ci([x[i] for i in reps], [r["mean"] for r in reps.values()],
                       [r["boot"] for r in reps.values()], n_boot)  # fmt: skip
        if stat in OPTIONAL:
            role = OPTIONAL[stat]
            lacking = [n for i, n in enumerate(names) if i not in reps]
            if lacking:
                out[f"{stat}_excluded"] = {
                    n: pairs[n].get(role) or f"no {role} model" for n in lacking
                }
            if fit is None:  # absent, not None: a missing key reads as "not measured"
                out[f"{stat}_reason"] = _no_slope(len(reps), f"a {role} model")
                continue
        out[slope_key(stat)] = fit
    out["method"] = METHOD.format(n_boot)
    out["excluded"] = excluded
    if out["slope"] is None:
        out["reason"] = _no_slope(len(names), "a pooled statistic")
    return out
