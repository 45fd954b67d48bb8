"""The pipeline's one-screen summary: one short line per stage with its headline figure (the
whole study is in `report.html`, one section per stage).

Each function takes a stage's results as the stage returns them (fresh or read back from
disk) and lists categories, sets and sizes in the config's order, never in the order a dict
happens to have, so a first run and a rerun print the same lines.
"""

from __future__ import annotations

import textwrap

from xcoder_jax import workdir as wd
from xcoder_jax.stats import format_ci, sign

WIDTH = 104  # a headline's characters: with the stage name, a summary line stays <= 120


def shorten(text: str, width: int = WIDTH) -> str:
    """`text` cut at a word boundary to at most `width` characters ("..." marks a cut)."""
    return textwrap.shorten(text, width=width, placeholder=" ...")


def zoo(report: dict, config) -> str:
    main = report["sizes"][str(config.zoo.main_size)]
    accuracy = ", ".join(f"{arm} {main[arm]['accuracy']:.0%}" for arm in wd.ARMS if arm in main)
    met = sum(bool(r.get("criterion", {}).get("met")) for r in report["sizes"].values())
    return (
        f"h{config.zoo.main_size} accuracy: {accuracy}; criterion met at {met}/"
        f"{len(report['sizes'])} sizes"
    )


def extract(manifest: dict) -> str:
    """Rows, documents, block; each model's ||mean|| / rms deviation where the store has it."""
    m = manifest
    line = f"{m['n_rows']} rows from {m['n_docs']} documents at block {m['layer']}"
    ratios = [n.get("mean_to_spread") for n in m.get("norm", [])]
    if ratios and all(r is not None for r in ratios):
        line += "; ||mean|| / rms deviation " + " / ".join(f"{r:.2f}" for r in ratios)
    return line


def train(final: dict) -> str:
    fve = " / ".join(f"{v:.3f}" for v in final["fve"])
    return (
        f"held-out FVE {fve} (base / distilled), L0 {final['l0']:.1f}, "
        f"dead {final['dead_fraction']:.1%}"
    )


def formats(status: dict[str, str]) -> str:
    """{format: "written" | "up to date" | "skipped: <reason>"} -> which ones export/ holds."""
    held = [f for f, st in status.items() if not st.startswith("skipped")]
    skipped = [f"{f} {st.split(':', 1)[0]} ({st.split(': ', 1)[-1]})" for f, st in status.items()
               if f not in held]  # fmt: skip
    return "; ".join([f"{', '.join(held) or 'none'} in export/", *skipped])


def analysis(summary: dict) -> str:
    bands = (
        f"{summary['n_base_only']} base-only / {summary['n_shared']} shared / "
        f"{summary['n_distilled_only']} distilled-only"
    )
    if summary.get("n_dead") is not None:
        bands += f" / {summary['n_dead']} dead"
    sp = summary.get("splice", {})
    rec = [sp[r].get("fraction_recovered") for r in wd.ROLES if r in sp]
    if rec and all(r is not None for r in rec):
        bands += "; CE recovered " + " / ".join(f"{r:.0%}" for r in rec)
    return f"{bands}"


def steering(results: dict, config) -> str:
    """The first steered set's token change over a random direction; how many sets ran."""
    sets = [s for s in config.steering.latents if s in results.get("headline", {})]
    if not sets:
        return "no set steered (steering/results.json says why)"
    first = results["headline"][sets[0]]
    vs = first.get("vs_random_direction") or first.get("vs_clean", {})
    against = "a random direction" if first.get("vs_random_direction") else "clean"
    more = f"; {len(sets) - 1} more sets" if len(sets) > 1 else ""
    return (
        f"{sets[0]} {first['latents']} at {first['alpha']:+g}: tokens "
        f"{format_ci(vs.get('tokens'), '{:+.1f}')} over {against}{more}"
    )


def ablation(results: dict, config) -> str:
    """How many categories' targeted sets lower their markers beyond each control."""
    cats = [c for c in config.ablation.categories if c in results.get("categories", {})]
    heads = [results["categories"][c].get("headline", {}).get("distilled", {}) for c in cats]
    direction = sum(sign(h.get("targeted_minus_direction")) < 0 for h in heads)
    random = sum(sign(h.get("targeted_minus_random")) < 0 for h in heads)
    unmeasured = sum((h.get("targeted_minus_random") or {}).get("mean") is None for h in heads)
    return (
        f"marker log-prob below a random direction: {direction}/{len(cats)} categories; "
        f"below matched random latents: {random}/{len(cats)} ({unmeasured} n/a)"
    )


def geometry(results: dict) -> str:
    """The structure gain (distilled over base) at the largest size and its slope over sizes,
    at the PCA size the figures use."""
    k = str(results.get("plot_n_components"))
    pairs = results.get("pairs", {})
    largest = results.get("largest") or next(iter(pairs), None)  # a configured pair: "main"
    pooled = pairs.get(largest, {}).get("pooled", {}).get(k, {})
    gain = format_ci(pooled.get("structure_gain"), "{:+.3f}")
    slope = results.get("trend", {}).get("slope")
    per_size = f", per decade of size {format_ci(slope, '{:+.3f}')}" if slope else ""
    return f"structure gain at {largest} {gain}{per_size}"
