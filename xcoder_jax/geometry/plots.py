"""Figures of the geometry study, drawn from results.json alone (Agg, no display needed).

Both use `plot_n_components` (the paper's default is 2). The shuffled control is dashed.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from xcoder_jax.geometry.metric import QUANTILES

COLORS = {"base": "tab:blue", "distilled": "tab:orange"}


def _legend() -> list[Line2D]:
    lines = [Line2D([], [], color=c, label=role) for role, c in COLORS.items()]
    return lines + [Line2D([], [], color="gray", ls="--", label="shuffled control")]


def _relations(results: dict) -> list[str]:
    names: dict[str, None] = {}
    for p in results["pairs"].values():
        names.update(dict.fromkeys(p["relations"]))
    return list(names)


def plot_cdfs(results: dict, path: str) -> None:
    """A grid (model pair x relation) of loss CDFs, base vs distilled, controls dashed."""
    k = str(results["plot_n_components"])
    pairs, rels = list(results["pairs"]), _relations(results)
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
    fig.legend(handles=_legend(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"Parallelogram loss, PCA k={k}")
    fig.savefig(path, format="png", dpi=100)


def plot_loss_vs_size(results: dict, path: str) -> None:
    """Mean loss against model pair (hidden size for the zoo), one panel per relation."""
    k = str(results["plot_n_components"])
    pairs, rels = list(results["pairs"]), _relations(results)
    entries = [results["pairs"][n] for n in pairs]
    sizes = [e["size"] for e in entries]
    numeric = all(s is not None for s in sizes)
    x = np.array(sizes if numeric else range(len(pairs)), float)
    fig = Figure(figsize=(2.8 * len(rels) + 0.5, 3.0), layout="constrained")
    axes = fig.subplots(1, len(rels), squeeze=False)[0]
    for ax, rel in zip(axes, rels):
        have = [(xi, pair["relations"][rel]) for xi, pair in zip(x, entries)
                if "models" in pair["relations"].get(rel, {})]  # fmt: skip
        xs = [xi for xi, _ in have]
        for role, color in COLORS.items():
            s = [r["models"][role][k] for _, r in have]
            ax.plot(xs, [v["mean"] for v in s], "o-", color=color)
            ax.plot(xs, [v["control_mean"] for v in s], "x--", color=color, lw=0.8)
        if not have:
            ax.text(0.5, 0.5, "skipped", ha="center", transform=ax.transAxes)
        ax.set_title(rel, fontsize=9)
        ax.set_xticks(x, [str(s) for s in sizes] if numeric else pairs, fontsize=7)
        ax.set_xlabel("hidden size" if numeric else "model pair")
    fig.supylabel("mean loss", fontsize=9)
    fig.legend(handles=_legend(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"Mean parallelogram loss vs size, PCA k={k}")
    fig.savefig(path, format="png", dpi=100)
