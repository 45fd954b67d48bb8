"""The sparse L1 step against the dense one: loss, gradients, updates, switching, devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import run_on_eight_devices, train_config
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import l1_switch, sharding
from xcoder_jax import train_step as ts
from xcoder_jax.config_rules import RULES
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError
from xcoder_jax.losses import l1, l1_sparse, packing
from xcoder_jax.losses.l1 import l1_loss, l1_loss_sparse

B, M, D, H = 24, 2, 8, 64
MASKED = (4, 17)
LAM = 0.7


def _model(exclusive=(0, 0), seed=0) -> Crosscoder:
    def build():
        cc = Crosscoder(M, D, H, rngs=nnx.Rngs(seed), dec_init_norm=0.5, exclusive=exclusive)
        # A negative bias: about a fifth of the entries fire, as a sparse crosscoder's would.
        cc.b_enc[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (H,)) - 0.4
        cc.b_dec[...] = 0.1 * jax.random.normal(jax.random.key(seed + 2), (M, D))
        return cc

    # Built in one compiled program: op by op, each of its operations would compile alone.
    return nnx.merge(nnx.graphdef(nnx.eval_shape(build)), jax.jit(lambda: nnx.state(build()))())


def _data(seed=3):
    x = np.random.default_rng(seed).normal(size=(B, M, D)).astype(np.float32)
    weights = np.ones(B, np.float32)
    weights[list(MASKED)] = 0.0
    return jnp.asarray(x), jnp.asarray(weights)


def _loss_and_grads(fn, cc, x, weights):
    graph, params, rest = nnx.split(cc, nnx.Param, ...)

    def loss(p):
        return fn(nnx.merge(graph, p, rest), x, weights, LAM)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _pairs_only(m, x, w, lam, capacity):
    """The sparse branch alone, without the count and the dense fallback around it."""
    pre = jax.lax.stop_gradient(m.pre_acts(x))
    pairs = packing.active_pairs((pre > 0) & (w[:, None] != 0), capacity)[:3]
    return l1_sparse.pairs_loss(m, x, w, lam, pre, pairs)


def test_sparse_equals_dense():
    """Loss, terms and every gradient, with masked rows and dedicated latents: the pairs at
    a capacity of exactly their number, and a capacity one short, where the step runs the
    dense path (its own numbers, bit for bit). The whole sparse step, with room, with and
    without dedicated latents: the trajectory and eight-device tests below."""
    cc = _model((5, 7))
    x, weights = _data()
    (ld, ad), gd = _loss_and_grads(l1_loss, cc, x, weights)
    valid = np.asarray(weights) > 0
    n = int((np.asarray(ad["f"])[valid] > 0).sum())  # the active pairs of the rows that count
    assert 0.1 * B * H < n < 0.4 * B * H and (np.asarray(ad["f"])[~valid] > 0).any()
    (ls, as_), gs = _loss_and_grads(lambda *a: _pairs_only(*a, n), cc, x, weights)
    np.testing.assert_allclose(float(ls), float(ld), rtol=1e-5)
    for key in ("mse", "sparsity"):
        np.testing.assert_allclose(float(as_[key]), float(ad[key]), rtol=1e-5)
    np.testing.assert_array_equal(as_["f"], ad["f"])  # the metrics' activations
    _assert_tree_close(np.asarray(as_["x_hat"])[valid], np.asarray(ad["x_hat"])[valid])
    _assert_tree_close(gs, gd)
    # The dedicated latents' masked rows get exactly no gradient.
    np.testing.assert_array_equal(cc._masked(gs["W_enc"][...], "enc"), gs["W_enc"][...])
    np.testing.assert_array_equal(cc._masked(gs["W_dec"][...], "dec"), gs["W_dec"][...])
    short = lambda m, x, w, lam: l1_loss_sparse(m, x, w, lam, n - 1)
    (lo, ao), go = _loss_and_grads(short, cc, x, weights)
    assert float(lo) == float(ld)
    np.testing.assert_array_equal(ao["x_hat"], ad["x_hat"])
    _assert_tree_close(go, gd, rtol=0, atol=0)


def test_active_pairs_packs_in_row_major_order():
    """Every entry, in order, at every density; the first ones when they overflow."""
    rng = np.random.default_rng(0)
    pack = jax.jit(packing.active_pairs, static_argnums=1)
    for density in (0.0, 0.01, 0.3, 1.0):
        active = rng.random((7, 45)) < density  # 315 entries: not a whole number of words
        expected = np.flatnonzero(active)
        for capacity in (100, 20):  # from room to spare to overflow
            rows, cols, valid, count = jax.device_get(pack(jnp.asarray(active), capacity))
            assert count == len(expected)
            n = min(capacity, len(expected))
            np.testing.assert_array_equal(valid, np.arange(capacity) < len(expected))
            np.testing.assert_array_equal(rows[:n] * 45 + cols[:n], expected[:n])
            assert (rows[n:] == 0).all() and (cols[n:] == 0).all()


def _hp(path="dense", exclusive=(0.0, 0.0), **cc):
    c = train_config()
    c.crosscoder.update(d_model=D, n_latents=H, l1_path=path, exclusive=exclusive, **cc)
    c.train.batch_size = B
    c.crosscoder.l1_warmup_frac = 0.0  # lambda at its value from the first step
    return c, ts.HParams.from_config(c, D, [1.0, 1.0])


def test_capacities_are_buckets_with_room_and_few():
    bucket = l1_sparse.bucket
    assert [bucket(v) for v in (0.5, 1, 3, 4096, 4097)] == [1, 1, 3, 4096, 4871]  # 2^(k/4)
    for v in np.random.default_rng(0).uniform(1, 1e8, 200):
        assert v <= bucket(v) < 1.19 * v + 1
    batch, h = 1024, 4096
    top = l1_sparse.max_capacity(batch, h)
    assert top == bucket(1.25 * l1_sparse.SPARSE_MAX_DENSITY * h * batch)
    assert l1_sparse.capacity_for(30, batch, h) == bucket(38400) == 38968  # 1.25 x 30 x 1024
    assert l1_sparse.capacity_for(0, batch, h) == l1_sparse.MIN_CAPACITY
    assert l1_sparse.capacity_for(h, batch, h) == top
    # Kept while at least the L0's bucket and at most 1.5x it; grown at once.
    cap = l1_sparse.capacity_for(10, batch, h)
    assert cap == 13778
    assert l1_switch.next_capacity(cap, 9, batch, h) == cap  # bucket 11586
    assert l1_switch.next_capacity(cap, 12, batch, h) == 16384
    assert l1_switch.next_capacity(cap, 6, batch, h) == 8192  # 1.5 x 8192 < cap
    # At most MAX_CAPACITIES: then a compiled one, the smallest above, else the largest.
    used = [bucket(2 ** (12 + i / 4)) for i in range(l1_switch.MAX_CAPACITIES)]  # 4096 ...
    assert l1_switch.next_capacity(0, 4096 / 1.25 / batch, batch, h, used) == 4096
    assert l1_switch.next_capacity(0, 1, batch, h, used) == 4096  # bucket 1449
    assert l1_switch.next_capacity(0, 30, batch, h, used) == used[-1]  # bucket 38968


def test_auto_switches_on_the_threshold():
    loss = l1.L1(2.0, 0.0, 10)
    t = l1_sparse.SPARSE_MAX_DENSITY * H
    below, above = (
        l1_switch.next_loss("auto", loss, 0.5 * t, B, H),
        l1_switch.next_loss("auto", loss, t, B, H),
    )
    assert below.sparse and below.capacity == l1_sparse.capacity_for(0.5 * t, B, H)
    assert not above.sparse and above.capacity == 0
    assert l1_switch.next_loss("sparse", loss, H, B, H).sparse  # sparse whatever the L0
    assert not l1_switch.next_loss("dense", loss, 0.0, B, H).sparse


def test_trajectory_switching_paths_equals_the_dense_one(monkeypatch):
    """auto: dense, then sparse, then dense again, on one state (params and Adam moments),
    with masked rows and dedicated latents: after every step the all-dense trajectory's
    state and metrics, the first sparse step being one Adam update from the same state.
    (Without dedicated latents: the eight-device test below.)"""
    monkeypatch.setattr(l1_sparse, "SPARSE_MAX_DENSITY", 1.0)  # any logged L0 < h: sparse
    config, hp = _hp("auto", (0.125, 0.25))
    xs = np.random.default_rng(0).normal(size=(5, B, M, D)).astype(np.float32)
    w = np.asarray(_data()[1])
    trainer = sharding.ShardedStep(hp, sharding.make_mesh(1, 1, B, H))  # its dense step
    runs = {}
    for path in ("dense", "auto"):
        config.crosscoder.l1_path = path
        paths, state, runs[path] = l1_switch.Paths(trainer, config), trainer.init(), []
        for i, x in enumerate(xs):
            sparse = paths.loss.sparse
            state, metrics = paths.step(state, *trainer.to_device(x, w))
            if sparse:  # the pairs fitted: the sparse branch ran
                assert float(metrics["l0"]) * (B - len(MASKED)) <= paths.loss.capacity
            runs[path].append((sparse, jax.device_get((state, metrics))))  # state is donated
            paths.observe(float(metrics["l0"]) if i < 2 else float(H))  # then dense again
    assert [r[0] for r in runs["auto"]] == [False, True, True, False, False]
    assert not any(r[0] for r in runs["dense"])
    for (_, auto), (_, dense) in zip(runs["auto"], runs["dense"], strict=True):
        _assert_tree_close(auto, dense)


def test_config_rule_defaults_and_resume():
    from configs import pair, paper, tiny

    assert tiny.get_config().crosscoder.l1_path == "dense"
    assert paper.get_config("1.5b").crosscoder.l1_path == "auto"
    assert pair.get_config().crosscoder.l1_path == "dense"
    c = train_config()
    for path in l1.PATHS:
        c.crosscoder.l1_path = path
        assert RULES["crosscoder.l1_path"].ok(path)
        loss = l1.from_config(c.crosscoder, c.train)
        assert loss.sparse == (path == "sparse")
    assert loss.capacity == 0
    c.crosscoder.l1_path = "sparse"
    capacity = l1.from_config(c.crosscoder, c.train).capacity
    assert capacity == l1_sparse.max_capacity(c.train.batch_size, c.crosscoder.n_latents)
    c.crosscoder.l1_path = "fast"
    assert not RULES["crosscoder.l1_path"].ok("fast")
    assert RULES["crosscoder.l1_path"].accepted == "one of 'dense', 'sparse', 'auto'"
    with pytest.raises(ConfigError, match="l1_path"):
        l1.from_config(c.crosscoder, c.train)
    assert "crosscoder.l1_path" not in ckpt.config_fields(c)  # a resume may change it


_SHARDED = """
import dataclasses, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from configs import tiny
from xcoder_jax import sharding, train_step as ts
assert jax.device_count() == 8
c = tiny.get_config()
c.crosscoder.update(d_model=8, n_latents=64, l1_path="sparse", l1_warmup_frac=0.0)
c.train.update(batch_size=32, steps=10, lr=1e-2)
hp = ts.HParams.from_config(c, 8, [1.0, 1.0])
assert hp.loss.sparse
hp = dataclasses.replace(hp, loss=dataclasses.replace(hp.loss, capacity=2048))  # it all fits
x = np.random.default_rng(0).normal(size=(2, 32, 2, 8)).astype(np.float32)
w = np.ones(32, np.float32)
w[[3, 20]] = 0.0
dense = dataclasses.replace(hp, loss=dataclasses.replace(hp.loss, sparse=False))
init = jax.jit(ts.init_state, static_argnums=0)
out = []
for h in (hp, dense):  # one device: sparse, dense
    one = jax.jit(lambda s, b, v, h=h: ts.train_step(s, b, v, hp=h, with_metrics=False))
    a = init(h)
    for xb in x:
        a, _ = one(a, xb, w)
    out.append(a)
step = sharding.ShardedStep(hp, sharding.make_mesh(4, 2, 32, 64))
b = step.init()
for xb in x:
    b, _ = step.step(b, *step.to_device(xb, w), False)
for s in (out[1], b):
    for u, v in zip(jax.tree.leaves(out[0]), jax.tree.leaves(s), strict=True):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-6)
print("ok")
"""


def test_sparse_on_eight_devices_equals_one_and_dense():
    """Latent axis over 'model' = 2, rows over 'data' = 4: the same state after two sparse
    steps as on one device, and as two dense steps (masked rows, no dedicated latents)."""
    run_on_eight_devices(_SHARDED)


def test_training_switches_on_the_logged_l0(tmp_path, monkeypatch):
    """train_and_evaluate with "auto": dense until the first logged L0, sparse after it."""
    from tests.conftest import synthetic_store
    from xcoder_jax import train
    from xcoder_jax import workdir as wd

    monkeypatch.setattr(l1_sparse, "SPARSE_MAX_DENSITY", 1.0)  # any logged L0 < h: sparse
    synthetic_store(wd.activations_dir(str(tmp_path)), n_rows=1024)
    taken = []
    real_step = l1_switch.Paths.step

    def step(self, *args):
        taken.append(self.loss.sparse)
        return real_step(self, *args)

    monkeypatch.setattr(l1_switch.Paths, "step", step)
    c = train_config(steps=3, log_every=1, eval_every=0, checkpoint_every=3)
    c.crosscoder.l1_path = "auto"
    c.export.formats = ()
    train.train_and_evaluate(c, str(tmp_path))
    assert taken == [False, True, True]
