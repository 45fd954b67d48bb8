"""Kill the pipeline (SIGKILL) at a random point of the extract and train stages, rerun it,
and check that it ends with the same store and crosscoder as an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import strict_loads
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations import manifest as mf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs zoo -> extract -> train on a micro config with many small shards and checkpoints, so
# there are many points to be killed at.
_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.conftest import micro_zoo_config
from xcoder_jax import pipeline
c = micro_zoo_config(n_extract_docs=120)
c.extract.shard_rows, c.extract.batch_size = 128, 4
c.crosscoder.n_latents = 64
c.train.steps, c.train.batch_size, c.train.lr = 120, 32, 1e-2
c.train.log_every = c.train.checkpoint_every = 10
c.train.eval_every = 60
pipeline.STAGES = [s for s in pipeline.STAGES if s[0] in ("zoo", "extract", "train")]
pipeline.run(c, {workdir!r})
"""


def _start(workdir: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT.format(root=ROOT, workdir=workdir)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _shards_written(workdir: str) -> int:
    try:
        return len(mf.read_manifest(wd.activations_dir(workdir))["shards"])
    except (mf.StoreError, OSError, ValueError):
        return 0


def _checkpoints(workdir: str) -> int:
    d = wd.checkpoints_dir(workdir)
    return len([s for s in os.listdir(d) if s.isdigit()]) if os.path.isdir(d) else 0


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the pipeline ended before the kill point"
        assert time.time() < deadline, "the kill point was never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    assert _start(workdir).wait() == 0
    return workdir


def _export_config(workdir: str) -> dict:
    with open(os.path.join(wd.export_dir(workdir), "config.json")) as f:
        return strict_loads(f.read())


def _assert_same_results(a: str, b: str) -> None:
    # Both runs execute the same computations on the same machine: the zoo is seeded, and a
    # resumed extraction recomputes the interrupted document batch whole (same padding and
    # GEMM shapes), so the store is compared bit for bit.
    sa, sb = ActivationStore(wd.activations_dir(a)), ActivationStore(wd.activations_dir(b))
    assert sa.n_rows == sb.n_rows and len(sa.shards) == len(sb.shards)
    for k in range(len(sa.shards)):
        np.testing.assert_array_equal(sa.shard_index(k), sb.shard_index(k))
        np.testing.assert_array_equal(np.asarray(sa.shard_acts(k)), np.asarray(sb.shard_acts(k)))
    # The resumed training restores its state and reader position; each tensor is compared
    # at its own scale (a weight near zero is not compared relative to itself).
    ea = load_file(os.path.join(wd.export_dir(a), "crosscoder.safetensors"))
    eb = load_file(os.path.join(wd.export_dir(b), "crosscoder.safetensors"))
    for name in ea:
        atol = 1e-6 * float(np.abs(ea[name]).max())
        np.testing.assert_allclose(eb[name], ea[name], rtol=1e-5, atol=atol, err_msg=name)
    ca, cb = _export_config(a), _export_config(b)
    for key in ("tokens_trained", "distinct_tokens_trained"):
        assert ca[key] == cb[key], key


@pytest.mark.parametrize("stage", ["extract", "train"])
def test_killed_and_rerun_equals_uninterrupted(stage, reference, tmp_path):
    workdir = str(tmp_path / "run")
    rng = random.Random(f"kill-{stage}")
    if stage == "extract":
        total = len(ActivationStore(wd.activations_dir(reference)).shards)
        at = rng.randint(1, total - 1)
        _kill_when(_start(workdir), lambda: _shards_written(workdir) >= at)
        assert 0 < _shards_written(workdir) < total
    else:
        at = rng.randint(1, 10)
        _kill_when(
            _start(workdir), lambda: _checkpoints(workdir) >= min(at, 2) and rng.random() < 0.5
        )
        assert not os.path.exists(os.path.join(wd.export_dir(workdir), "crosscoder.safetensors"))
    assert _start(workdir).wait() == 0
    _assert_same_results(reference, workdir)
