"""The figures of analysis/report.html, each drawn with matplotlib's Agg backend and returned
as a base64 PNG: the NRN histogram, NRN of each reasoning category's latents beside the
alive latents, the decoder cosine of shared latents, and the training curves of metrics.jsonl.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

COLORS = {"base_only": "#1f77b4", "shared": "#7f7f7f", "distilled_only": "#d62728",
          "dead": "#bbbbbb"}  # fmt: skip


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _bars(ax, hist: dict, **kw) -> None:
    edges = np.asarray(hist["edges"])
    ax.stairs(hist["counts"], edges, fill=True, **kw)


def fig_nrn(summary: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _bars(ax, summary["nrn_hist"], color="#4c72b0", alpha=0.85, label="all latents")
    b = summary["bands"]
    for x in (b["base_only_max"], b["distilled_only_min"]):
        ax.axvline(x, color="k", ls=":", lw=1)
    ax.axvline(summary["mean_nrn"], color="#d62728", lw=1.5, label="mean")
    # Exclusive latents are a small minority: a log count axis keeps them visible.
    ax.set_yscale("symlog", linthresh=1)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("NRN  (0 base-only · 0.5 shared · 1 distilled-only)")
    ax.set_ylabel("latents")
    norm, n = summary["norm"].upper(), summary["n_latents"]
    ax.set_title(f"Relative decoder norms ({norm}), {n} latents")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def fig_categories(summary: dict) -> str:
    """Per category: share of latents per NRN bin, firing latents (red, one tick each)
    against the alive latents (grey); the last panel compares the means."""
    names = list(summary["categories"])
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6))
    edges = np.linspace(0.0, 1.0, 11)  # coarse bins: a category has few firing latents
    alive_counts = _rebin(summary["nrn_hist_alive"], edges)
    baseline = summary["mean_nrn_alive"]
    for ax, name in zip(axes.flat, names):
        c = summary["categories"][name]
        ax.stairs(alive_counts / max(alive_counts.sum(), 1), edges, fill=True, color="#cccccc",
                  label=f"alive latents ({summary['alive_latents']})")  # fmt: skip
        firing = np.asarray(c.get("firing_nrn", []), float)
        if len(firing):
            counts, _ = np.histogram(np.clip(firing, 0, 1), bins=edges)
            ax.stairs(counts / len(firing), edges, color="#d62728", lw=1.5,
                      label=f"firing ({len(firing)})")  # fmt: skip
            ax.plot(firing, np.full(len(firing), -0.03), "|", color="#d62728", ms=8)
            ax.axvline(c["mean_nrn"], color="#d62728", ls="--", lw=1)
        if baseline is not None:
            ax.axvline(baseline, color="k", ls=":", lw=1)
        ax.set_title(f"{name} ({c['occurrences']} occurrences)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.06, 1.0)
        ax.set_ylabel("share of latents", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(frameon=False, fontsize=7, loc="upper left")
    ax = axes.flat[len(names)] if len(names) < axes.size else None
    if ax is not None:
        means = [summary["categories"][n]["mean_nrn"] for n in names]
        y = np.arange(len(names))
        ax.barh(y, [m if m is not None else 0 for m in means], color="#d62728", alpha=0.8)
        for yi, m in zip(y, means):
            ax.text(0.02, yi, "none fire" if m is None else f"{m:.3f}", va="center", fontsize=7)
        if baseline is not None:
            ax.axvline(baseline, color="k", ls=":", lw=1, label="alive latents")
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title("mean NRN of firing latents", fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    for extra in list(axes.flat)[len(names) + 1 :]:
        extra.set_visible(False)
    fig.supxlabel("NRN", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _rebin(hist: dict, edges: np.ndarray) -> np.ndarray:
    """Counts of a fine histogram summed into coarser `edges` (by bin centre)."""
    fine = np.asarray(hist["edges"])
    centres = (fine[:-1] + fine[1:]) / 2
    idx = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, weights=np.asarray(hist["counts"], float), minlength=len(edges) - 1)


def fig_cosine(summary: dict) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    _bars(ax, summary["cosine_shared"]["hist"], color="#7f7f7f")
    ax.set_xlabel("cosine(W_dec[i, base], W_dec[i, distilled])")
    ax.set_ylabel("shared latents")
    ax.set_title("Decoder directions of shared latents")
    return _png(fig)


def fig_training(records: list[dict]) -> str | None:
    if not records:
        return None
    step = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    axes[0].plot(step, [r["loss"] for r in records], label="loss")
    axes[0].plot(step, [r.get("mse", np.nan) for r in records], label="mse")
    axes[0].set_yscale("log")
    fve = np.asarray([r.get("fve", [np.nan, np.nan]) for r in records], float)
    for m, name in enumerate(("base", "distilled")[: fve.shape[1]]):
        axes[1].plot(step, fve[:, m], label=name)
    ev = [(r["step"], r["eval_fve"]) for r in records if "eval_fve" in r]
    if ev:
        es, evf = zip(*ev)
        evf = np.asarray(evf, float)
        for m in range(evf.shape[1]):
            axes[1].plot(es, evf[:, m], "o", ms=4, color=f"C{m}")
    axes[1].set_ylim(max(0.0, np.nanmin(fve) - 0.05) if np.isfinite(fve).any() else 0, 1)
    axes[2].plot(step, [r.get("l0", np.nan) for r in records])
    axes[3].plot(step, [r.get("dead_fraction", np.nan) for r in records])
    titles = ("loss (train)", "FVE (train; dots held-out)", "L0", "dead fraction")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(frameon=False, fontsize=7)
    axes[1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return _png(fig)
