"""BatchTopK k-annealing (`crosscoder.k_max`, `k_anneal_steps`) and mean-centring
(`crosscoder.center`): the schedule, today's step when off, dense = sparse while annealing,
and an export that folds the centring in so raw-unit users see the same crosscoder."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.conftest import train_config
from xcoder_jax import export, train
from xcoder_jax import train_step as ts
from xcoder_jax.activations import ActivationStore
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.losses.batchtopk import BatchTopK, batchtopk_loss, k_at, update_threshold
from xcoder_jax.synthetic import synthetic_store


def _config(k=2, k_max=8, anneal=6, path="dense", center=False):
    c = train_config()
    cc = c.crosscoder
    cc.loss, cc.n_latents, cc.dead_window_tokens, cc.topk_path = "batchtopk", 64, 64, path
    cc.k, cc.k_max, cc.k_anneal_steps, cc.center = k, k_max, anneal, center
    return c


def _batches(n=8, rows=32, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, rows, 2, 8)).astype(np.float32)
    w = np.ones(rows, np.float32)
    w[3] = 0.0  # a masked row
    return x, w


def _run(hp, x, w):
    one = jax.jit(lambda s, b, v: ts.train_step(s, b, v, hp=hp))
    state, ms = ts.init_state(hp), []
    for xb in x:
        state, m = one(state, xb, w)
        ms.append(jax.device_get(m))
    return state, ms


def _formula(step, k, k_max, anneal):
    """dictionary_learning's annealed k, int(k_max (1 - r) + k r), in exact fractions (in
    floats, 10 * 4/7 + 3 * 3/7 lands a hair below 7)."""
    r = Fraction(min(step, anneal), anneal)
    return int(k_max * (1 - r) + k * r)


@pytest.mark.parametrize(("k", "k_max", "anneal"), [(8, 32, 300), (16, 64, 300), (3, 10, 7)])
def test_k_follows_the_linear_formula(k, k_max, anneal):
    for step in (0, 1, 2, anneal // 3, anneal // 2, anneal - 1, anneal, anneal + 1, 5 * anneal):
        assert int(k_at(step, k, k_max, anneal)) == _formula(step, k, k_max, anneal), step
    assert k_at(5, k, k_max, 0) == k  # no annealing: k itself, a Python int


def test_the_step_logs_its_k_and_keeps_that_many_per_row():
    hp = ts.HParams.from_config(_config(k=2, k_max=8, anneal=6), 8, [1.0, 1.0])
    assert hp.loss.anneal_steps == 6 and hp.loss.k_max == 8
    _, ms = _run(hp, *_batches())
    ks = [float(m["k"]) for m in ms]
    assert ks == [_formula(s, 2, 8, 6) for s in range(8)] == [8, 7, 6, 5, 4, 3, 2, 2]
    # Gaussian rows: every pre-activation has a positive share, so L0 is k exactly.
    assert [float(m["l0"]) for m in ms] == ks


class _TodaysBatchTopK(BatchTopK):
    """The BatchTopK step as it was before annealing: a Python-int k, no k_max."""

    def __call__(self, model, x, weights, step, dead):
        loss, aux = batchtopk_loss(model, x, weights, self.k, dead, self.aux_k, self.aux_coeff)
        return loss, {**aux, "lam": jnp.zeros(())}


def test_without_annealing_the_step_is_bit_identical_to_the_fixed_k_step():
    hp = ts.HParams.from_config(_config(k=4, k_max=16, anneal=0), 8, [1.0, 1.0])
    assert hp.loss.anneal_steps == 0 and not hp.loss.sparse
    today = ts.HParams(**{**hp.__dict__, "loss": _TodaysBatchTopK(*hp.loss.__dict__.values())})
    x, w = _batches(6)
    (a, ma), (b, mb) = _run(hp, x, w), _run(today, x, w)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(u), np.asarray(v))
    for m, n in zip(ma, mb, strict=True):
        assert m.pop("k") == 4 and set(m) == set(n)
        assert all(np.array_equal(m[key], n[key]) for key in m)


def test_dense_and_sparse_agree_during_annealing():
    """Parameters, threshold, k and AuxK alike over 8 steps, 6 of them annealing, with
    latents dying (dead_window_tokens 64) so that AuxK runs."""
    x, w = _batches()
    runs = {}
    for path in ("dense", "sparse"):
        hp = ts.HParams.from_config(_config(path=path), 8, [1.0, 1.0])
        assert hp.loss.sparse == (path == "sparse")
        runs[path] = _run(hp, x, w)
    (sd, md), (ss, ms) = runs["dense"], runs["sparse"]
    for u, v in zip(jax.tree.leaves(sd["params"]), jax.tree.leaves(ss["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-6)
    thr = [np.asarray(s["rest"]["threshold"][...]) for s in (sd, ss)]
    np.testing.assert_allclose(thr[1], thr[0], rtol=1e-5)
    assert [m["k"] for m in md] == [m["k"] for m in ms]
    assert any(m["aux_loss"] > 0 for m in md)
    np.testing.assert_allclose([m["aux_loss"] for m in ms], [m["aux_loss"] for m in md], 1e-4)


def test_the_threshold_follows_the_step_cut_while_annealing():
    """One step: the EMA takes the smallest kept weighted activation at the step's k."""
    hp = ts.HParams.from_config(_config(k=2, k_max=8, anneal=6), 8, [1.0, 1.0])
    state = ts.init_state(hp)
    x, w = _batches(1)
    model = ts.merge(hp, state)
    pre = jax.nn.relu(model.pre_acts(jnp.asarray(x[0])))
    weighted = np.asarray(pre * model.decoder_norms().sum(-1) * w[:, None]).reshape(-1)
    cut = np.sort(weighted)[::-1][int(8 * w.sum()) - 1]  # k = k_max = 8 at step 0
    new, _ = jax.jit(lambda s, b, v: ts.train_step(s, b, v, hp=hp))(state, x[0], w)
    expected = update_threshold(jnp.zeros(64), jnp.asarray(cut), hp.loss.threshold_ema)
    np.testing.assert_allclose(np.asarray(new["rest"]["threshold"][...]), expected, rtol=1e-6)


def test_k_max_defaults_to_four_k_and_matters_only_when_annealing():
    c = _config(k=4, k_max=0, anneal=10)
    assert ts.HParams.from_config(c, 8, [1.0, 1.0]).loss.k_max == 16
    c.crosscoder.k_anneal_steps = 0
    assert ts.HParams.from_config(c, 8, [1.0, 1.0]).loss.k_max == 4


def test_k_max_below_k_is_refused():
    with pytest.raises(ConfigError, match="k_max"):
        ts.HParams.from_config(_config(k=8, k_max=4, anneal=10), 8, [1.0, 1.0])


# --- Centring ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def centred_run(tmp_path_factory):
    """A centred BatchTopK trained a few steps on a synthetic store pushed off 0, and its
    export: (store, hp, state, export dir)."""
    root = tmp_path_factory.mktemp("centred")
    synthetic_store(str(root / "store"), n_rows=1024, d=8, shard_rows=256)
    store = ActivationStore(str(root / "store"))
    c = _config(k=3, k_max=12, anneal=4, center=True)
    norm_mean = store.mean * store.scales[:, None]
    hp = ts.HParams.from_config(c, store.d_model, store.total_variance * store.scales**2, norm_mean)
    assert len(hp.center) == 2 * 8
    state, _ = _run(hp, _norm_batches(), np.ones(32, np.float32))
    out = str(root / "export")
    export.export(out, ts.export_weights(state, hp), store.scales, {"center": True})
    return store, hp, state, out


def _norm_batches(n=6, rows=32, seed=1):
    """Normalised batches [n, rows, 2, 8] off 0 (a mean for the centring to matter)."""
    offset = 2.0 + np.random.default_rng(0).normal(size=(2, 8))
    rows = np.random.default_rng(seed).normal(size=(n, rows, 2, 8))
    return (rows + offset).astype(np.float32)


def test_centring_needs_the_store_mean():
    with pytest.raises(ConfigError, match="center"):
        ts.HParams.from_config(_config(center=True), 8, [1.0, 1.0])


def test_the_export_reconstructs_raw_x_as_the_centred_model_does(centred_run):
    store, hp, state, out = centred_run
    s, mu = store.scales[:, None], np.asarray(hp.center, np.float32).reshape(2, 8)
    x_raw = _norm_batches(1, seed=2)[0] / s  # like the training rows: latents fire
    model = ts.merge(hp, state)
    f = hp.loss.encode(model, jnp.asarray(x_raw * s - mu))
    assert (np.asarray(f) > 0).any()
    expected = (np.asarray(model.decode(f)) + mu) / s
    got = ExportedCrosscoder.load(out).reconstruct(torch.from_numpy(x_raw)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_the_export_of_a_centred_model_is_the_by_hand_formula(centred_run):
    """Raw x -> normalise, subtract the mean, JumpReLU encode, decode, add the mean back,
    back to raw units: by hand from the training weights, against the export's file."""
    store, hp, state, out = centred_run
    s, mu = store.scales[:, None], np.asarray(hp.center, np.float64).reshape(2, 8)
    model = ts.merge(hp, state)
    w_enc, b_enc, w_dec, b_dec = (
        np.asarray(getattr(model, n)[...], np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    thr = np.asarray(hp.loss.threshold_on_f(model), np.float64)
    x = _norm_batches(1, seed=2)[0].astype(np.float64) / s
    pre = np.einsum("bmd,mdh->bh", x * s - mu, w_enc) + b_enc
    f = np.where((pre > 0) & (pre >= thr), pre, 0.0)
    by_hand = (np.einsum("bh,hmd->bmd", f, w_dec) + b_dec + mu) / s
    tensors, config = export.load_export(out)
    assert config["center"] is True
    # The file's biases hold the folding: b_enc - mu . W_enc and (b_dec + mu) / s.
    np.testing.assert_allclose(
        tensors["b_enc"], b_enc - np.einsum("md,mdh->h", mu, w_enc), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(tensors["b_dec"], (b_dec + mu) / s, rtol=1e-6, atol=1e-7)
    got = ExportedCrosscoder(tensors, config).reconstruct(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got, by_hand, rtol=1e-4, atol=1e-4 * np.abs(by_hand).max())


def test_centred_training_records_the_ratio_and_k(tmp_path, capsys):
    """A whole run: the mean-to-spread line at the start, config.json's `center` and
    `mean_to_spread`, the logged k on the annealing schedule, FVE as good as uncentred."""
    w = tmp_path / "run"
    synthetic_store(str(w / "activations"), n_rows=2048, shard_rows=512)
    c = train_config(steps=40, log_every=5)
    cc = c.crosscoder
    cc.loss, cc.k, cc.k_max, cc.k_anneal_steps, cc.center = "batchtopk", 8, 32, 20, True
    cc.batchtopk_dec_init_norm = 0.08
    final = train.train_and_evaluate(c, str(w))
    assert "store ||mean|| / rms deviation: base" in capsys.readouterr().out
    with open(os.path.join(w, "export", "config.json")) as f:
        config = json.load(f)
    store = ActivationStore(str(w / "activations"))
    ratio = np.linalg.norm(store.mean, axis=-1) / np.sqrt(store.total_variance)
    assert config["center"] is True
    np.testing.assert_allclose(config["mean_to_spread"], ratio, rtol=1e-5)
    with open(os.path.join(w, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["k"] for r in rows] == [_formula(r["step"] - 1, 8, 32, 20) for r in rows]
    assert min(final["fve"]) > 0.5


def test_adam_sees_the_centred_batch():
    """The centred step is the fixed step on x - mean: same loss and update."""
    c = _config(anneal=0, center=True)
    mean = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    hp = ts.HParams.from_config(c, 8, [1.0, 1.0], mean)
    plain = ts.HParams(**{**hp.__dict__, "center": ()})
    x, w = _batches(1)
    state = ts.init_state(hp)
    new, m = ts.train_step(state, x[0], w, hp=hp)
    ref, mr = ts.train_step(state, x[0] - mean, w, hp=plain)
    np.testing.assert_allclose(float(m["loss"]), float(mr["loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["fve"]), np.asarray(mr["fve"]), rtol=1e-5)
    for u, v in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
