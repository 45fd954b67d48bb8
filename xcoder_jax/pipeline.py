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

from xcoder_jax import headlines
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

    return headlines.zoo(build_zoo(config, workdir), config)


def _extract(config, workdir: str) -> str:
    from xcoder_jax.activations import extract

    return headlines.extract(extract(config, workdir))


def _train(config, workdir: str) -> str:
    from xcoder_jax.train import train_and_evaluate

    return headlines.train(train_and_evaluate(config, workdir))


def _formats(config, workdir: str) -> str:
    if not config.export.formats:
        return "skipped (export.formats is empty)"
    from xcoder_jax.formats import write_formats

    return headlines.formats(write_formats(config, workdir))


def _analyze(config, workdir: str) -> str:
    from xcoder_jax.analysis import run_analysis

    return headlines.analysis(run_analysis(config, workdir))


def _steer(config, workdir: str) -> str:
    from xcoder_jax.steering import run_steering

    return headlines.steering(run_steering(config, workdir), config)


def _ablate(config, workdir: str) -> str:
    from xcoder_jax.ablation import run_ablation

    return headlines.ablation(run_ablation(config, workdir), config)


def _geometry(config, workdir: str) -> str:
    g = config.geometry
    if not (g.zoo_relations and "zoo" in (config.models.base, config.models.distilled)) and not (
        g.relation_files
    ):
        return "skipped (no relation sets: set --config.geometry.relation_files)"
    from xcoder_jax.geometry import run_geometry

    return headlines.geometry(run_geometry(config, workdir))


def _no_loop_pair(config, workdir: str) -> str:
    """The negative-control pair's stages (`control_pair.STAGES`) in its own workdir."""
    from xcoder_jax import control_pair

    if not control_pair.applies(config):
        return "skipped (no no-loop arm: real models or zoo.control_teacher is empty)"
    sub, c = wd.control_pair_dir(workdir), control_pair.config_for(config, workdir)
    os.makedirs(sub, exist_ok=True)
    stages = dict(STAGES)
    for name in control_pair.STAGES:
        run_stage(f"no_loop pair: {name}", stages[name], c, sub)
    return f"{', '.join(control_pair.STAGES)} of base vs no-loop distilled, in no_loop/"


def _report(config, workdir: str) -> str:
    from xcoder_jax.study_report import summarize_report, write_study_report

    return summarize_report(write_study_report(config, workdir))


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
    ("report", _report),
]


def _outputs(name: str, workdir: str) -> list[str]:
    """The files and folders stage `name` writes: when none of their files changed, the
    stage found its outputs complete and the summary says it was skipped."""
    stage_dir = {"analyze": "analysis", "steer": "steering", "ablate": "ablation"}
    if name == "zoo":
        return [wd.models_dir(workdir)]
    if name == "extract":
        return [wd.activations_dir(workdir)]
    if name == "train":
        return [wd.checkpoints_dir(workdir), wd.metrics_path(workdir), wd.export_dir(workdir)]
    if name == "formats":
        return [wd.format_dir(workdir, "")]
    if name == "no_loop_pair":
        return [wd.control_pair_dir(workdir)]
    if name == "report":
        return [wd.study_report_path(workdir)]
    return [wd.stage_dir(workdir, stage_dir.get(name, name))]


def _snapshot(paths: list[str]) -> dict[str, tuple[int, int]]:
    """{file: (mtime_ns, size)} of every file under `paths`."""
    out = {}
    for top in paths:
        if os.path.isfile(top):
            st = os.stat(top)
            out[top] = (st.st_mtime_ns, st.st_size)
        for root, _, files in os.walk(top):
            for f in files:
                p = os.path.join(root, f)
                with contextlib.suppress(OSError):  # a temporary file renamed meanwhile
                    st = os.stat(p)
                    out[p] = (st.st_mtime_ns, st.st_size)
    return out


def run_stage(name: str, stage, config, workdir: str) -> str:
    """One stage with its progress lines; a full disk or an unwritable workdir becomes a
    PipelineError naming the stage."""
    start = time.time()
    print(f"== {name}", flush=True)
    top = name.split(": ")[-1]  # a no-loop pair stage is named "no_loop pair: <stage>"
    before = _snapshot(_outputs(top, workdir))
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
    if not line.startswith("skipped") and _snapshot(_outputs(top, workdir)) == before:
        line = f"skipped (done); {line}"
    line = headlines.shorten(line)
    print(f"== {name}: {line} ({time.time() - start:.0f}s)", flush=True)
    return line


def summary_lines(workdir: str, summary: dict[str, str]) -> list[str]:
    """The final screen: where to look, then one line per stage (at most 120 characters)."""
    head = f"Summary of {workdir}: open {wd.study_report_path(workdir)}"
    return [head, *(f"  {stage:<12} {line}" for stage, line in summary.items())]


def run(config, workdir: str) -> dict[str, str]:
    """Validates `config` and its inputs, then runs every stage under the workdir lock;
    returns {stage: one-line summary}."""
    from xcoder_jax import config_check, inputs

    config_check.check(config)
    inputs.check(config)
    with workdir_lock(workdir):
        return {name: run_stage(name, stage, config, workdir) for name, stage in STAGES}
