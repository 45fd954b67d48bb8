"""The geometry results in words: per pair and size, on how many relations each comparison
came out above, below or undecided (`verdicts`), and one summary line (`summarize`).
"""

from __future__ import annotations

from xcoder_jax.geometry.bootstrap import GAINS, gain_formula
from xcoder_jax.geometry.trend import ordered_pairs
from xcoder_jax.stats import format_ci, sign


def _tally(cis) -> dict:
    signs = [sign(ci) for ci in cis]  # +1 / -1: the interval lies above / below 0
    return {"above": signs.count(1), "below": signs.count(-1), "undecided": signs.count(0)}


def verdicts(relations: dict) -> dict:
    """Per str(k), over the scored relations of one pair: {"n_relations", "distilled_vs_base":
    {"below", "above", "undecided"}, "true_vs_shuffled": {role: {"below", "above",
    "undecided"}}, "structure_gain": {"below", "above", "undecided"}[, "sham_gain": the
    same]}. Distilled is below base where the base - distilled interval lies above 0, a
    pairing below its control where true - shuffled lies below 0, the distilled model more
    structured than the base (the sham) where the structure (sham) gain lies below 0; an
    interval including 0 or missing (< 3 pairs) is undecided."""
    scored = [r["by_k"] for r in relations.values() if "by_k" in r]
    out = {}
    for k in scored[0] if scored else ():
        gap = _tally(s[k]["base_minus_distilled"] for s in scored)
        roles = scored[0][k]["true_minus_shuffled"]
        out[k] = {
            "n_relations": len(scored),
            "distilled_vs_base": {
                "below": gap["above"],
                "above": gap["below"],
                "undecided": gap["undecided"],
            },
            "true_vs_shuffled": {
                role: _tally(s[k]["true_minus_shuffled"][role] for s in scored) for role in roles
            },
            **{g: _tally(s[k][g] for s in scored) for g in GAINS if g in scored[0][k]},
        }
    return out


def summarize(results: dict) -> str:
    """One line at `plot_n_components`: per pair, on how many relations the distilled model
    is below / above the base (mean loss, 95% CI excluding 0) or undecided, on how many each
    model's true pairing is below its shuffled control, the pooled base - distilled,
    structure gain and sham gain (or why there is none), and the two gains' slopes over
    sizes (when there is a trend)."""
    k = str(results["plot_n_components"])
    gap, control, pool, skipped = [], [], [], []
    gains = {g: [] for g in GAINS}
    for name in ordered_pairs(results["pairs"]):
        p = results["pairs"][name]
        skipped += [f"{rel}@{name}" for rel, r in p["relations"].items() if "by_k" not in r]
        c = p["counts"].get(k)
        if c is None:  # no relation scored
            continue
        n, d, t = c["n_relations"], c["distilled_vs_base"], c["true_vs_shuffled"]
        gap.append(
            f"distilled below base (CI excludes 0) on {d['below']}/{n} relations at {name}, "
            f"above on {d['above']}/{n}, undecided {d['undecided']}/{n}"
        )
        control.append(" & ".join(f"{role} {v['below']}/{n}" for role, v in t.items()))
        control[-1] += f" at {name}"
        pool.append(f"{name} {format_ci(p['pooled'][k]['base_minus_distilled'], '{:+.3g}')}")
        for g, other in GAINS.items():
            ci = p["pooled"][k].get(g)
            if ci is None:
                gains[g].append(f"{name} n/a ({p.get(other, 'not measured')})")
                continue
            below = c.get(g, {}).get("below", 0)
            gains[g].append(f"{name} {format_ci(ci, '{:+.3g}')} (below 0 on {below}/{n} relations)")
    line = (
        f"geometry (k={k}, 95% bootstrap CIs over word pairs): " + "; ".join(gap)
        + "; below shuffled control (CI excludes 0): " + ", ".join(control)
        + "; pooled base - distilled mean loss: " + ", ".join(pool)
    )  # fmt: skip
    for g, values in gains.items():
        line += f"; pooled {g.replace('_', ' ')} ({gain_formula(g)}): " + ", ".join(values)
    trend = results.get("trend")
    if trend is not None:
        n = len(trend["pairs"])
        slope = trend["slope"]
        text = format_ci(slope, "{:+.3g}") if slope else f"n/a ({trend['reason']})"
        line += f"; structure gain per decade of parameters over {n} sizes: {text}"
        sham = trend.get("sham_gain_slope")
        text = format_ci(sham, "{:+.3g}") if sham else f"n/a ({trend.get('sham_gain_reason')})"
        m = n - len(trend.get("sham_gain_excluded", {}))
        line += f"; sham gain per decade of parameters over {m} sizes: {text}"
    return line + (f"; skipped (< 2 single-token pairs): {', '.join(skipped)}" if skipped else "")
