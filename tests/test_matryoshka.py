"""The Matryoshka BatchTopK loss: against a hand computation, sparse against dense, one
device against eight, one group against BatchTopK; its export, formats and analysis."""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import random_weights, run_on_eight_devices, synthetic_store, train_config
from xcoder_jax import export, formats, losses
from xcoder_jax import train_step as ts
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.analysis.facts import DecoderFacts, LatentFacts
from xcoder_jax.analysis.groups import group_summary, groups_html
from xcoder_jax.config_check import problems
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.formats import common
from xcoder_jax.losses import matryoshka as mt
from xcoder_jax.losses.batchtopk import BatchTopK, batch_topk

B, M, D, H, K, AUX_K = 12, 2, 4, 16, 2, 3
GROUPS = (2, 3, 4, 7)


def _model(seed=0) -> Crosscoder:
    cc = Crosscoder(M, D, H, rngs=nnx.Rngs(seed), dec_init_norm=0.5)
    cc.b_enc[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (H,))
    cc.b_dec[...] = 0.1 * jax.random.normal(jax.random.key(seed + 2), (M, D))
    return cc


def _data(seed=3):
    x = jax.random.normal(jax.random.key(seed), (B, M, D))
    return x, jnp.ones(B).at[5].set(0.0)  # row 5 masked out


def _dead(n_dead):
    return jnp.zeros(H, bool).at[jnp.arange(n_dead) * (H // max(n_dead, 1)) % H].set(True)


# --- (a) the loss by hand ------------------------------------------------------------------


def _by_hand(cc, x, weights, k, dead, aux_k, groups):
    """(sum of prefix errors, AuxK, prefix errors) in float64 NumPy from the kept mask."""
    pre32 = jax.nn.relu(cc.pre_acts(x))
    weighted = pre32 * cc.decoder_norms().sum(-1) * weights[:, None]
    mask = np.asarray(batch_topk(weighted, k, weights.sum()))
    we = np.asarray(cc.W_enc[...], np.float64)
    wd_ = np.asarray(cc.W_dec[...], np.float64)
    be, bd = np.asarray(cc.b_enc[...], np.float64), np.asarray(cc.b_dec[...], np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    pre = np.maximum(np.einsum("bmd,mdh->bh", x64, we) + be, 0)
    f = np.where(mask, pre, 0.0)
    err = lambda t, e: ((np.square(e - t).sum((1, 2))) * w64).sum() / max(w64.sum(), 1)
    prefix, hi = [], 0
    for n in groups:
        hi += n
        prefix.append(err(x64, np.einsum("bh,hmd->bmd", f[:, :hi], wd_[:hi]) + bd))
    residual = x64 - (np.einsum("bh,hmd->bmd", f, wd_) + bd)
    dead_ids = np.flatnonzero(np.asarray(dead))
    aux_f = np.zeros_like(pre)
    for r in range(len(pre)):
        top = dead_ids[np.argsort(-pre[r, dead_ids], kind="stable")][:aux_k]
        aux_f[r, top] = pre[r, top]
    aux = err(residual, np.einsum("bh,hmd->bmd", aux_f, wd_)) if len(dead_ids) else 0.0
    return sum(prefix), aux, np.array(prefix)


@pytest.mark.parametrize("n_dead", [0, 5])
@pytest.mark.parametrize("sparse", [False, True])
def test_loss_is_the_sum_of_prefix_losses_by_hand(n_dead, sparse):
    cc = _model()
    x, weights = _data()
    dead = _dead(n_dead)
    loss = mt.Matryoshka(K, AUX_K, 0.25, 0.9, GROUPS, sparse)
    value, aux, _, _ = _grads(loss, cc, x, weights, dead)
    total, aux_want, prefix = _by_hand(cc, x, weights, K, dead, AUX_K, GROUPS)
    np.testing.assert_allclose(aux["prefix_mse"], prefix, rtol=1e-5)
    np.testing.assert_allclose(aux["aux"], aux_want, rtol=1e-5)
    np.testing.assert_allclose(value, total + 0.25 * aux_want, rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], prefix[-1], rtol=1e-5)  # the full reconstruction
    assert (float(aux["aux"]) > 0) == (n_dead > 0)
    assert prefix[0] > prefix[-1]  # more groups reconstruct better
    # Exactly BatchTopK's k per valid row, and its batch cut for the EMA threshold.
    assert int((np.asarray(aux["f"]) > 0).sum()) == K * int(weights.sum())
    weighted = np.asarray(aux["f"] * cc.decoder_norms().sum(-1))
    np.testing.assert_allclose(aux["batch_threshold"], weighted[weighted > 0].min(), rtol=1e-6)


def test_group_sizes_follow_the_fractions():
    assert mt.group_sizes(mt.DEFAULT_FRACTIONS, 1024) == (32, 64, 128, 256, 544)
    assert mt.group_sizes((0.5, 0.5), 3) == (2, 1)
    assert mt.group_sizes((0.9, 0.05, 0.05), 3) == (1, 1, 1)  # every group keeps a latent
    with pytest.raises(ConfigError, match="3 groups for 2 latents"):
        mt.group_sizes((0.4, 0.3, 0.3), 2)


def test_config_selects_it_and_checks_the_groups():
    c = train_config()
    c.crosscoder.loss, c.crosscoder.k, c.crosscoder.n_latents = "matryoshka", 4, 64
    c.crosscoder.topk_path = "dense"
    loss = losses.from_config(c)
    assert isinstance(loss, mt.Matryoshka) and loss.groups == (2, 4, 8, 16, 34)
    assert losses.dec_init_norm(c) == c.crosscoder.batchtopk_dec_init_norm
    assert not problems(c)
    c.crosscoder.group_fractions = (0.5, 0.4)
    assert any("summing to 1" in p for p in problems(c))
    c.crosscoder.group_fractions = (0.5, 0.0, 0.5)
    assert any("summing to 1" in p for p in problems(c))
    c.crosscoder.group_fractions, c.crosscoder.n_latents, c.crosscoder.k = (0.25,) * 4, 3, 2
    assert any("at most crosscoder.n_latents (3) groups" in p for p in problems(c))


def test_config_variant_switches_to_it():
    from configs import paper, tiny

    topk, nested = (tiny.get_config(a).to_dict()["crosscoder"] for a in ("batchtopk", "matryoshka"))
    assert nested == {**topk, "loss": "matryoshka"}  # BatchTopK's recipe, the loss aside
    assert paper.get_config("1.5b,matryoshka").crosscoder.loss == "matryoshka"
    with pytest.raises(ConfigError, match="one loss variant at most"):
        tiny.get_config("batchtopk,matryoshka")


# --- (b) sparse against dense ----------------------------------------------------------------


@functools.cache
def _runner(loss, graph):
    """The jitted (loss, aux, gradients of every parameter, updated non-trained variables)."""

    @jax.jit
    def run(params, rest, x, weights, step, dead):
        fn = lambda p: loss(nnx.merge(graph, p, rest), x, weights, step, dead)
        (value, aux), grads = jax.value_and_grad(fn, has_aux=True)(params)
        return value, aux, grads, loss.update(rest, aux)

    return run


def _grads(loss, cc, x, weights, dead, step=0):
    graph, params, rest = nnx.split(cc, nnx.Param, ...)
    return _runner(loss, graph)(params, rest, x, weights, jnp.int32(step), dead)


def _close(a, b, rtol=1e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _hp(path: str, **cc) -> ts.HParams:
    c = train_config()
    c.crosscoder.update(loss="matryoshka", k=K, n_latents=H, topk_path=path, aux_k=AUX_K, **cc)
    c.crosscoder.dead_window_tokens = 100
    return ts.HParams.from_config(c, D, [1.0, 1.0])


def test_sparse_equals_dense_in_loss_gradients_and_an_adam_step():
    cc = _model()
    x, weights = _data()
    dead = _dead(5)
    dense = _grads(mt.Matryoshka(K, AUX_K, 0.25, 0.9, GROUPS), cc, x, weights, dead)
    sparse = _grads(mt.Matryoshka(K, AUX_K, 0.25, 0.9, GROUPS, True), cc, x, weights, dead)
    np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-5)
    for key in ("prefix_mse", "aux", "batch_threshold", "f", "x_hat"):
        _close(sparse[1][key], dense[1][key])
    _close(sparse[2], dense[2])  # every parameter's gradient
    # One Adam step through train_step, with dead latents (AuxK runs).
    states = {}
    for path in ("dense", "sparse"):
        hp = _hp(path)
        assert hp.loss.sparse == (path == "sparse")
        state = ts.init_state(hp)
        state["since_fired"] = jnp.where(_dead(5), 100, 0).astype(jnp.int32)
        states[path], metrics = jax.jit(lambda s, b, w, hp=hp: ts.train_step(s, b, w, hp=hp))(
            state, x, weights
        )
        assert float(metrics["aux_loss"]) > 0 and float(metrics["k"]) == K
    _close(states["sparse"], states["dense"])


# --- (c) one device against eight --------------------------------------------------------------


_SHARDED = """
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from tests.conftest import train_config
from xcoder_jax import sharding, train_step as ts
assert jax.device_count() == 8
c = train_config()
c.crosscoder.loss, c.crosscoder.k, c.crosscoder.n_latents = "matryoshka", 4, 64
c.crosscoder.dead_window_tokens = 64  # latents die within the run: AuxK runs too
x = np.random.default_rng(0).normal(size=(3, 32, 2, 8)).astype(np.float32)
w = np.ones(32, np.float32)
states = {{}}
for path in ("dense", "sparse"):
    c.crosscoder.topk_path = path
    hp = ts.HParams.from_config(c, 8, [1.0, 1.0])
    assert hp.loss.groups == (2, 4, 8, 16, 34) and hp.loss.sparse == (path == "sparse")
    step = sharding.ShardedStep(hp, sharding.make_mesh(4, 2, 32, 64))
    b = step.init()
    for xb in x:
        b, mb = step.step(b, *step.to_device(xb, w))
    states[path] = b, float(mb["loss"]), float(mb["aux_loss"])
    if path == "dense":  # the reference: one device, dense (the sparse path equals it)
        one = jax.jit(lambda s, b, v: ts.train_step(s, b, v, hp=hp))
        a = ts.init_state(hp)
        for xb in x:
            a, ma = one(a, xb, w)
        assert float(ma["aux_loss"]) > 0
for path, (b, loss, aux) in states.items():
    np.testing.assert_allclose([loss, aux], [float(ma["loss"]), float(ma["aux_loss"])], rtol=1e-4)
    for u, v in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(b["rest"]["threshold"][...]), np.asarray(a["rest"]["threshold"][...]),
        rtol=1e-5,
    )
print("ok")
"""


def test_eight_devices_equal_one():
    """Latent axis over 'model' = 2, rows over 'data' = 4, both paths: the same loss,
    parameters and threshold after three steps as one device."""
    run_on_eight_devices(_SHARDED)


# --- (d) one group is BatchTopK ----------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_one_group_is_batchtopk(sparse):
    cc = _model()
    x, weights = _data()
    dead = _dead(5)
    args = dict(sparse=sparse, k_max=4 * K, anneal_steps=4)  # k annealed from 4 K to K
    one = mt.Matryoshka(K, AUX_K, 0.25, 0.9, (H,), **args)
    ref = BatchTopK(K, AUX_K, 0.25, 0.9, **args)
    for step in (0, 2, 4):
        outs = [_grads(loss, cc, x, weights, dead, step) for loss in (one, ref)]
        (v1, a1, g1, r1), (v2, a2, g2, r2) = outs
        np.testing.assert_allclose(v1, v2, rtol=1e-6)
        np.testing.assert_array_equal(a1["f"], a2["f"])  # the same selection
        np.testing.assert_array_equal(a1["k"], a2["k"])
        for key in ("mse", "aux", "batch_threshold", "x_hat"):
            np.testing.assert_allclose(a1[key], a2[key], rtol=1e-6, atol=1e-7)
        _close(g1, g2, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(r1["threshold"][...], r2["threshold"][...])
    np.testing.assert_array_equal(one.encode(cc, x), ref.encode(cc, x))
    assert one.threshold_on_f(cc) is not None


# --- (e) the export and the other formats -------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Matryoshka export over the layer of a small synthetic store, with a threshold."""
    root = tmp_path_factory.mktemp("matryoshka")
    store_dir = str(root / "activations")
    synthetic_store(store_dir, n_rows=512, d=D, shard_rows=256)
    w = random_weights(D, H)
    w["threshold"] = (0.3 / np.linalg.norm(w["W_dec"], axis=-1).sum(-1)).astype(np.float32)
    store = ActivationStore(store_dir)
    meta = {"layer": store.layer, "d_model": D, "n_models": 2, "n_latents": H}
    meta.update(loss="matryoshka", latent_groups=list(GROUPS))
    directory = str(root / "export")
    export.export(directory, w, np.float32([0.5, 2.0]), meta)
    return directory, store_dir


def test_export_records_the_groups_and_the_crosscoder_reads_them(exported, tmp_path):
    from xcoder_jax import train_records

    directory, _ = exported
    xc = ExportedCrosscoder.load(directory)
    assert xc.latent_groups == GROUPS and xc.threshold is not None
    tensors, config = export.load_export(directory)
    del config["latent_groups"]
    assert ExportedCrosscoder(tensors, config).latent_groups is None  # other kinds: none
    with pytest.raises(export.ExportError, match="latent_groups"):
        ExportedCrosscoder(tensors, {**config, "latent_groups": [2, 3]})
    # Training's export meta records the loss object's groups, for this kind only.
    store = SimpleNamespace(
        manifest={"models": [], "layer": 1, "d_model": D, "n_models": 2, "tokenizer_sha256": "t"},
        n_rows=8, mean=np.zeros((2, D)), total_variance=np.ones(2),
    )  # fmt: skip
    progress = train_records.Progress(seen=np.zeros(1, np.uint8))
    c = train_config()
    meta = lambda loss: train_records.export_meta(c, store, loss, progress, [0], {})
    m = meta(mt.Matryoshka(K, AUX_K, 0.25, 0.9, GROUPS))
    assert (m["loss"], m["latent_groups"]) == ("matryoshka", list(GROUPS))
    assert "latent_groups" not in meta(BatchTopK(K, AUX_K, 0.25, 0.9))


def test_formats_write_it_as_batchtopk_with_its_groups(exported, tmp_path):
    directory, store_dir = exported
    with pytest.raises(formats.FormatError, match="a matryoshka crosscoder"):
        formats.convert_export(directory, "ckkissane", str(tmp_path / "ck"), train_config())
    a, _ = export.load_export(directory)
    for fmt in ("dictionary_learning", "saelens"):
        out = str(tmp_path / fmt)
        facts = formats.convert_export(directory, fmt, out, train_config())
        assert facts["latent_groups"] == list(GROUPS) == common.read_sidecar(out)["latent_groups"]
        workdir = str(tmp_path / f"imported_{fmt}")
        os.makedirs(workdir)
        os.symlink(store_dir, wd.activations_dir(workdir))
        cfg = formats.import_crosscoder(out, fmt, workdir)
        assert (cfg["loss"], cfg["latent_groups"]) == ("matryoshka", list(GROUPS))
        b, _ = export.load_export(wd.export_dir(workdir))
        np.testing.assert_allclose(b["threshold"], a["threshold"], rtol=1e-5)
        assert ExportedCrosscoder.load(wd.export_dir(workdir)).latent_groups == GROUPS
    import json

    with open(os.path.join(tmp_path, "dictionary_learning", "config.json")) as f:
        assert json.load(f)["dict_class"] == "BatchTopKCrossCoder"
    with open(os.path.join(tmp_path, "saelens", "cfg.json")) as f:
        assert json.load(f)["metadata"]["crosscoder"]["latent_groups"] == list(GROUPS)


# --- (f) the analysis per group --------------------------------------------------------------


def test_analysis_counts_the_classes_per_group(tmp_path):
    # Latents by class: base-only (distilled row 0), distilled-only (base row 0), shared.
    rng = np.random.default_rng(2)
    kinds = np.array(["b", "s", "d", "s", "s", "b", "d", "d", "s", "s"])
    w_dec = rng.normal(size=(len(kinds), 2, D)).astype(np.float32)
    w_dec[kinds == "b", 1] = 0
    w_dec[kinds == "d", 0] = 0
    h = len(kinds)
    weights = {
        "W_enc": np.zeros((2, D, h), np.float32),
        "b_enc": np.zeros(h, np.float32),
        "W_dec": w_dec,
        "b_dec": np.zeros((2, D), np.float32),
    }
    meta = {"layer": 1, "d_model": D, "n_latents": h, "models": [], "latent_groups": [2, 3, 5]}
    export.export(str(tmp_path), weights, np.array([1.0, 1.0]), meta)
    xc = ExportedCrosscoder.load(str(tmp_path))
    ac = SimpleNamespace(norm="l1", base_only_max=0.1, distilled_only_min=0.9)
    decoder = DecoderFacts.build(xc.normalised_decoder(), xc.roles, ac)
    alive = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1])  # latents 4 and 7 never fired: dead
    scan = SimpleNamespace(fire_heldout=alive, heldout_rows=10, fire_count=alive)
    facts = LatentFacts.measured(decoder, scan, store_rows=10, ac=ac)
    groups = group_summary(xc.latent_groups, facts.classes)["groups"]
    assert [g["latents"] for g in groups] == [[0, 2], [2, 5], [5, 10]]
    counts = [tuple(g["counts"].values()) for g in groups]  # base, shared, distilled, dead
    assert counts == [(1, 1, 0, 0), (0, 1, 1, 1), (1, 2, 1, 1)]
    assert groups[2]["shares"] == {
        "base_only": 0.2, "shared": 0.4, "distilled_only": 0.2, "dead": 0.2
    }  # fmt: skip
    assert group_summary(None, facts.classes) == {}  # other kinds: no key
    page = groups_html({"groups": groups})
    assert "Matryoshka groups" in page and "5–9" in page and "2 (40.0%)" in page
    assert groups_html({}) == ""
