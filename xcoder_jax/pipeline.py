"""The main job: every stage in order, each skipped when its outputs are complete.

Each stage function is itself resumable and leaves complete outputs alone, so rerunning the
pipeline after an interruption continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def _zoo(config, workdir: str) -> str:
    if "zoo" not in (config.models.base, config.models.distilled):
        return "skipped (real models)"
    from xcoder_jax.zoo import build_zoo

    report = build_zoo(config, workdir)
    main = report["sizes"][str(config.zoo.main_size)]
    return (
        f"marker rate base {main['base']['marker_rate']:.0%} / distilled "
        f"{main['distilled']['marker_rate']:.0%}; accuracy base {main['base']['accuracy']:.0%} / "
        f"distilled {main['distilled']['accuracy']:.0%}"
    )


def _extract(config, workdir: str) -> str:
    from xcoder_jax.activations import extract

    manifest = extract(config, workdir)
    m = manifest
    return f"{m['n_rows']} rows from {m['n_docs']} documents at block {m['layer']}"


def _train(config, workdir: str) -> str:
    from xcoder_jax.train import train_and_evaluate

    final = train_and_evaluate(config, workdir)
    fve = " / ".join(f"{v:.3f}" for v in final["fve"])
    dead = final["dead_fraction"]
    return f"held-out FVE {fve} (base / distilled), L0 {final['l0']:.1f}, dead {dead:.1%}"


STAGES: list[tuple[str, Callable[[object, str], str]]] = [
    ("zoo", _zoo),
    ("extract", _extract),
    ("train", _train),
]


def run(config, workdir: str) -> dict[str, str]:
    """Runs every stage; returns {stage: one-line summary}."""
    summary = {}
    for name, stage in STAGES:
        start = time.time()
        print(f"== {name}", flush=True)
        summary[name] = stage(config, workdir)
        print(f"== {name}: {summary[name]} ({time.time() - start:.0f}s)", flush=True)
    return summary
