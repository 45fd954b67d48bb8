"""Figures of the geometry study, drawn from results.json alone (Agg, no display needed).

Both use `plot_n_components` (the paper's default is 2). The shuffled control is dashed;
differences carry their 95% bootstrap intervals (bars). The sham model and its gain appear
at the sizes that have one.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from xcoder_jax.geometry.bootstrap import gain_formula
from xcoder_jax.geometry.metric import QUANTILES
from xcoder_jax.geometry.trend import ordered_pairs, slope_key

COLORS = {"base": "tab:blue", "distilled": "tab:orange", "sham": "tab:green"}
# The gains: (true - shuffled) distilled - base, and distilled - sham.
GAINS = {"structure_gain": "tab:purple", "sham_gain": "tab:olive"}


def _roles(results: dict) -> list[str]:
    """The roles some relation of some pair was scored in, in `COLORS` order."""
    seen = {role for p in results["pairs"].values() for r in p["relations"].values()
            for role in r.get("models", {})}  # fmt: skip
    return [role for role in COLORS if role in seen]


def _legend(roles) -> list[Line2D]:
    lines = [Line2D([], [], color=COLORS[role], label=role) for role in roles]
    return lines + [Line2D([], [], color="gray", ls="--", label="shuffled control")]


def _relations(results: dict) -> list[str]:
    names: dict[str, None] = {}
    for p in results["pairs"].values():
        names.update(dict.fromkeys(p["relations"]))
    return list(names)


def plot_cdfs(results: dict, path: str) -> None:
    """A grid (model pair x relation) of loss CDFs, base vs distilled, controls dashed."""
    k = str(results["plot_n_components"])
    pairs, rels = ordered_pairs(results["pairs"]), _relations(results)
    fig = Figure(figsize=(2.6 * len(rels) + 0.5, 2.2 * len(pairs) + 0.6), layout="constrained")
    axes = fig.subplots(len(pairs), len(rels), squeeze=False)
    for row, name in enumerate(pairs):
        for col, rel in enumerate(rels):
            ax = axes[row, col]
            r = results["pairs"][name]["relations"].get(rel)
            if r is None or "models" not in r:
                ax.set_axis_off()
                ax.set_title(f"{name} · {rel}: skipped", fontsize=8)
                continue
            for role, s in r["models"].items():
                s = s[k]
                ax.plot(s["cdf"], QUANTILES, color=COLORS.get(role))
                ax.plot(s["control_cdf"], QUANTILES, color=COLORS.get(role), ls="--", lw=0.8)
            ax.set_title(f"{name} · {rel} (n={r['kept']})", fontsize=8)
            ax.set(xlim=(0, 2), ylim=(0, 1))  # the loss is at most 2
            ax.tick_params(labelsize=7)
            if row == len(pairs) - 1:
                ax.set_xlabel("parallelogram loss", fontsize=8)
    fig.supylabel("CDF over pairs of pairs", fontsize=9)
    fig.legend(handles=_legend(_roles(results)), loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle(f"Parallelogram loss, PCA k={k}")
    fig.savefig(path, format="png", dpi=100)


def _ci_points(ax, xs, cis, color, marker) -> None:
    """Means as markers on a line, 95% intervals as vertical bars (missing ones omitted)."""
    num = [(x, c) for x, c in zip(xs, cis) if c is not None and c["mean"] is not None]
    ax.plot([x for x, _ in num], [c["mean"] for _, c in num], marker, color=color, ms=4)
    bars = [(x, c) for x, c in num if c["lo"] is not None]
    ax.vlines([x for x, _ in bars], [c["lo"] for _, c in bars], [c["hi"] for _, c in bars],
              color=color, lw=1.2)  # fmt: skip
    ax.axhline(0.0, color="gray", lw=0.6)


def _plot_trend(ax, results: dict, k: str) -> None:
    """The pooled structure and sham gains against log10 parameters with their intervals and
    the least-squares lines of `results["trend"]` (through the means' centroid)."""
    trend = results.get("trend") or {}
    x = trend.get("log10_params", [])
    if not x:
        ax.set_axis_off()
        ax.set_title(f"trend: n/a ({trend.get('reason', 'no sizes')})", fontsize=8)
        return
    texts = []
    for gain, color in GAINS.items():
        if gain not in trend:  # no size has the comparison model
            continue
        cis = [results["pairs"][n]["pooled"][k].get(gain) for n in trend["pairs"]]
        _ci_points(ax, x, cis, color, "o")
        slope = trend.get(slope_key(gain))
        name = gain.split("_")[0]  # "structure", "sham": the title is narrow
        if slope is None:
            texts.append(f"{name}: no slope")
            continue
        xs = [xi for xi, y in zip(x, trend[gain]) if y is not None]
        ys = [y for y in trend[gain] if y is not None]
        ends = np.array([min(xs), max(xs)])
        ax.plot(ends, np.mean(ys) + slope["mean"] * (ends - np.mean(xs)), color=color, lw=1)
        texts.append(f"{name} {slope['mean']:+.3f} [{slope['lo']:+.3f}, {slope['hi']:+.3f}]")
    ax.set_title("pooled gains vs size, slopes / decade\n" + "\n".join(texts), fontsize=8)
    ax.set_xlabel("log10 parameters", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_loss_vs_size(results: dict, path: str) -> None:
    """Per model pair (hidden size for the zoo), one column per relation and one pooled:
    mean loss with its control (top), base - distilled, true - shuffled per model and the
    structure and sham gains ((true - shuffled) distilled - base, and - sham; below 0: the
    distilled model more structured), the differences with their 95% bootstrap intervals
    as bars. The pooled column's top panel is the trend: the pooled gains against log10
    parameters with their least-squares lines and the slopes' intervals."""
    k = str(results["plot_n_components"])
    pairs, rels, roles = ordered_pairs(results["pairs"]), _relations(results), _roles(results)
    entries = [results["pairs"][n] for n in pairs]
    sizes = [e["size"] for e in entries]
    numeric = all(s is not None for s in sizes)
    x = np.array(sizes if numeric else range(len(pairs)), float)
    nudge = 0.02 * (np.ptp(x) if len(x) > 1 else 1.0)  # keeps the models' bars apart
    cols = [*rels, "pooled"]
    fig = Figure(figsize=(2.8 * len(cols) + 0.5, 10), layout="constrained")
    axes = fig.subplots(4, len(cols), squeeze=False, sharex=True)
    for col, rel in enumerate(cols):
        if rel == "pooled":
            have = [(xi, pair["pooled"].get(k)) for xi, pair in zip(x, entries)]
            have = [(xi, v) for xi, v in have if v is not None]
            spec = axes[0, col].get_subplotspec()  # its own x axis: log10 parameters
            axes[0, col].remove()
            _plot_trend(fig.add_subplot(spec), results, k)
        else:
            have = [(xi, pair["relations"][rel]) for xi, pair in zip(x, entries)
                    if "by_k" in pair["relations"].get(rel, {})]  # fmt: skip
            for role in roles:
                on = [(xi, r["models"][role][k]) for xi, r in have if role in r["models"]]
                nan = [v if v is not None else np.nan for v in (t["mean"] for _, t in on)]
                ctl = [v if v is not None else np.nan for v in (t["control_mean"] for _, t in on)]
                axes[0, col].plot([xi for xi, _ in on], nan, "o-", color=COLORS[role])
                axes[0, col].plot([xi for xi, _ in on], ctl, "x--", color=COLORS[role], lw=0.8)
            have = [(xi, r["by_k"][k]) for xi, r in have]
        if rel != "pooled":
            axes[0, col].set_title(rel, fontsize=9)
        if not have:  # skipped in every pair: nothing to draw in the column
            for ax in axes[1:, col] if rel == "pooled" else axes[:, col]:
                ax.set_axis_off()
            if rel != "pooled":
                axes[0, col].set_title(f"{rel}: skipped", fontsize=9)
            continue
        _ci_points(axes[1, col], [xi for xi, _ in have],
                   [v["base_minus_distilled"] for _, v in have], "k", "o")  # fmt: skip
        for i, role in enumerate(roles):
            on = [(xi, v["true_minus_shuffled"][role]) for xi, v in have
                  if role in v["true_minus_shuffled"]]  # fmt: skip
            shift = (i - (len(roles) - 1) / 2) * nudge
            _ci_points(axes[2, col], [xi + shift for xi, _ in on], [c for _, c in on],
                       COLORS[role], "o")  # fmt: skip
        for i, (gain, color) in enumerate(GAINS.items()):
            on = [(xi, v[gain]) for xi, v in have if gain in v]
            shift = (i - 0.5) * nudge
            _ci_points(axes[3, col], [xi + shift for xi, _ in on], [c for _, c in on], color, "o")
        axes[1, col].set_title(f"{rel}: base - distilled", fontsize=8)
        axes[2, col].set_title(f"{rel}: true - shuffled", fontsize=8)
        axes[3, col].set_title(f"{rel}: structure (and sham) gain", fontsize=8)
        axes[3, col].set_xticks(x, [str(s) for s in sizes] if numeric else pairs, fontsize=7)
        axes[3, col].set_xlabel("hidden size" if numeric else "model pair")
    axes[0, 0].set_ylabel("mean loss", fontsize=9)
    axes[1, 0].set_ylabel("difference of mean loss", fontsize=9)
    axes[3, 0].set_ylabel("difference of differences", fontsize=9)
    gap = Line2D([], [], color="k", marker="o", ms=4, label="base - distilled (95% CI)")
    shown = [g for g in GAINS if any(g in v for p in entries for v in p["pooled"].values())]
    label = lambda g: f"{g.replace('_', ' ')}: {gain_formula(g)} (95% CI)"
    gains = [Line2D([], [], color=GAINS[g], marker="o", ms=4, label=label(g))
             for g in shown]  # fmt: skip
    fig.legend(handles=[*_legend(roles), gap, *gains], loc="outside lower center", ncols=3,
               fontsize=8)  # fmt: skip
    fig.suptitle(f"Parallelogram loss vs size, PCA k={k} (bars: 95% bootstrap CI)")
    fig.savefig(path, format="png", dpi=100)
