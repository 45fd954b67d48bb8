"""The main job: every stage in order, each skipped when its outputs are complete.

Each stage function is itself resumable and leaves complete outputs alone, so rerunning the
pipeline after an interruption continues where it stopped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from xcoder_jax import workdir as wd
from xcoder_jax.errors import XcoderError

LOCK_FILE = ".pipeline.lock"


class PipelineError(XcoderError, RuntimeError):
    """The pipeline cannot run here: workdir locked, unwritable, or the disk is full."""


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds an exclusive lock on `workdir` so two pipelines never interleave in it.

    The lock is an flock on <workdir>/.pipeline.lock: the OS releases it when the process
    dies, so a killed run never leaves a stale lock behind.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PipelineError(f"cannot write to workdir {workdir}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise PipelineError(
                f"another pipeline (pid {holder}) is running on {workdir}; wait for it or use "
                "another workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _zoo(config, workdir: str) -> str:
    if "zoo" not in (config.models.base, config.models.distilled):
        return "skipped (real models)"
    from xcoder_jax.zoo import build_zoo

    report = build_zoo(config, workdir)
    main = report["sizes"][str(config.zoo.main_size)]
    accuracy = " / ".join(f"{arm} {main[arm]['accuracy']:.0%}" for arm in wd.ARMS if arm in main)
    met = sum(bool(r.get("criterion", {}).get("met")) for r in report["sizes"].values())
    return (
        f"main size h{config.zoo.main_size}: accuracy {accuracy}; marker rate distilled "
        f"{main['distilled']['marker_rate']:.0%}; distillation criterion met at {met}/"
        f"{len(report['sizes'])} sizes (models/zoo.json)"
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


def _formats(config, workdir: str) -> str:
    if not config.export.formats:
        return "skipped (export.formats is empty)"
    from xcoder_jax.formats import write_formats

    return "; ".join(f"{k} {v}" for k, v in write_formats(config, workdir).items())


def _analyze(config, workdir: str) -> str:
    from xcoder_jax.analysis import run_analysis, summarize

    return summarize(run_analysis(config, workdir))


def _steer(config, workdir: str) -> str:
    from xcoder_jax.steering import run_steering, summarize_steering

    return summarize_steering(run_steering(config, workdir))


def _ablate(config, workdir: str) -> str:
    from xcoder_jax.ablation import run_ablation, summarize_ablation

    return summarize_ablation(run_ablation(config, workdir))


def _geometry(config, workdir: str) -> str:
    g = config.geometry
    if not (g.zoo_relations and "zoo" in (config.models.base, config.models.distilled)) and not (
        g.relation_files
    ):
        return "skipped (no relation sets: set --config.geometry.relation_files)"
    from xcoder_jax.geometry import run_geometry, summarize

    return summarize(run_geometry(config, workdir))


def _no_loop_pair(config, workdir: str) -> str:
    """The negative-control pair's stages (`control_pair.STAGES`) in its own workdir."""
    from xcoder_jax import control_pair

    if not control_pair.applies(config):
        return "skipped (no no-loop arm: real models or zoo.control_teacher is empty)"
    sub, c = wd.control_pair_dir(workdir), control_pair.config_for(config, workdir)
    os.makedirs(sub, exist_ok=True)
    stages = dict(STAGES)
    for name in control_pair.STAGES:
        _run_stage(f"no_loop pair: {name}", stages[name], c, sub)
    return f"{', '.join(control_pair.STAGES)} done in {sub} (each stage's summary above)"


STAGES: list[tuple[str, Callable[[object, str], str]]] = [
    ("zoo", _zoo),
    ("extract", _extract),
    ("train", _train),
    ("formats", _formats),
    ("analyze", _analyze),
    ("steer", _steer),
    ("ablate", _ablate),
    ("geometry", _geometry),
    ("no_loop_pair", _no_loop_pair),
]


def _run_stage(name: str, stage, config, workdir: str) -> str:
    """One stage with its progress lines; a full disk or an unwritable workdir becomes a
    PipelineError naming the stage."""
    start = time.time()
    print(f"== {name}", flush=True)
    try:
        line = stage(config, workdir)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PipelineError(
                f"stage {name}: the disk holding {workdir} is full ({e}); free space "
                "and rerun: complete outputs are kept and the stage resumes"
            ) from e
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise PipelineError(f"stage {name}: cannot write in {workdir}: {e}") from e
        raise
    print(f"== {name}: {line} ({time.time() - start:.0f}s)", flush=True)
    return line


def run(config, workdir: str) -> dict[str, str]:
    """Runs every stage under the workdir lock; returns {stage: one-line summary}."""
    with workdir_lock(workdir):
        return {name: _run_stage(name, stage, config, workdir) for name, stage in STAGES}
