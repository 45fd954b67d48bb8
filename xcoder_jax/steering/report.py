"""The steering sweep's results as a reader sees them: steering/steering.png (paired
difference from the clean model against alpha, the set's random controls beside it) and the
pipeline's one-line summary.
"""

from __future__ import annotations

import numpy as np

from xcoder_jax import stats as cis


def _series(results: dict) -> dict[tuple[str, str], list[dict]]:
    """{(model, set): its conditions in alpha order}."""
    series: dict[tuple[str, str], list[dict]] = {}
    for c in results["conditions"]:
        series.setdefault((c["model"], c["set"]), []).append(c)
    return {k: sorted(v, key=lambda c: c["alpha"]) for k, v in series.items()}


def _num(x) -> float:
    return np.nan if x is None else float(x)


FIGURE_METRICS = (
    "tokens",
    "truncated",
    "reflection_rounds",
    "self_reflection_per_100",
    "deductive_per_100",
    "alternative_per_100",
    "contrastive_per_100",
    "verification_per_100",
    "accuracy",
)
_STYLES = {"steered": "-", "random_direction": "--", "random_latent": ":"}


def _points(conds: list[dict], name: str, kind: str):
    """(alphas, mean, lo, hi, significant) of `kind`'s difference from the clean model."""
    xs, mean, lo, hi, sig = [], [], [], [], []
    for c in conds:
        if c["vs_clean"] is None:
            ci = {"mean": 0.0, "lo": 0.0, "hi": 0.0}  # the clean model itself
        elif kind == "steered":
            ci = c["vs_clean"].get(name)
        else:
            ci = ((c.get("controls") or {}).get(kind) or {}).get("vs_clean", {}).get(name)
        if ci is None or ci["mean"] is None:
            continue
        xs.append(c["alpha"])
        mean.append(ci["mean"])
        lo.append(_num(ci["lo"]))
        hi.append(_num(ci["hi"]))
        sig.append(cis.excludes_zero(ci) if ci["lo"] is not None else False)
    return xs, np.array(mean), np.array(lo), np.array(hi), sig


def plot_steering(results: dict, path: str) -> None:
    """Per metric: steered minus clean (paired over prompts, 95% CI) against alpha.

    One colour per (model, latent set): solid the steered set, dashed its random-direction
    control, dotted its matched random latent; a filled marker where the paired CI excludes
    0. The clean model sits at (0, 0) by construction.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in FIGURE_METRICS if n in results["metrics"]] or results["metrics"]
    cols = 3
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for (model, spec), conds in _series(results).items():
            color = None
            for kind, style in _STYLES.items():
                xs, mean, lo, hi, sig = _points(conds, name, kind)
                if len(xs) < 2 and kind != "steered" or not xs:
                    continue  # a control is drawn only at alpha != 0
                err = np.nan_to_num(np.stack([mean - lo, hi - mean]))  # no CI: no bar
                label = f"{model} {spec}" + ("" if kind == "steered" else f" {kind}")
                fade = 1.0 if kind == "steered" else 0.6
                line = ax.errorbar(
                    xs, mean, yerr=err, capsize=3, ls=style, color=color, label=label, alpha=fade
                )[0]
                color = line.get_color()
                face = [color if s else "white" for s in sig]
                ax.scatter(xs, mean, c=face, edgecolors=color, zorder=3, s=25)
        ax.set_title(f"{name}: condition - clean")
        ax.set_xlabel(f"alpha ({results['convention']})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:  # no set steered: nothing to label
        axes.flat[0].legend(fontsize=6)
    fig.suptitle(
        "Steering at block L: paired difference from the clean model over prompts, 95% CI "
        "(solid: steered; dashed: random direction, same norm; dotted: matched random latent; "
        "filled: CI excludes 0)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


_LABELS = {"tokens": ("tokens", "{:+.1f}"), "words": ("words", "{:+.1f}")}


def _fmt_ci(name: str, ci: dict) -> str:
    """'self_reflection/100tok +0.72 [+0.45, +0.99]', '... (n.s.)' or '... (no CI: why)'."""
    label, fmt = _LABELS.get(name, (name.replace("_per_100", "/100tok"), "{:+.2f}"))
    text = f"{label} {cis.format_ci(ci, fmt)}"
    return text if ci["lo"] is None or cis.excludes_zero(ci) else f"{text} (n.s.)"


def summarize_steering(results: dict) -> str:
    """One line: per (model, set), at the largest |alpha| on each side of 0, the paired
    difference from the clean model (95% CI) of the set's category rate, tokens and accuracy,
    and of every other metric whose CI excludes 0, then against each random control the set's
    category rate and tokens; "(n.s.)" marks CIs that include 0."""
    parts = []
    for (model, spec), conds in _series(results).items():
        neg = [c for c in conds if c["vs_clean"] is not None and c["alpha"] < 0]
        pos = [c for c in conds if c["vs_clean"] is not None and c["alpha"] > 0]
        cat = spec.split(":")[0] if ":" in spec else None
        sides = []
        for c in neg[:1] + pos[-1:]:
            vs = c["vs_clean"]
            head = [k for k in (f"{cat}_per_100", "tokens", "accuracy") if k in vs]
            shown = head + [k for k in c["changed"] if k not in head]
            vals = ", ".join(_fmt_ci(k, vs[k]) for k in shown)
            for kind, label in (("random_direction", "random direction"),
                                ("random_latent", "matched latent")):  # fmt: skip
                ctrl = c.get(f"vs_{kind}") or {}
                got = [_fmt_ci(k, ctrl[k]) for k in head[:2] if k in ctrl]
                if got:
                    vals += f"; vs {label}: " + ", ".join(got)
            sides.append(f"alpha {c['alpha']:+g}: {vals}")
        if sides:
            parts.append(f"{model} {spec} " + " | ".join(sides))
    parts += [f"{spec} not steered ({why})" for spec, why in results["skipped_sets"].items()]
    if not parts:
        return "steering: no steered conditions"
    return f"steering vs clean (paired over {results['n_prompts']} prompts): " + "; ".join(parts)
