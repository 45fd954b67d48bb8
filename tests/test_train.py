"""Crosscoder training on a synthetic store: fit, resume, sharding, counts, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import strict_loads, synthetic_store, train_config
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import sharding, split, train, train_records
from xcoder_jax import train_step as ts
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore, BatchStream
from xcoder_jax.losses import l1_lambda
from xcoder_jax.train_step import make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close(actual, desired, rtol, atol_frac=None, **kw):
    """assert_allclose with an absolute tolerance of `atol_frac * max|desired|` (default
    `rtol`): an element near zero is compared at the scale of its array."""
    desired = np.asarray(desired)
    scale = float(np.abs(desired).max()) if desired.size else 0.0
    atol = (rtol if atol_frac is None else atol_frac) * scale
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=atol, **kw)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("store") / "activations")
    synthetic_store(d)
    return d


def _workdir(tmp_path, store_dir, name="run"):
    w = str(tmp_path / name)
    shutil.copytree(store_dir, wd.activations_dir(w))
    return w


def _metrics(workdir):
    with open(wd.metrics_path(workdir)) as f:
        return [strict_loads(line) for line in f]


def _export_config(workdir):
    with open(os.path.join(wd.export_dir(workdir), "config.json")) as f:
        return strict_loads(f.read())


def _export(workdir):
    return load_file(os.path.join(wd.export_dir(workdir), "crosscoder.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(store_dir, tmp_path_factory):
    w = _workdir(tmp_path_factory.mktemp("full"), store_dir)
    final = train.train_and_evaluate(train_config(), w)
    return w, final


def test_training_fits_and_reports_health(uninterrupted):
    w, final = uninterrupted
    rows = _metrics(w)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["mse"] < rows[0]["mse"]
    assert min(final["fve"]) > 0.6
    for key in (
        "loss",
        "mse",
        "sparsity",
        "fve",
        "l0",
        "dead_fraction",
        "grad_norm",
        "lr",
        "lambda",
        "tokens",
        "distinct_rows",
        "eval_fve",
    ):
        assert key in rows[-1], key
    # The logged lambda and lr are those of the step taken (0-based step = logged step - 1).
    c = train_config()
    schedule = make_schedule(c.train.lr, c.train.steps, c.train.decay_start_frac)
    for r in rows:
        lam = l1_lambda(r["step"] - 1, c.crosscoder.l1_coeff, c.crosscoder.l1_warmup_frac, 40)
        np.testing.assert_allclose(r["lambda"], float(lam), rtol=1e-6)
        np.testing.assert_allclose(r["lr"], float(schedule(r["step"] - 1)), rtol=1e-6)
    assert rows[-1]["lambda"] == 2.0 and rows[-1]["lr"] < rows[0]["lr"]


def test_metrics_and_export_config_arestrict_loads(uninterrupted, tmp_path):
    w, final = uninterrupted
    assert len(_metrics(w)) == 4  # every line parses with NaN/Infinity refused
    config = _export_config(w)
    assert config["eval"] == final and config["units"] == "raw"
    # A metric that is NaN/inf is written as null, and named.
    path = str(tmp_path / "metrics.jsonl")
    train_records.log_metrics(
        path, {"step": 1, "loss": 0.5, "fve": [0.9, float("nan")], "l0": float("inf")}
    )
    with open(path) as f:
        record = strict_loads(f.read())
    assert record["fve"] == [0.9, None] and record["l0"] is None
    assert record["nonfinite_metrics"] == ["fve", "l0"] and record["loss"] == 0.5


def test_lambda_warmup_midpoint_and_end():
    # Warm-up over 5% of 1000 steps: 50 steps.
    def lam(step):
        return float(l1_lambda(step, 2.0, 0.05, 1000))

    assert lam(0) == 0.0
    np.testing.assert_allclose(lam(25), 1.0, rtol=1e-6)  # halfway: l1_coeff / 2
    np.testing.assert_allclose(lam(10), 0.4, rtol=1e-6)
    for step in (50, 51, 500, 999):
        np.testing.assert_allclose(lam(step), 2.0, rtol=1e-6)
    # The test config's 5% of 40 steps is 2 steps: half at step 1.
    np.testing.assert_allclose(float(l1_lambda(1, 2.0, 0.05, 40)), 1.0, rtol=1e-6)
    # A warm-up shorter than one step is one step.
    assert float(l1_lambda(0, 2.0, 0.0, 40)) == 0.0 and float(l1_lambda(1, 2.0, 0.0, 40)) == 2.0


@pytest.mark.parametrize("steps", [1000, 1500])
def test_lr_schedule_constant_then_linear_decay_to_zero(steps):
    lr = 1e-3
    schedule = make_schedule(lr, steps, 0.8)
    boundary = int(0.8 * steps)
    decay = steps - boundary

    def at(step):
        return float(schedule(step))

    for step in (0, boundary // 2, boundary - 1, boundary):  # the constant phase (and its end)
        np.testing.assert_allclose(at(step), lr, rtol=1e-6)
    np.testing.assert_allclose(at(boundary + decay // 2), lr / 2, rtol=1e-6)  # halfway down
    np.testing.assert_allclose(at(boundary + decay // 4), 3 * lr / 4, rtol=1e-6)
    np.testing.assert_allclose(at(steps), 0.0, atol=1e-6 * lr)  # the end
    assert at(steps - 1) > 0


def test_distinct_tokens_equal_rows_visited(uninterrupted, store_dir):
    w, _ = uninterrupted
    config = _export_config(w)
    store = ActivationStore(store_dir)
    train_shards, _ = store.split(1)
    with BatchStream(store, 64, seed=0, shards=train_shards, group_shards=4) as stream:
        ids = np.concatenate([next(stream)[1] for _ in range(40)])
    assert config["tokens_trained"] == 40 * 64
    assert config["distinct_tokens_trained"] == len(np.unique(ids))
    # 40 * 64 = 2560 draws from 3584 training rows: no row drawn twice within the epoch.
    assert config["distinct_tokens_trained"] == 2560


def test_export_and_checkpoints_record_the_split(uninterrupted, store_dir):
    """The held-out shards training used, for the later stages to read back."""
    w, _ = uninterrupted
    config = _export_config(w)
    recorded = {"eval_shards": 1, "heldout_shards": [7], "group_shards": 4}
    assert config["split"] == recorded
    store = ActivationStore(store_dir)
    assert split.heldout_from_export(config, store, train_config()) == store.split(1)[1]
    mngr = ckpt.manager(w, 20, 3)
    extra = ckpt.restore_extra(mngr, mngr.latest_step())
    mngr.close()
    assert extra["split"] == recorded
    assert extra["config"]["train.eval_shards"] == 1 and extra["config"]["train.group_shards"] == 4


@pytest.mark.parametrize("field, saved", [("eval_shards", 1), ("group_shards", 4)])
def test_resume_with_another_split_is_refused(uninterrupted, tmp_path, field, saved):
    """Both choose which rows a batch holds: a resume with another value is another run."""
    w_full, _ = uninterrupted
    w = str(tmp_path / "copy")
    shutil.copytree(w_full, w)
    with pytest.raises(train.TrainingError, match=rf"fields: train\.{field} \({saved} -> 2\) \("):
        train.train_and_evaluate(train_config(**{field: 2}), w)


def test_row_bitmap_is_packbits_of_the_rows_marked():
    rng = np.random.default_rng(0)
    n = 1003  # not a multiple of 8
    rows = rng.integers(0, n, 700)
    bits = train_records.new_bitmap(n)
    train_records.mark_rows(bits, rows[:350])
    train_records.mark_rows(bits, rows[350:])
    dense = np.zeros(n, bool)
    dense[rows] = True
    np.testing.assert_array_equal(bits, np.packbits(dense))
    assert train_records.count_rows(bits) == len(set(rows.tolist()))


def test_resumed_run_equals_uninterrupted(uninterrupted, store_dir, tmp_path, monkeypatch):
    w_full, _ = uninterrupted
    w = _workdir(tmp_path, store_dir)
    real_step = sharding.ShardedStep.step
    calls = {"n": 0}

    def dying_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 27:  # after the checkpoint at step 20
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(sharding.ShardedStep, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(train_config(), w)
    assert not os.path.exists(wd.export_dir(w))
    monkeypatch.setattr(sharding.ShardedStep, "step", real_step)
    train.train_and_evaluate(train_config(), w)
    # The same computation on the same machine, from the same state and rows: it agrees to
    # the last bits; the tolerance is only for the order of float reductions.
    a, b = _export(w_full), _export(w)
    for name in a:
        assert_close(b[name], a[name], rtol=1e-5, err_msg=name)
    assert [r["step"] for r in _metrics(w)] == [10, 20, 30, 40]
    np.testing.assert_allclose(
        [r["loss"] for r in _metrics(w)], [r["loss"] for r in _metrics(w_full)], rtol=1e-5
    )


_SHARDED = """
import json, sys
sys.path.insert(0, {root!r})
import jax
assert jax.device_count() == 8, jax.devices()
from tests.conftest import train_config
from xcoder_jax import train
c = train_config()
c.mesh.data, c.mesh.model = 4, 2
train.train_and_evaluate(c, {workdir!r})
"""


def test_eight_devices_match_one(uninterrupted, store_dir, tmp_path):
    w_full, _ = uninterrupted
    w = _workdir(tmp_path, store_dir)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    subprocess.run(
        [sys.executable, "-c", _SHARDED.format(root=ROOT, workdir=w)], env=env, check=True, cwd=ROOT
    )
    # Sharded reductions add in another order, so the runs differ in the last bits, and a
    # pre-activation within rounding of 0 can land on the other side of the ReLU: one
    # (row, latent) flip moves L0 by 1/batch and, through Adam, that latent's weights by
    # ~1e-4. Losses are compared relatively, L0 to a few flips, the weights by norm. A
    # sharding bug (rows seen twice or not at all, a gradient summed over one shard) moves
    # all of these by orders of magnitude more.
    one, eight = _metrics(w_full), _metrics(w)
    for key in ("loss", "mse"):
        np.testing.assert_allclose(
            [r[key] for r in eight], [r[key] for r in one], rtol=1e-4, err_msg=key
        )
    batch = train_config().train.batch_size
    np.testing.assert_allclose(
        [r["l0"] for r in eight], [r["l0"] for r in one], rtol=0, atol=4 / batch, err_msg="l0"
    )
    a, b = _export(w_full), _export(w)
    for name in a:
        diff = np.linalg.norm(b[name] - a[name]) / np.linalg.norm(a[name])
        assert diff < 1e-3, (name, diff)


def test_batchtopk_trains_and_exports_threshold(store_dir, tmp_path):
    w = _workdir(tmp_path, store_dir)
    c = train_config()
    c.crosscoder.loss = "batchtopk"
    c.crosscoder.k = 8
    # 40 steps on this d = 32 store fit at the L1 loss's init scale (FVE 0.76; 0.29 with the
    # demo's BatchTopK default of 1.0, which is measured on the demo store in the README).
    c.crosscoder.batchtopk_dec_init_norm = 0.08
    final = train.train_and_evaluate(c, w)
    rows = _metrics(w)
    assert all(abs(r["l0"] - 8) < 1e-6 for r in rows)  # exactly k per row on average
    assert min(final["fve"]) > 0.6
    assert "threshold" in _export(w) and (_export(w)["threshold"] > 0).all()


def _sharded(c, store) -> sharding.ShardedStep:
    hp = ts.HParams.from_config(c, store.d_model, store.total_variance * store.scales**2)
    return sharding.ShardedStep(hp, sharding.make_mesh(1, 1, c.train.batch_size, hp.n_latents))


@pytest.mark.parametrize("loss", ["l1", "batchtopk"])
def test_step_without_metrics_updates_the_state_alike(store_dir, loss):
    c = train_config()
    c.crosscoder.loss, c.crosscoder.k = loss, 8
    store = ActivationStore(store_dir)
    trainer = _sharded(c, store)
    stream = BatchStream(store, c.train.batch_size, seed=0, normalise=True)
    batches = [next(stream)[0] for _ in range(3)]
    stream.close()
    full, lean = trainer.init(), trainer.init()
    for x in batches:
        w = np.ones(len(x), np.float32)
        full, m_full = trainer.step(full, *trainer.to_device(x, w), with_metrics=True)
        lean, m_lean = trainer.step(lean, *trainer.to_device(x, w), with_metrics=False)
        assert set(m_lean) == {"loss"} and {"fve", "l0", "dead_fraction"} <= set(m_full)
        np.testing.assert_allclose(float(m_lean["loss"]), float(m_full["loss"]), rtol=1e-5)
    # Two compilations of one update may fuse (and round) differently: each leaf is
    # compared at its own scale (Adam's second moments are ~1e-8, weights ~1e-1).
    for a, b in zip(jax.tree.leaves(lean), jax.tree.leaves(full), strict=True):
        assert_close(a, b, rtol=1e-5)


def test_batchtopk_threshold_survives_a_batch_with_nothing_kept(store_dir):
    c = train_config()
    c.crosscoder.loss, c.crosscoder.k = "batchtopk", 8
    store = ActivationStore(store_dir)
    trainer = _sharded(c, store)
    with BatchStream(store, c.train.batch_size, seed=0, normalise=True) as stream:
        x1, x2 = next(stream)[0], next(stream)[0]
    ones, zeros = np.ones(len(x1), np.float32), np.zeros(len(x1), np.float32)

    def threshold(state):
        return np.array(jax.device_get(state["rest"]["threshold"][...]))  # a copy: donation

    state = trainer.init()
    state, _ = trainer.step(state, *trainer.to_device(x1, ones))
    first = threshold(state)
    assert np.isfinite(first).all() and (first > 0).all()
    # Every row masked out: nothing is kept, and the threshold stays exactly as it was.
    state, metrics = trainer.step(state, *trainer.to_device(x2, zeros))
    assert float(metrics["l0"]) == 0.0
    np.testing.assert_array_equal(threshold(state), first)
    # The next real batch still moves it.
    state, _ = trainer.step(state, *trainer.to_device(x2, ones))
    after = threshold(state)
    assert np.isfinite(after).all() and not np.array_equal(after, first)


# --- Bad input ---------------------------------------------------------------------------


def test_store_that_does_not_match_the_config(store_dir, tmp_path):
    w = _workdir(tmp_path, store_dir)
    c = train_config()
    c.crosscoder.d_model = 64
    with pytest.raises(ValueError, match="d_model 32, the config expects 64"):
        train.train_and_evaluate(c, w)
    c = train_config()
    c.crosscoder.n_models = 3
    with pytest.raises(ValueError, match="holds 2 models, the config expects 3"):
        train.train_and_evaluate(c, w)


def test_nonfinite_rows_are_refused_or_skipped(tmp_path):
    w = str(tmp_path / "nan")
    bad = [5, 700, 1500]
    manifest = synthetic_store(wd.activations_dir(w), nan_rows=bad)
    assert manifest["nonfinite_rows"] == 3
    with pytest.raises(train.TrainingError, match="rows of the store hold NaN/inf"):
        train.train_and_evaluate(train_config(steps=60), w)
    shutil.rmtree(wd.checkpoints_dir(w), ignore_errors=True)
    # 60 steps x 64 rows cover every training row once: all three bad rows are skipped.
    train.train_and_evaluate(train_config(steps=60, nonfinite_rows="skip"), w)
    config = json.load(open(os.path.join(wd.export_dir(w), "config.json")))
    assert config["skipped_rows"] == 3
    assert config["tokens_trained"] == 60 * 64 - 3
    assert all(np.isfinite(v).all() for v in _export(w).values())


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(store_dir, tmp_path, monkeypatch):
    w = _workdir(tmp_path, store_dir)
    real = sharding.ShardedStep.to_device
    calls = {"n": 0}

    def overflowing(self, batch, weights, *rest):
        calls["n"] += 1
        if calls["n"] == 13:  # finite rows whose squares overflow float32
            batch = batch * np.float32(1e30)
        return real(self, batch, weights, *rest)

    monkeypatch.setattr(sharding.ShardedStep, "to_device", overflowing)
    c = train_config(checkpoint_every=5, log_every=5)
    with pytest.raises(train.TrainingError, match="non-finite loss at step 13") as err:
        train.train_and_evaluate(c, w)
    assert "last good checkpoint (step 10)" in str(err.value)
    steps = sorted(int(s) for s in os.listdir(wd.checkpoints_dir(w)) if s.isdigit())
    assert steps[-1] == 10
    assert not os.path.exists(wd.export_dir(w))


def test_resume_with_incompatible_config_names_the_fields(uninterrupted, tmp_path):
    w_full, _ = uninterrupted
    w = str(tmp_path / "copy")
    shutil.copytree(w_full, w)
    c = train_config()
    c.crosscoder.n_latents = 256
    c.train.lr = 1e-3
    with pytest.raises(train.TrainingError, match="crosscoder.n_latents") as err:
        train.train_and_evaluate(c, w)
    assert "train.lr" in str(err.value)


def test_nonfinite_final_weights_are_not_exported(uninterrupted, tmp_path, monkeypatch):
    """A finite last loss does not make the last update finite: such weights are refused."""
    w_full, _ = uninterrupted
    w = str(tmp_path / "copy")
    shutil.copytree(w_full, w)
    shutil.rmtree(wd.export_dir(w))  # finished: the export is written again from step 40
    real = ts.export_weights

    def overflowed(state, hp):
        return {**real(state, hp), "b_enc": np.full(hp.n_latents, np.inf, np.float32)}

    monkeypatch.setattr(ts, "export_weights", overflowed)
    with pytest.raises(train.TrainingError, match="the final weights hold NaN/inf; nothing"):
        train.train_and_evaluate(train_config(), w)
    assert not os.path.exists(wd.export_dir(w))
