"""The sparse L1 step against the dense one: loss, gradients, updates, switching, devices."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import train_config
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import l1_switch, sharding
from xcoder_jax import train_step as ts
from xcoder_jax.config_rules import RULES
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError
from xcoder_jax.losses import l1, l1_sparse
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


def test_sparse_equals_dense():
    """Loss, terms and every gradient, with masked rows and dedicated latents; a capacity of
    exactly the pairs, and one too small (the batch runs dense). Capacities with room, and
    no dedicated latents: the trajectory tests below."""
    cc = _model((5, 7))
    x, weights = _data()
    (ld, ad), gd = _loss_and_grads(l1_loss, cc, x, weights)
    valid = np.asarray(weights) > 0
    n = int((np.asarray(ad["f"])[valid] > 0).sum())  # the active pairs of the rows that count
    assert 0.1 * B * H < n < 0.4 * B * H and (np.asarray(ad["f"])[~valid] > 0).any()
    for room in ("exact", "overflow"):
        capacity = {"exact": n, "overflow": n - 1}[room]
        sparse_fn = lambda m, x, w, lam, c=capacity: l1_loss_sparse(m, x, w, lam, c)
        (ls, as_), gs = _loss_and_grads(sparse_fn, cc, x, weights)
        np.testing.assert_allclose(float(ls), float(ld), rtol=1e-5)
        for key in ("mse", "sparsity"):
            np.testing.assert_allclose(float(as_[key]), float(ad[key]), rtol=1e-5)
        np.testing.assert_array_equal(as_["f"], ad["f"])  # the metrics' activations
        _assert_tree_close(np.asarray(as_["x_hat"])[valid], np.asarray(ad["x_hat"])[valid])
        _assert_tree_close(gs, gd)
        # The dedicated latents' masked rows get exactly no gradient.
        np.testing.assert_array_equal(cc._masked(gs["W_enc"][...], "enc"), gs["W_enc"][...])
        np.testing.assert_array_equal(cc._masked(gs["W_dec"][...], "dec"), gs["W_dec"][...])
        # Which branch ran: the dense path's own numbers when the pairs overflow, the
        # pairs alone's when they fit.
        if room == "overflow":
            assert float(ls) == float(ld)
            _assert_tree_close(gs, gd, rtol=0, atol=0)
            continue
        pairs_fn = lambda m, x, w, lam, c=capacity: l1_sparse.pairs_loss(
            m, x, w, lam, jax.lax.stop_gradient(m.pre_acts(x)), c
        )
        (lp, _), gp = _loss_and_grads(pairs_fn, cc, x, weights)
        assert float(lp) == float(ls)
        _assert_tree_close(gp, gs, rtol=0, atol=0)


def test_active_pairs_packs_in_row_major_order():
    active = jnp.asarray([[0, 1, 1], [0, 0, 0], [1, 0, 1]], bool)
    rows, cols, valid = jax.jit(l1_sparse.active_pairs, static_argnums=1)(active, 6)
    np.testing.assert_array_equal(rows, [0, 0, 2, 2, 0, 0])
    np.testing.assert_array_equal(cols, [1, 2, 0, 2, 0, 0])
    np.testing.assert_array_equal(valid, [1, 1, 1, 1, 0, 0])
    rows, cols, valid = jax.jit(l1_sparse.active_pairs, static_argnums=1)(active, 2)
    np.testing.assert_array_equal(cols, [1, 2])


def _hp(path="dense", exclusive=(0.0, 0.0), **cc):
    c = train_config()
    c.crosscoder.update(d_model=D, n_latents=H, l1_path=path, exclusive=exclusive, **cc)
    c.train.batch_size = B
    c.crosscoder.l1_warmup_frac = 0.0  # lambda at its value from the first step
    return c, ts.HParams.from_config(c, D, [1.0, 1.0])


def test_capacities_are_buckets_with_room_and_few():
    batch, h = 1024, 4096
    top = l1_sparse.max_capacity(batch, h)
    assert top == l1_sparse.bucket(1.25 * l1_sparse.SPARSE_MAX_DENSITY * h * batch)
    assert l1_sparse.capacity_for(40, batch, h) == 65536  # 1.25 x 40 x 1024 = 51200
    assert l1_sparse.capacity_for(0, batch, h) == l1_sparse.MIN_CAPACITY
    assert l1_sparse.capacity_for(h, batch, h) == top
    # Kept while the bucket fits with at most 4x room; grown at once; shrunk by 4x.
    assert l1_switch.next_capacity(65536, 30, batch, h) == 65536
    assert l1_switch.next_capacity(65536, 60, batch, h) == 131072
    assert l1_switch.next_capacity(65536, 10, batch, h) == 65536  # bucket 16384: 4x
    assert l1_switch.next_capacity(65536, 5, batch, h) == 8192
    used = [2**i for i in range(12, 12 + l1_switch.MAX_CAPACITIES)]  # 4096 ... 131072
    assert l1_switch.next_capacity(0, 5, batch, h, used) == 8192  # already compiled
    assert l1_switch.next_capacity(0, 1, batch, h, used) == 4096  # the smallest above 2048
    assert l1_switch.next_capacity(0, 200, batch, h, used) == used[-1]  # none above 262144


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED.format(root=root)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
