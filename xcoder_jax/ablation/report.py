"""The ablation's results as a reader sees them: ablation/ablation.png (log-probability change
against frac per category and model, headline rule), the half-step KL table of the headline
sets (shown in the study report) and the pipeline's one-line summary.
"""

from __future__ import annotations

from xcoder_jax import stats


def _series(rows, role: str, key: str):
    """(fracs, means, [lower errors, upper errors]) of the computed CIs `key` in `rows`."""
    got = [(r["frac"], r[role][key]) for r in rows if role in r and r[role][key]["lo"] is not None]
    fr = [g[0] for g in got]
    mean = [g[1]["mean"] for g in got]
    err = [[g[1]["mean"] - g[1]["lo"] for g in got], [g[1]["hi"] - g[1]["mean"] for g in got]]
    return fr, mean, err


def plot_ablation(results: dict, path: str) -> None:
    """Targeted, matched and uniform random logit change (95% CI) against frac, one panel per
    category and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(results["categories"])
    roles = results["roles"]
    fig, axes = plt.subplots(
        len(roles), max(len(cats), 1), figsize=(3.2 * max(len(cats), 1), 2.8 * len(roles)),
        squeeze=False,
    )  # fmt: skip
    styles = [("targeted", "o-"), ("random_at_matched", "s--"), ("random_direction", "^:")]
    for j, cat in enumerate(cats):
        rule = results["headline"]["rule"]
        rows = results["categories"][cat]["rules"][rule]["by_frac"]
        for i, role in enumerate(roles):
            ax = axes[i, j]
            for key, fmt in styles:
                fr, mean, err = _series(rows, role, key)
                if fr:
                    ax.errorbar(fr, mean, yerr=err, fmt=fmt, capsize=3, label=key.replace("_", " "))
            if len(results["fracs"]) > 1:
                ax.set_xscale("log")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{cat} ({role})", fontsize=9)
            ax.set_xlabel("frac")
            if j == 0:
                ax.set_ylabel("marker log-prob change")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7)
    fig.suptitle("Ablation on held-out documents: mean and 95% CI", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summarize_ablation(results: dict) -> str:
    """One line: per category, the headline set (distilled model) against random latents at
    matched activity, and how many categories have targeted - random below 0 (95% CI)."""
    role = "distilled" if "distilled" in results["roles"] else results["roles"][-1]
    parts, wins, n = [], 0, 0
    for cat, entry in results["categories"].items():
        head = entry.get("headline") or {}
        if role not in head:
            parts.append(f"{cat} n/a ({head.get('reason', 'no targeted set')})")
            continue
        e = head[role]
        diff = e["targeted_minus_random"]
        wins, n = wins + (stats.sign(diff) < 0), n + 1
        size = head["set"]["n"]
        parts.append(f"{cat} ({size} latents) {stats.format_ci(diff)}")
    return (
        f"ablation ({role}, held-out marker log-prob change, {results['headline']['rule']} "
        f"sets at frac {results['headline']['frac']:g}, targeted - random at matched activity): "
        + "; ".join(parts)
        + f"; below 0 (95% CI) in {wins}/{n}"
    )


HALF_STEP_HEAD = ["category", "latents", "KL closed by the set",
                  "by matched random sets", "set − random"]  # fmt: skip


def half_step_rows(results: dict, interval=stats.format_ci, text=str) -> list[list[str]]:
    """The half-step table (`HALF_STEP_HEAD`): per category, the fraction of KL(distilled ||
    base continued) its headline set closes, its matched random sets' and the difference
    (95% CIs over documents). `interval` formats a CI, `text` the other cells (e.g. escapes
    them); one row saying why when it was skipped, none when results predate it."""
    half = results.get("half_step_kl") or {}
    if "skipped" in half:
        return [["every category", "", text(half["skipped"]), "", ""]]
    rows = []
    for cat, e in (half.get("categories") or {}).items():
        if "set" not in e:
            rows.append([text(cat), "0", text(e.get("reason", "no targeted set")), "", ""])
            continue
        parts = [e.get(k) or {} for k in ("set", "random", "minus_random")]
        cis = [c.get("fraction_closed", c) for c in parts]  # else the part with its reason
        rows.append([text(cat), str(e["n_latents"]), *(interval(c) for c in cis)])
    return rows
