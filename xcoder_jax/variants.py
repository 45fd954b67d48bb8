"""Crosscoder variants compared on one store: the same data, several seeds, matched L0.

Each variant (`VARIANTS`) is a loss and a recipe, trained and analysed in its own workdir,
`<out>/<variant>/seed<s>/`, whose `models/` and `activations/` link to one store's workdir,
so every variant reads the same model pair and the same activation rows. The stages run per
workdir are train, analyze and ablate (`STAGES`; the ablation of each category's headline set
only, the declared test); steering is left out (its sampling is most of a demo's time).
Every recipe field a variant may change (`RECIPE`) is reset for each, so no setting leaks
from the config given or from another variant.

Matched L0: at each seed the L1 crosscoder runs first, and the BatchTopK family runs at
k = its held-out L0, rounded (`matched_k`); the table reports the L0 each run measured.

Per run, `row` reads from the stages' outputs: held-out FVE per model, L0 and the dead
fraction (analysis/summary.json), the count of distilled-only latents (and of them those
learned, not dedicated by construction), the share of them latent scaling flags as false
exclusives, the half-step KL closed by the distilled-only set minus activity-matched random
sets, and, over the ablation's categories, how many headline sets lower their marker below
matched random latents and how many close more half-step KL than random sets (intervals
off 0). `table` gives each figure's mean over seeds with a Student-t 95% interval
(`stats.t_ci`; n counts the seeds that measured it) and the difference from `REFERENCE`
paired by seed (`stats.paired_ci`); `markdown` prints both.
"""

from __future__ import annotations

import json
import os

from xcoder_jax import config_util, stats
from xcoder_jax import workdir as wd
from xcoder_jax.ablation.measure import HEADLINE_RULE
from xcoder_jax.errors import ConfigError
from xcoder_jax.fileio import atomic_write_bytes, atomic_write_json

ANNEAL_FRAC = 0.2  # annealing variants: k falls from 4k over this share of train.steps
# The recipe fields a variant may set, at their values when it does not.
RECIPE = {"k_max": 0, "k_anneal_steps": 0, "center": False, "exclusive": (0.0, 0.0)}
# name -> (what it is, its loss, its recipe fields; "anneal": True sets k_anneal_steps).
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "l1": ("L1 (the paper's loss)", "l1", {}),
    "batchtopk": ("BatchTopK", "batchtopk", {}),
    "batchtopk_center": ("BatchTopK, centred", "batchtopk", {"center": True}),
    "batchtopk_anneal_center": (
        "BatchTopK, k annealed from 4k over 20% of the steps, centred",
        "batchtopk",
        {"anneal": True, "center": True},
    ),
    "matryoshka": ("Matryoshka BatchTopK", "matryoshka", {}),
    "dedicated": ("BatchTopK, 5% + 5% dedicated latents", "batchtopk", {"exclusive": (0.05, 0.05)}),
}
REFERENCE = "batchtopk"  # the paired differences are taken against it
STAGES = ("train", "analyze", "ablate")
LINKED = (wd.models_dir, wd.activations_dir)  # what every variant's workdir shares
JSON, MARKDOWN = "variants.json", "variants.md"
RESULTS = {"analysis": "summary.json", "ablation": "results.json"}  # what `row` reads
# column -> (header, format of its mean and interval)
COLUMNS = {
    "fve_base": ("held-out FVE base", "{:.4f}"),
    "fve_distilled": ("held-out FVE distilled", "{:.4f}"),
    "l0": ("L0", "{:.1f}"),
    "dead": ("dead", "{:.1%}"),
    "n_distilled_only": ("distilled-only latents", "{:.0f}"),
    "n_distilled_only_learned": ("of them learned", "{:.0f}"),
    "false_exclusive": ("false-exclusive share", "{:.2f}"),
    "half_step_minus_random": ("half-step KL closed by them, minus random", "{:+.3f}"),
    "ablation_below_random": ("categories: ablation below random", "{:.1f}"),
    "category_kl_beyond_random": ("categories: half-step KL beyond random", "{:.1f}"),
}
# The paired-difference table's columns.
PAIRED = ("fve_distilled", "dead", "n_distilled_only", "half_step_minus_random")


def run_dir(out: str, variant: str, seed: int) -> str:
    return os.path.join(out, variant, f"seed{seed}")


def link_store(run: str, store_workdir: str) -> None:
    """Make `run` read the store workdir's models and activations (relative symlinks)."""
    os.makedirs(run, exist_ok=True)
    for where in LINKED:
        src, dst = where(store_workdir), where(run)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src}: the store workdir has no such directory")
        if not os.path.lexists(dst):
            os.symlink(os.path.relpath(os.path.abspath(src), os.path.abspath(run)), dst)


def variant_config(config, variant: str, seed: int, k: int):
    """A copy of `config` at `seed` with the variant's loss and recipe: L1 as the config
    has it, or the BatchTopK family's recipe (`config_util.batchtopk`: AuxK, b_dec at the
    store mean) at `k`; every `RECIPE` field at the variant's value or its reset value."""
    from xcoder_jax.replicate import with_seed

    _, loss, fields = VARIANTS[variant]
    c = with_seed(config, seed)
    with c.unlocked():
        cc = c.crosscoder
        if loss == "l1":
            cc.loss = loss
        else:
            config_util.batchtopk(c, k=k, loss=loss)
        for field, value in RECIPE.items():
            cc[field] = fields.get(field, value)
        if fields.get("anneal"):
            cc.k_anneal_steps = max(1, int(ANNEAL_FRAC * c.train.steps))
        # The ablation's declared test only: each category's headline set (the specificity
        # rule at ablation.headline_frac), a sixth of the sets the stage ablates by default.
        c.ablation.rules, c.ablation.fracs = (HEADLINE_RULE,), (c.ablation.headline_frac,)
    return c


def matched_k(l1_row: dict | None, k: int | None) -> int:
    """The BatchTopK family's k: the L1 run's held-out L0 at the same seed, rounded (at
    least 1); else `k`. ConfigError with neither."""
    if l1_row is not None and l1_row.get("l0") is not None:
        return max(1, round(l1_row["l0"]))
    if k is None:
        raise ConfigError("BatchTopK variants need k: run the l1 variant first, or give k")
    return k


def _results(run: str) -> list[str]:
    return [os.path.join(wd.stage_dir(run, stage), name) for stage, name in RESULTS.items()]


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _mean(ci: dict | None):
    return ci.get("mean") if isinstance(ci, dict) else None


def row(run: str) -> dict:
    """The figures of one variant run (None where a stage did not measure one)."""
    s, abl = (_read(p) for p in _results(run))
    fve = {role: s["fve"][s["roles"][role]] for role in wd.ROLES}
    half = s.get("half_step", {}).get("distilled_only_minus_random", {})
    cats = abl.get("categories", {})
    heads = [cats[c].get("headline", {}).get("distilled", {}) for c in cats]
    return {
        "fve_base": fve["base"],
        "fve_distilled": fve["distilled"],
        "l0": s["l0"],
        "dead": s["n_dead"] / s["n_latents"],
        "n_distilled_only": s["n_distilled_only"],
        "n_distilled_only_learned": ((s.get("exclusive") or {}).get("learned") or {}).get(
            "distilled_only", s["n_distilled_only"]
        ),
        "false_exclusive": _mean(
            s["latent_scaling"]["distilled_only"].get("share_false_exclusive")
        ),
        "half_step_minus_random": _mean(half.get("fraction_closed")),
        "ablation_below_random": sum(stats.sign(h.get("targeted_minus_random")) < 0 for h in heads),
        "category_kl_beyond_random": sum(
            stats.sign(v.get("minus_random", {}).get("fraction_closed")) > 0
            for v in abl.get("half_step_kl", {}).get("categories", {}).values()
        ),
        "n_categories": len(cats),
        "loss": s.get("loss"),
        "groups": s.get("groups"),
        "exclusive": s.get("exclusive"),
    }


def _values(per_seed: dict, col: str) -> dict[int, float]:
    return {seed: r[col] for seed, r in per_seed.items() if r.get(col) is not None}


def table(rows: dict[str, dict[int, dict]]) -> dict:
    """{variant: {"seeds", "columns": {column: t_ci over seeds}, "vs_reference": {column:
    paired_ci of variant minus REFERENCE over the seeds both measured}}}."""
    out = {}
    ref = rows.get(REFERENCE, {})
    for variant, per_seed in rows.items():
        cols = {c: stats.t_ci(list(_values(per_seed, c).values())) for c in COLUMNS}
        paired = {}
        if variant != REFERENCE and ref:
            for c in PAIRED:
                a, b = _values(per_seed, c), _values(ref, c)
                both = sorted(set(a) & set(b))
                paired[c] = stats.paired_ci([a[s] for s in both], [b[s] for s in both])
        out[variant] = {"seeds": sorted(per_seed), "columns": cols, "vs_reference": paired}
    return out


def _cell(ci: dict, fmt: str, n_seeds: int) -> str:
    text = stats.format_ci(ci, fmt).replace(" [", "<br>[")
    n = ci.get("n", 0)
    return text if n == n_seeds else f"{text} (n = {n})"


def markdown(tab: dict) -> str:
    """The table of means, then the paired differences from REFERENCE."""
    head = "| variant | seeds | " + " | ".join(h for h, _ in COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for variant, t in tab.items():
        n = len(t["seeds"])
        cells = [_cell(t["columns"][c], fmt, n) for c, (_, fmt) in COLUMNS.items()]
        lines.append(f"| {VARIANTS[variant][0]} | {n} | " + " | ".join(cells) + " |")
    if any(t["vs_reference"] for t in tab.values()):
        lines += ["", f"Minus {VARIANTS[REFERENCE][0]}, paired by seed:", ""]
        lines.append("| variant | " + " | ".join(COLUMNS[c][0] for c in PAIRED) + " |")
        lines.append("|" + "---|" * (len(PAIRED) + 1))
        for variant, t in tab.items():
            if t["vs_reference"]:
                cells = [
                    stats.format_ci(t["vs_reference"][c], COLUMNS[c][1].replace("{:", "{:+"))
                    for c in PAIRED
                ]
                lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_variants(config, out: str, store_workdir: str, variants, seeds, k=None, log=print):
    """Every variant at every seed (each resumable: a stage whose outputs are current is
    skipped), L1 first at each seed so the others match its L0 (`matched_k`; `k` when l1
    is not among `variants`); the table is written to `<out>/variants.json` and
    `variants.md` after every run."""
    from xcoder_jax import config_check
    from xcoder_jax.pipeline import STAGES as PIPELINE_STAGES
    from xcoder_jax.pipeline import run_stage

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = sorted(variants, key=lambda v: v != "l1")  # stable: l1 first
    stage_fns = dict(PIPELINE_STAGES)
    rows: dict[str, dict[int, dict]] = {}
    tab: dict = {}
    for seed in seeds:  # seed-major: an interrupted sweep leaves every variant comparable
        for variant in variants:
            k_seed = None if variant == "l1" else matched_k(rows.get("l1", {}).get(seed), k)
            run = run_dir(out, variant, seed)
            c = variant_config(config, variant, seed, k_seed or config.crosscoder.k)
            config_check.check(c)
            link_store(run, store_workdir)
            for name in STAGES:
                run_stage(f"{variant} seed {seed}: {name}", stage_fns[name], c, run)
            rows.setdefault(variant, {})[seed] = {**row(run), "k": k_seed}
            log(f"{variant} seed {seed}: k {k_seed}, L0 {rows[variant][seed]['l0']:.2f}")
            tab = table(rows)
            write(out, rows, tab)  # after every run: nothing measured is lost
    return tab


def collect(out: str, variants, seeds) -> dict:
    """The table from the runs already in `out` (those with both results files), written
    again; the runs are not touched."""
    rows: dict[str, dict[int, dict]] = {}
    for variant in variants:
        for seed in seeds:
            run = run_dir(out, variant, seed)
            if all(os.path.exists(p) for p in _results(run)):
                rows.setdefault(variant, {})[seed] = row(run)
    tab = table(rows)
    write(out, rows, tab)
    return tab


def write(out: str, rows: dict, tab: dict) -> None:
    payload = {"rows": {v: {str(s): r for s, r in ps.items()} for v, ps in rows.items()},
               "table": tab, "variants": {v: VARIANTS[v] for v in rows},
               "recipe": RECIPE, "anneal_frac": ANNEAL_FRAC, "reference": REFERENCE}  # fmt: skip
    atomic_write_json(os.path.join(out, JSON), payload)
    atomic_write_bytes(os.path.join(out, MARKDOWN), lambda f: f.write(markdown(tab).encode()))
