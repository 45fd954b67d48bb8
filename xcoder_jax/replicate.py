"""Replication: the whole study once per seed, and which findings hold in how many seeds.

Each seed runs every stage of the pipeline in its own workdir, `<workdir>/seed<s>` (zoo,
activations, crosscoder, analyses: nothing is shared between seeds, and `config.seed`
drives every random choice of a run). Each seed's stages are resumable, so a killed
replication continues where it stopped.

A finding is read from one seed's results as an effect with its 95% CI and an expected sign;
it *holds* in that seed when the CI excludes 0 on the expected side. Across seeds, the pooled
effect is the mean of the per-seed effects with a Student-t 95% CI over seeds (seeds are the
independent units). Writes `<workdir>/replication.json` and `<workdir>/replication.md`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from xcoder_jax import pipeline, stats
from xcoder_jax import workdir as wd
from xcoder_jax.activations.manifest import atomic_write_bytes, atomic_write_json
from xcoder_jax.errors import ConfigError, XcoderError

JSON, MARKDOWN = "replication.json", "replication.md"
ABLATION_FRAC = 0.1  # the paper's headline fraction


@dataclass(frozen=True)
class Finding:
    """A claim of the study: `read(results)` gives its effect as a CI dict (or None)."""

    name: str
    claim: str
    sign: int  # +1: holds when the CI lies above 0; -1: below 0
    read: Callable[[dict], dict | None]


def _get(obj, *path):
    """obj[path[0]][path[1]]... or None where a step is missing."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _steered(results: dict, spec: str, metric: str) -> dict | None:
    """Paired change of `metric` at the largest positive alpha of set `spec` (distilled)."""
    conds = [
        c
        for c in _get(results, "steering", "conditions") or []
        if c["set"] == spec and c["model"] == "distilled" and c["alpha"] > 0
    ]
    if not conds:
        return None
    return _get(max(conds, key=lambda c: c["alpha"]), "vs_clean", metric)


def _ablated(results: dict, cat: str, *path) -> dict | None:
    rows = _get(results, "ablation", "categories", cat, "by_frac") or []
    row = next((r for r in rows if abs(r["frac"] - ABLATION_FRAC) < 1e-9), None)
    return _get(row, *path)


def _geometry(results: dict, *path) -> dict | None:
    g = results.get("geometry") or {}
    largest, k = g.get("largest"), g.get("plot_n_components")
    return _get(g, "pairs", largest, "pooled", str(k), *path)


def findings() -> list[Finding]:
    """The headline findings, in the order the report lists them."""
    out = []
    for cat in ("self_reflection", "deductive", "verification"):
        out.append(Finding(
            f"{cat}_latents_lean_distilled",
            f"latents firing on {cat} markers have a higher mean NRN than the other alive "
            "latents",
            +1, lambda r, c=cat: _get(r, "analysis", "categories", c, "nrn_minus_alive"),
        ))  # fmt: skip
    for cat in ("self_reflection", "deductive", "alternative", "contrastive", "verification"):
        out.append(Finding(
            f"{cat}_top_latents_distilled_only",
            f"distilled-only latents are over-represented among the top {cat} latents "
            "(share minus their share of alive latents)",
            +1, lambda r, c=cat: _get(r, "analysis", "categories", c, "top_distilled_only",
                                      "excess"),
        ))  # fmt: skip
    out.append(Finding(
        "steer_self_reflection_raises_wait",
        "steering the distilled model along its top self-reflection latent raises the rate "
        "of self-reflection markers (per 100 tokens, paired against alpha = 0)",
        +1, lambda r: _steered(r, "self_reflection:1", "self_reflection_per_100"),
    ))  # fmt: skip
    out.append(Finding(
        "steer_deductive_shortens_traces",
        "steering the distilled model along its top deductive latent shortens its traces "
        "(tokens, paired against alpha = 0)",
        -1, lambda r: _steered(r, "deductive:1", "tokens"),
    ))  # fmt: skip
    for cat in ("self_reflection", "deductive", "alternative", "contrastive"):
        out.append(Finding(
            f"ablate_{cat}_targeted_below_matched",
            f"ablating the {cat} latents (frac {ABLATION_FRAC}) lowers the marker logit in the "
            "distilled model more than activity-matched random latents",
            -1, lambda r, c=cat: _ablated(r, c, "distilled", "targeted_minus_matched"),
        ))  # fmt: skip
        out.append(Finding(
            f"ablate_{cat}_distilled_more_than_base",
            f"ablating the {cat} latents lowers the marker logit more in the distilled model "
            "than in the base (distilled minus base, of targeted minus matched)",
            -1, lambda r, c=cat: _ablated(r, c, "distilled_minus_base"),
        ))  # fmt: skip
    out.append(Finding(
        "geometry_distilled_below_base_at_largest_size",
        "at the largest size, the distilled model's parallelogram loss is below the base's "
        "(base minus distilled, mean over relations)",
        +1, lambda r: _geometry(r, "base_minus_distilled"),
    ))  # fmt: skip
    for role in wd.ROLES:
        out.append(Finding(
            f"geometry_true_below_shuffled_{role}",
            f"at the largest size, true relations have a lower parallelogram loss than "
            f"shuffled pairings in the {role} model (mean over relations)",
            -1, lambda r, m=role: _geometry(r, "true_minus_shuffled", m),
        ))  # fmt: skip
    return out


STAGE_RESULTS = {
    "analysis": ("analysis", "summary.json"),
    "steering": ("steering", "results.json"),
    "ablation": ("ablation", "results.json"),
    "geometry": ("geometry", "results.json"),
}


def read_results(workdir: str) -> dict:
    """{stage: its results file} of one finished run (absent stages are missing keys)."""
    out = {}
    for name, (stage, filename) in STAGE_RESULTS.items():
        path = os.path.join(wd.stage_dir(workdir, stage), filename)
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
    return out


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed{seed}")


def tabulate(per_seed: dict[int, dict]) -> dict:
    """replication.json's content from {seed: read_results(...)}."""
    rows = []
    for f in findings():
        seeds = {}
        for seed, results in per_seed.items():
            ci = f.read(results)
            held = stats.sign(ci) == f.sign
            seeds[str(seed)] = {"ci": ci, "holds": held}
        effects = [s["ci"]["mean"] for s in seeds.values() if _get(s, "ci", "mean") is not None]
        pooled = stats.t_ci(effects)
        pooled["method"] = "mean of the per-seed effects; Student-t 95% CI over seeds"
        rows.append({
            "name": f.name,
            "claim": f.claim,
            "expected_sign": f.sign,
            "seeds_run": len(seeds),
            "seeds_measured": len(effects),
            "seeds_held": sum(s["holds"] for s in seeds.values()),
            "pooled": pooled,
            "pooled_holds": stats.sign(pooled) == f.sign,
            "per_seed": seeds,
        })  # fmt: skip
    return {
        "seeds": sorted(per_seed),
        "holds": "a finding holds in a seed when its 95% CI excludes 0 on the expected side",
        "findings": rows,
    }


def markdown(table: dict) -> str:
    """The replication table as Markdown (the README's results section)."""
    lines = [
        f"| finding | holds in (of {len(table['seeds'])} seeds) | pooled effect [95% CI] |",
        "|---|---|---|",
    ]
    for row in table["findings"]:
        ci = stats.format_ci(row["pooled"], "{:+.3g}")
        mark = " *" if row["pooled_holds"] else ""
        measured = row["seeds_measured"]
        held = str(row["seeds_held"])
        if measured < row["seeds_run"]:
            held += f" (measured in {measured})"
        lines.append(f"| {row['claim']} | {held} | {ci}{mark} |")
    lines.append("")
    for seed, why in sorted((table.get("errors") or {}).items()):
        lines.append(f"Seed {seed} failed ({why}); its finished stages are counted.\n")
    lines.append(
        "A finding holds in a seed when its 95% CI in that seed excludes 0 on the expected "
        "side. Pooled: mean of the per-seed effects, Student-t CI over seeds; * marks a pooled "
        "CI that excludes 0 on the expected side."
    )
    return "\n".join(lines) + "\n"


class ReplicationError(XcoderError, RuntimeError):
    """Some seeds' runs failed; the table of the others was still written."""


def run_replication(config, workdir: str, seeds: list[int], log=print) -> dict:
    """Runs the pipeline for every seed (resumable), then writes and returns the table.

    A seed whose run fails is recorded in the table's "errors" (its finished stages still
    count) and the other seeds go on; ReplicationError is raised after the table is written.
    """
    if not seeds:
        raise ConfigError("no seeds to replicate over")
    per_seed, errors = {}, {}
    for n, seed in enumerate(seeds, 1):
        log(f"=== seed {seed} ({n}/{len(seeds)})")
        try:
            pipeline.run(_with_seed(config, seed), seed_workdir(workdir, seed))
        except pipeline.PipelineError:
            raise  # the workdir is locked, unwritable or full: no seed can run
        except Exception as e:  # one seed's failure must not hide the others' results
            errors[str(seed)] = f"{type(e).__name__}: {e}"
            log(f"=== seed {seed} failed: {errors[str(seed)]}")
        per_seed[seed] = read_results(seed_workdir(workdir, seed))
    table = tabulate(per_seed) | {"errors": errors}
    atomic_write_json(os.path.join(workdir, JSON), table)
    text = markdown(table).encode()
    atomic_write_bytes(os.path.join(workdir, MARKDOWN), lambda f: f.write(text))
    if errors:
        raise ReplicationError(
            f"seeds {sorted(errors)} failed (see {JSON}); the table counts their finished stages"
        )
    return table


def _with_seed(config, seed: int):
    """A copy of `config` whose seed (and every field referring to it) is `seed`."""
    c = config.copy_and_resolve_references()
    c.seed = seed
    for section in ("steering", "ablation"):
        if section in c and "seed" in c[section]:
            c[section].seed = seed
    return c
