"""Crosscoder variants compared on one store: the same data, several seeds, matched L0.

Each variant is a set of config overrides (`VARIANTS`) trained and analysed in its own
workdir, `<out>/<variant>/seed<s>/`, whose `models/` and `activations/` link to one store's
workdir, so every variant reads the same model pair and the same activation rows. The
stages run per workdir are train, analyze and ablate (`STAGES`); steering is left out (its
sampling is most of a demo's time). The BatchTopK family runs at `k = MATCHED_K`, near the
L1 crosscoder's held-out L0 on the demo store (9.7), and the table reports the L0 each run
measured so the match can be checked.

Per run, `row` reads from the stages' outputs: held-out FVE per model, L0 and the dead
fraction (analysis/summary.json), the count of distilled-only latents, the share of them
that latent scaling flags as false exclusives, the half-step KL closed by the distilled-only
set minus activity-matched random sets, and how many categories' ablated sets lower their
marker below matched random latents (CI below 0). `table` gives each figure's mean over
seeds with a Student-t 95% interval (`stats.t_ci`), and `markdown` prints it.
"""

from __future__ import annotations

import json
import os

from xcoder_jax import config_util, stats
from xcoder_jax import workdir as wd
from xcoder_jax.fileio import atomic_write_bytes, atomic_write_json

MATCHED_K = 10
# name -> (what it is, its loss, overrides of config.crosscoder). Every variant starts from
# the config given (the demo's: L1, the paper's loss); a BatchTopK-family loss takes that
# family's recipe first (`config_util.batchtopk`: AuxK, b_dec at the store mean) at
# k = MATCHED_K, then the variant's own fields.
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "l1": ("L1 (the paper's loss)", "l1", {}),
    "batchtopk": ("BatchTopK", "batchtopk", {}),
    "batchtopk_anneal_center": (
        "BatchTopK, k annealed from 4k over 300 steps, centred",
        "batchtopk",
        {"k_anneal_steps": 300, "center": True},
    ),
    "matryoshka": ("Matryoshka BatchTopK", "matryoshka", {}),
    "dedicated": (
        "BatchTopK, 5% + 5% dedicated latents",
        "batchtopk",
        {"exclusive": (0.05, 0.05)},
    ),
}
STAGES = ("train", "analyze", "ablate")
LINKED = (wd.models_dir, wd.activations_dir)  # what every variant's workdir shares
JSON, MARKDOWN = "variants.json", "variants.md"
RESULTS = {"analysis": "summary.json", "ablation": "results.json"}  # what `row` reads
# column -> (header, format of its mean and interval)
COLUMNS = {
    "fve_base": ("held-out FVE base", "{:.3f}"),
    "fve_distilled": ("held-out FVE distilled", "{:.3f}"),
    "l0": ("L0", "{:.1f}"),
    "dead": ("dead", "{:.1%}"),
    "n_distilled_only": ("distilled-only latents", "{:.0f}"),
    "false_exclusive": ("false-exclusive share", "{:.2f}"),
    "half_step_minus_random": ("half-step KL closed, minus random", "{:+.3f}"),
    "ablation_below_random": ("categories below random (ablation)", "{:.1f}"),
    "category_kl_beyond_random": ("category sets closing KL beyond random", "{:.1f}"),
}


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


def variant_config(config, variant: str, seed: int):
    """A copy of `config` with the variant's crosscoder overrides and `seed`."""
    from xcoder_jax.replicate import _with_seed

    _, loss, fields = VARIANTS[variant]
    c = _with_seed(config, seed)
    with c.unlocked():
        if loss == "l1":
            c.crosscoder.loss = loss
        else:
            config_util.batchtopk(c, k=MATCHED_K, loss=loss)
        for field, value in fields.items():
            c.crosscoder[field] = value
    return c


def _results(run: str) -> list[str]:
    return [os.path.join(wd.stage_dir(run, stage), name) for stage, name in RESULTS.items()]


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _mean(ci: dict | None):
    return ci.get("mean") if isinstance(ci, dict) else None


def row(run: str, config=None) -> dict:
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
        "false_exclusive": _mean(
            s["latent_scaling"]["distilled_only"].get("share_false_exclusive")
        ),
        "half_step_minus_random": _mean(half.get("fraction_closed")),
        "ablation_below_random": sum(stats.sign(h.get("targeted_minus_random")) < 0 for h in heads),
        "category_kl_beyond_random": sum(
            stats.sign(v.get("minus_random", {}).get("fraction_closed")) > 0
            for v in abl.get("half_step_kl", {}).get("categories", {}).values()
        ),
        "groups": s.get("groups"),
        "exclusive": s.get("exclusive"),
    }


def table(rows: dict[str, dict[int, dict]]) -> dict:
    """{variant: {column: t_ci over seeds}} from {variant: {seed: row}}."""
    out = {}
    for variant, per_seed in rows.items():
        cols = {}
        for col in COLUMNS:
            vals = [r[col] for r in per_seed.values() if r.get(col) is not None]
            cols[col] = stats.t_ci(vals)
        out[variant] = {"seeds": sorted(per_seed), "columns": cols}
    return out


def markdown(tab: dict) -> str:
    head = "| variant | seeds | " + " | ".join(h for h, _ in COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for variant, t in tab.items():
        cells = [
            stats.format_ci(t["columns"][c], fmt).replace(" [", "<br>[")
            for c, (_, fmt) in COLUMNS.items()
        ]
        lines.append(f"| {VARIANTS[variant][0]} | {len(t['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_variants(config, out: str, store_workdir: str, variants, seeds, log=print) -> dict:
    """Every variant at every seed (each resumable: a stage whose outputs are current is
    skipped), then the table, written to `<out>/variants.json` and `variants.md`."""
    from xcoder_jax import config_check
    from xcoder_jax.pipeline import STAGES as PIPELINE_STAGES
    from xcoder_jax.pipeline import _run_stage

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    stage_fns = dict(PIPELINE_STAGES)
    rows: dict[str, dict[int, dict]] = {}
    tab: dict = {}
    for seed in seeds:  # seed-major: an interrupted sweep leaves every variant comparable
        for variant in variants:
            run, c = run_dir(out, variant, seed), variant_config(config, variant, seed)
            config_check.check(c)
            link_store(run, store_workdir)
            for name in STAGES:
                _run_stage(f"{variant} seed {seed}: {name}", stage_fns[name], c, run)
            rows.setdefault(variant, {})[seed] = row(run, c)
            log(f"{variant} seed {seed}: {rows[variant][seed]}")
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
               "table": tab, "variants": {v: VARIANTS[v][1:] for v in rows}}  # fmt: skip
    atomic_write_json(os.path.join(out, JSON), payload)
    atomic_write_bytes(os.path.join(out, MARKDOWN), lambda f: f.write(markdown(tab).encode()))
