"""Replication: the whole study once per seed, and which declared findings it confirms.

Each seed runs every stage of the pipeline in its own workdir, `<workdir>/seed<s>` (zoo,
activations, crosscoder, analyses: nothing is shared between seeds, and `config.seed`
drives every random choice of a run). Each seed's stages are resumable, so a killed
replication continues where it stopped.

What is tested is the declared family (`xcoder_jax.family`: written before any seed was run,
never edited after). A finding is read from one seed's results as an effect with its 95% CI
and an expected sign. Seeds in `family.EXPLORATORY_SEEDS` are shown but not counted; over
the other (confirmatory) seeds each finding gets

- how many have a point estimate of the expected sign, and how many a CI that excludes 0 on
  the expected side (per-seed power, not replication);
- a random-effects pooled effect (`stats.random_effects`: DerSimonian-Laird, Hartung-Knapp
  t interval) with the between-seed SD tau, each seed's standard error read off its CI
  (`stats.se_from_ci`); and its two-sided p-value;
- the Holm-Bonferroni decision over the whole family (`stats.holm`, family-wise alpha
  `family.ALPHA`). A finding is *confirmed* when Holm rejects and the pooled effect has the
  expected sign, *reversed* when Holm rejects with the other sign.

No result is read on trust: `read_results` accepts a stage's results file only when its
recorded fingerprint is the one the stage itself would accept for this seed's config
(`stage.done`), and refuses it otherwise (`StaleResultError`). A seed whose run fails
contributes nothing: the files alone cannot tell which of its stages this run wrote (a stage
that failed, or one after it, may have left an older run's file), so none is counted; the
failure is recorded and `ReplicationError` raised once the table is written.

Writes `<workdir>/replication.json` and `<workdir>/replication.md`.
"""

from __future__ import annotations

import copy
import json
import os

from ml_collections import ConfigDict

from xcoder_jax import control_pair, family, pipeline, stage, stats
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.fileio import atomic_write_bytes, atomic_write_json

JSON, MARKDOWN = "replication.json", "replication.md"

# name -> (stage dir, results file, the pair it was run on: "main" or "no_loop", the
# negative-control pair of `control_pair`).
STAGE_RESULTS = {
    "analysis": ("analysis", "summary.json", "main"),
    "steering": ("steering", "results.json", "main"),
    "ablation": ("ablation", "results.json", "main"),
    "geometry": ("geometry", "results.json", "main"),
    "steering_no_loop": ("steering", "results.json", "no_loop"),
}


class StaleResultError(XcoderError, RuntimeError):
    """A stage's results file on disk does not belong to the run being tabulated."""


class ReplicationError(XcoderError, RuntimeError):
    """Some seeds' runs failed or left stale results; the table of the others was written."""


def _expected_fingerprint(name: str, config, workdir: str) -> dict:
    """The fingerprint stage `name` compares with `stage.done` for `config` in `workdir`."""
    name = name.removesuffix("_no_loop")
    if name == "analysis":
        from xcoder_jax.activations import ActivationStore
        from xcoder_jax.analysis.run import fingerprint

        store = ActivationStore(wd.activations_dir(workdir), verify=False)
        return fingerprint(config, workdir, store)
    if name == "steering":
        from xcoder_jax.steering.sweep import fingerprint
    elif name == "ablation":
        from xcoder_jax.ablation.experiment import fingerprint
    else:
        from xcoder_jax.geometry.study import fingerprint
    return fingerprint(config, workdir)


def read_results(workdir: str, config) -> dict:
    """{stage: its results} of one run of `config` in `workdir`; an absent file is an absent
    key (not measured). Raises StaleResultError for a file whose fingerprint is not the one
    the stage would accept now (another config, other inputs, an older format), or whose
    inputs are gone so that it cannot be checked."""
    out = {}
    pairs = {"main": (config, workdir)}
    if control_pair.applies(config):
        pairs["no_loop"] = (control_pair.config_for(config, workdir), wd.control_pair_dir(workdir))
    for name, (stage_name, filename, pair) in STAGE_RESULTS.items():
        if pair not in pairs:
            continue
        cfg, pair_dir = pairs[pair]
        path = os.path.join(wd.stage_dir(pair_dir, stage_name), filename)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            stored = json.load(f)
        try:
            expected = stage.canonical(_expected_fingerprint(name, cfg, pair_dir))
        except (XcoderError, OSError, ValueError, KeyError) as e:
            raise StaleResultError(
                f"{path} cannot be checked against this run ({type(e).__name__}: {e}); rerun "
                "the seed or remove the file"
            ) from e
        have = stored.get("fingerprint") if isinstance(stored, dict) else None
        if have != expected:
            have = have if isinstance(have, dict) else {}
            differ = sorted(k for k in set(have) | set(expected) if have.get(k) != expected.get(k))
            raise StaleResultError(
                f"{path} was written by another run (its fingerprint differs in: "
                f"{', '.join(differ) or 'everything'}); rerun the seed so the stage replaces "
                "it, or remove it"
            )
        out[name] = stored
    return out


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed{seed}")


def _mean(ci: dict | None) -> float | None:
    return ci.get("mean") if isinstance(ci, dict) else None


def _direction(ci: dict | None) -> int:
    """The sign of an effect's point estimate (0 when it is 0 or missing)."""
    mean = _mean(ci)
    return 0 if mean is None or mean == 0 else (1 if mean > 0 else -1)


def tabulate(per_seed: dict[int, dict]) -> dict:
    """replication.json's content from {seed: read_results(...)} ({} for a seed that
    counts for nothing)."""
    explore = sorted(s for s in per_seed if s in family.EXPLORATORY_SEEDS)
    confirm = sorted(s for s in per_seed if s not in family.EXPLORATORY_SEEDS)
    rows = []
    for f in family.FAMILY:
        cis = {s: f.read(per_seed[s]) for s in sorted(per_seed)}
        measured = [cis[s] for s in confirm if _mean(cis[s]) is not None]
        pool = [(ci["mean"], se) for ci in measured if (se := stats.se_from_ci(ci)) is not None]
        pooled = stats.random_effects([m for m, _ in pool], [se for _, se in pool])
        rows.append({
            "name": f.name,
            "claim": f.claim,
            "expected_sign": f.sign,
            "reads": f.key,
            "seeds_confirmatory": len(confirm),
            "seeds_measured": len(measured),
            "seeds_expected_sign": sum(_direction(ci) == f.sign for ci in measured),
            "seeds_ci_excludes_zero": sum(stats.sign(ci) == f.sign for ci in measured),
            "seeds_pooled": len(pool),
            "pooled": pooled,
            "exploratory": {str(s): cis[s] for s in explore},
            "per_seed": {str(s): cis[s] for s in confirm},
        })  # fmt: skip
    p_values = [row["pooled"]["p"] for row in rows]
    adjusted = stats.holm_adjusted(p_values)
    rejected = stats.holm(p_values, family.ALPHA)
    for row, q, reject in zip(rows, adjusted, rejected, strict=True):
        row["holm_p"], row["holm_rejects"] = q, reject
        pooled_sign = _direction(row["pooled"])
        if reject:
            row["verdict"] = "confirmed" if pooled_sign == row["expected_sign"] else "reversed"
        else:
            row["verdict"] = "not confirmed" if row["seeds_measured"] else "not measured"
    return {
        "family_version": family.FAMILY_VERSION,
        "family_sha256": family.digest(),
        "seeds": sorted(per_seed),
        "exploratory_seeds": explore,
        "confirmatory_seeds": confirm,
        "alpha": family.ALPHA,
        "test": (
            f"per finding, the two-sided p-value of its random-effects pooled effect over the "
            f"confirmatory seeds; Holm-Bonferroni over the family of {len(rows)} findings at "
            f"family-wise alpha {family.ALPHA} (an unmeasured finding counts in the family and "
            "is never rejected); confirmed = rejected with the pooled effect on the expected "
            "side, reversed = rejected on the other side"
        ),
        "standard_errors": "each seed's se = (hi - lo) / (2 * 1.96) of its 95% CI (exact for a "
        "normal interval, approximate for t and bootstrap ones); a seed without an interval "
        "of positive width is counted in the sign columns but not pooled",
        "findings": rows,
    }


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.0e}"


def markdown(table: dict) -> str:
    """The replication table as Markdown (the README's results section)."""
    explore = table["exploratory_seeds"]
    n = len(table["confirmatory_seeds"])
    head = ["finding (expected sign)"]
    head += [f"seed {s} (exploratory)" for s in explore]
    head += [f"expected sign (of {n} seeds)", "CI excludes 0", "pooled, random effects "
             "[95% CI]", "tau", "Holm p", "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["findings"]:
        measured = row["seeds_measured"]
        of = "" if measured == n else f" (of {measured} measured)"
        tau = row["pooled"].get("tau")
        cells = [f"{row['claim']} ({'+' if row['expected_sign'] > 0 else '-'})"]
        cells += [stats.format_ci(row["exploratory"].get(str(s)), "{:+.3g}") for s in explore]
        cells += [
            f"{row['seeds_expected_sign']}{of}",
            str(row["seeds_ci_excludes_zero"]),
            stats.format_ci(row["pooled"], "{:+.3g}"),
            "n/a" if tau is None else f"{tau:.3g}",
            _p(row["holm_p"]),
            f"**{row['verdict']}**" if row["verdict"] == "confirmed" else row["verdict"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for seed, why in sorted((table.get("errors") or {}).items()):
        lines.append(f"Seed {seed} is not counted: {why}\n")
    confirm = ", ".join(map(str, table["confirmatory_seeds"])) or "none"
    lines.append(
        f"Family v{table['family_version']}: {len(table['findings'])} findings declared in "
        "`xcoder_jax/family.py` before any seed was run. Exploratory seeds (shown, never "
        f"pooled): {', '.join(map(str, explore)) or 'none run'}; confirmatory seeds: {confirm}. "
        "Expected sign / CI excludes 0: confirmatory seeds whose point estimate has the "
        "expected sign / whose 95% CI excludes 0 on the expected side. Pooled: "
        "DerSimonian-Laird random effects over the confirmatory seeds (each seed's se = its "
        "CI width / 3.92), Hartung-Knapp t interval; tau: between-seed SD. Holm p: the pooled "
        "effect's two-sided p-value, Holm-adjusted over the whole family; confirmed when it is "
        f"<= {table['alpha']} and the pooled effect has the expected sign."
    )
    return "\n".join(lines) + "\n"


def run_replication(config, workdir: str, seeds: list[int], log=print) -> dict:
    """Runs the pipeline for every seed (resumable), then writes and returns the table.

    A seed whose run fails, or whose results are refused as stale, is recorded in the
    table's "errors" and counts for nothing; the other seeds go on, and ReplicationError is
    raised after the table is written.
    """
    if not seeds:
        raise ConfigError("no seeds to replicate over")
    if family.digest() != family.FAMILY_SHA256:
        raise ConfigError(
            "the declared family (xcoder_jax/family.py) was changed without a new "
            "FAMILY_VERSION and FAMILY_SHA256: a changed family is a new replication"
        )
    per_seed, errors = {}, {}
    for n, seed in enumerate(seeds, 1):
        log(f"=== seed {seed} ({n}/{len(seeds)})")
        c, w = with_seed(config, seed), seed_workdir(workdir, seed)
        per_seed[seed] = {}
        try:
            pipeline.run(c, w)
            per_seed[seed] = read_results(w, c)
        except pipeline.PipelineError:
            raise  # the workdir is locked, unwritable or full: no seed can run
        except Exception as e:  # one seed's failure must not hide the others' results
            errors[str(seed)] = f"{type(e).__name__}: {e}"
            log(f"=== seed {seed} not counted: {errors[str(seed)]}")
    table = tabulate(per_seed) | {"errors": errors}
    atomic_write_json(os.path.join(workdir, JSON), table)
    text = markdown(table).encode()
    atomic_write_bytes(os.path.join(workdir, MARKDOWN), lambda f: f.write(text))
    if errors:
        raise ReplicationError(
            f"seeds {sorted(errors)} are not counted (see {JSON}): their runs failed or left "
            "stale results"
        )
    return table


def with_seed(config, seed: int):
    """A copy of `config` whose seed, and every section's seed that follows it, is `seed`.

    Fields referring to `config.seed` follow it; a section seed that equals the run's seed
    but lost its reference (e.g. a config resolved before) is set too. A section seed set to
    another value on purpose is kept.
    """
    old = config.seed
    c = copy.deepcopy(config)
    c.seed = seed
    for section in c.values():
        if isinstance(section, ConfigDict) and "seed" in section and section.seed == old:
            section.seed = seed
    return c.copy_and_resolve_references()
