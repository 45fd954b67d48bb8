"""Training in several processes joined by jax.distributed (CPU devices, gloo collectives),
launched as the README shows: one process with 4 devices against 2 processes with 2 devices
each, the latent axis across the processes; one process killed mid-run; a resume on the
same and on another number of processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import strict_loads, synthetic_store
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore, BatchStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4  # in all, whatever the number of processes
STEPS, BATCH, EVERY = 20, 64, 5  # steps; rows a step; log every (checkpoint every 2x)
LOGGED = list(range(EVERY, STEPS + 1, EVERY))
SAVED, KILL_AT = 10, 14  # the checkpoint a killed run resumes from; the step it dies in

# The test's config: configs/tiny.py shrunk on the command line (as tests.conftest.train_config)
# on a ('data', 'model') = 2 x 2 mesh whose latent axis spans the processes.
FLAGS = {
    "crosscoder.d_model": 32,
    "crosscoder.n_latents": 128,
    "train.steps": STEPS,
    "train.batch_size": BATCH,
    "train.lr": 0.01,
    "train.log_every": EVERY,
    "train.eval_every": 2 * EVERY,
    "train.checkpoint_every": 2 * EVERY,
    "mesh.data": 2,
    "mesh.model": 2,
    "mesh.model_across_processes": True,
    "heartbeat_seconds": 10,
}

# launch/train.py with the same argv, counting exports and steps, and killing itself
# (SIGKILL, no clean-up) at step XC_DIE_AT when set.
_WRAPPED = """
import atexit, os, runpy, signal, sys, time
sys.path.insert(0, {root!r})
from xcoder_jax import export as export_module, sharding
die_at, calls = int(os.environ.get("XC_DIE_AT", "0")), [0]
real_step, real_export = sharding.ShardedStep.step, export_module.export
def step(self, *args):
    calls[0] += 1
    if calls[0] == die_at:
        # After the last checkpoint is committed (the others save with it in background).
        wait_for = os.path.join(os.environ["XC_WAIT_FOR"])
        for _ in range(600):
            if os.path.isdir(wait_for):
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args)
def export(*args):
    with open(os.environ["XC_LOG"], "a") as f:
        f.write("export\\n")
    return real_export(*args)
def report():
    with open(os.environ["XC_LOG"], "a") as f:
        f.write(f"steps {{calls[0]}}\\n")
sharding.ShardedStep.step, export_module.export = step, export
atexit.register(report)
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, n, i, port, *, wrapped, env=None, flags=None):
    """Process i of n: `python launch/train.py --config=configs/tiny.py --workdir=...
    --config.distributed=True --config.coordinator_address=127.0.0.1:PORT
    --config.num_processes=n --config.process_id=i` (no distributed flags when n == 1)."""
    script = os.path.join(ROOT, "launch", "train.py")
    args = [f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in {**FLAGS, **(flags or {})}.items()]
    if n > 1:
        args += [
            "--config.distributed=True",
            f"--config.coordinator_address=127.0.0.1:{port}",
            f"--config.num_processes={n}",
            f"--config.process_id={i}",
        ]
    code = ["-c", _WRAPPED.format(root=ROOT, script=script)] if wrapped else [script]
    full_env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // n}",
        "JAX_PLATFORMS": "cpu",
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": ROOT,
        "XC_LOG": os.path.join(workdir, f"log{i}"),
        # Runs of one shape share their compiled programs (the runs here are CPU-bound).
        "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(workdir), "..", "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, *code, *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start(workdir, n, *, wrapped=True, flags=None):
    port = _free_port()
    return [_launch(workdir, n, i, port, wrapped=wrapped, flags=flags) for i in range(n)]


def _finish(procs):
    """(exit status, stderr) of each process; a failed one fails the test."""
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    assert [rc for _, rc in results] == [0] * len(procs), results
    return [err for err, _ in results]


def _log(workdir, i):
    path = os.path.join(workdir, f"log{i}")
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


def _export(workdir):
    return load_file(os.path.join(wd.export_dir(workdir), "crosscoder.safetensors"))


def _export_config(workdir):
    with open(os.path.join(wd.export_dir(workdir), "config.json")) as f:
        return strict_loads(f.read())


def _metrics(workdir):
    with open(wd.metrics_path(workdir)) as f:
        return [strict_loads(line) for line in f]


def _checkpoints(workdir):
    return sorted(int(s) for s in os.listdir(wd.checkpoints_dir(workdir)) if s.isdigit())


def _assert_same_weights(a, b):
    # The same rows and the same mesh; gloo's cross-process sums may add in another order
    # than one process's, so the runs agree to float rounding, carried through 20 Adam
    # steps (measured: relative norm differences below 1e-5).
    ea, eb = _export(a), _export(b)
    assert sorted(ea) == sorted(eb)
    for name in ea:
        diff = np.linalg.norm(eb[name] - ea[name]) / np.linalg.norm(ea[name])
        assert diff < 1e-4, (name, diff)


def _new_workdir(root, store_dir, name):
    w = str(root / name)
    shutil.copytree(store_dir, wd.activations_dir(w))
    return w


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mh_store") / "activations")
    synthetic_store(d)
    return d


@pytest.fixture(scope="module")
def runs(store_dir, tmp_path_factory):
    """The same config trained by 1 process with 4 devices and by 2 with 2 each, side by
    side (a run often waits on its processes' barriers, leaving the cores to the other)."""
    root = tmp_path_factory.mktemp("mh")
    one, two = (_new_workdir(root, store_dir, name) for name in ("one", "two"))
    procs = _start(one, 1), _start(two, 2)
    _finish(procs[0])
    return one, two, _finish(procs[1])


@pytest.fixture(scope="module")
def one_process(runs):
    return runs[0]


@pytest.fixture(scope="module")
def killed(store_dir, tmp_path_factory):
    """A 2-process run whose process 1 is killed at step KILL_AT (after the checkpoint at
    SAVED has been committed)."""
    w = _new_workdir(tmp_path_factory.mktemp("mh"), store_dir, "killed")
    saved = os.path.join(wd.checkpoints_dir(w), str(SAVED))
    port = _free_port()
    procs = [
        _launch(
            w,
            2,
            i,
            port,
            wrapped=True,
            env={"XC_DIE_AT": str(KILL_AT), "XC_WAIT_FOR": saved} if i else None,
        )
        for i in range(2)
    ]
    procs[1].communicate(timeout=300)
    # The survivor must stop by itself within 60 s of its peer's death.
    _, err = procs[0].communicate(timeout=60)
    return w, procs[0].returncode, procs[1].returncode, err


def test_two_processes_train_like_one_with_one_writer(runs, store_dir):
    one_process, w, errs = runs
    _assert_same_weights(one_process, w)
    one, two = _metrics(one_process), _metrics(w)
    assert [r["step"] for r in two] == LOGGED  # each line once: one writer
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    # Process 0 exported once and drew the bar; process 1 did neither; both ran every step.
    assert _log(w, 0) == ["export", f"steps {STEPS}"] and _log(w, 1) == [f"steps {STEPS}"]
    bar = re.compile(r"train: +\d+%")
    assert bar.search(errs[0]) and not bar.search(errs[1])
    # Counters over the whole batches, equal in both runs and to what the reader delivers.
    store = ActivationStore(store_dir)
    train_shards, _ = store.split(1)
    with BatchStream(store, BATCH, seed=0, shards=train_shards, group_shards=4) as stream:
        ids = np.concatenate([next(stream)[1] for _ in range(STEPS)])
    for run in (one_process, w):
        config = _export_config(run)
        assert config["tokens_trained"] == STEPS * BATCH == len(ids)
        assert config["distinct_tokens_trained"] == len(np.unique(ids))
        assert config["skipped_rows"] == 0
        assert [r["distinct_rows"] for r in _metrics(run)] == [
            len(np.unique(ids[: s * BATCH])) for s in LOGGED
        ]


def test_killed_process_stops_the_other_with_a_clear_error(killed):
    w, rc0, rc1, err = killed
    assert rc1 == -9  # killed, as a crash or a lost host would be
    # One line, exit status 1 (not an abort of the distributed runtime's shutdown).
    last = err.strip().splitlines()[-1]
    assert rc0 == 1, err
    assert last.startswith("error: process 0 of 2 stopped while training: "), err
    assert "another process of the run died" in last and "Rerun every process" in last
    assert _checkpoints(w)[-1] == SAVED  # saved by both processes before the kill
    assert not os.path.exists(os.path.join(wd.export_dir(w), "config.json"))


def _mark_metrics(workdir):
    """Tags the logged lines; a resumed run keeps those up to its checkpoint, a restarted
    one would rewrite them."""
    rows = _metrics(workdir)
    with open(wd.metrics_path(workdir), "w") as f:
        f.writelines(json.dumps({**r, "before_kill": True}) + "\n" for r in rows)


@pytest.fixture(scope="module")
def reruns(killed, tmp_path_factory):
    """The killed run rerun on 2 processes and, from a copy, on 1 (4 devices), side by side,
    each by the launch line itself. The 2 processes rerun with the default layout, the
    batch split across them (each reads half of every batch), so the restore also moves the
    state's shards to other devices."""
    root = tmp_path_factory.mktemp("mh")
    dirs = {n: str(root / f"rerun{n}") for n in (2, 1)}
    for w in dirs.values():
        shutil.copytree(killed[0], w)
        _mark_metrics(w)
    default_layout = {"mesh.model_across_processes": False}
    procs = {n: _start(w, n, wrapped=False, flags=default_layout) for n, w in dirs.items()}
    for p in procs.values():
        _finish(p)
    return dirs


@pytest.mark.parametrize("processes", [2, 1])
def test_rerun_after_a_kill_resumes_to_the_same_result(reruns, one_process, processes):
    w = reruns[processes]
    rows = _metrics(w)
    assert [r["step"] for r in rows] == LOGGED
    assert [r.get("before_kill", False) for r in rows] == [s <= SAVED for s in LOGGED]
    _assert_same_weights(one_process, w)
    np.testing.assert_allclose(
        [r["loss"] for r in rows], [r["loss"] for r in _metrics(one_process)], rtol=1e-5
    )
    a, b = _export_config(one_process), _export_config(w)
    for key in ("tokens_trained", "distinct_tokens_trained", "skipped_rows"):
        assert a[key] == b[key], key


def test_extraction_takes_the_training_launch_lines_process_flags():
    from configs import tiny
    from xcoder_jax import multihost

    c = tiny.get_config()
    assert multihost.process_share(c, 0, 1) == (0, 1)
    c.num_processes, c.process_id = 3, 2
    assert multihost.process_share(c, 0, 1) == (2, 3)
    assert multihost.process_share(c, 1, 2) == (1, 2)  # explicit shard flags win
    c.process_id = 3
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 3\), got 3"):
        multihost.process_share(c, 0, 1)
