"""The sparse BatchTopK step against the dense one: loss, gradients, updates, selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import run_on_eight_devices
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.losses.batchtopk import (
    batch_topk,
    batchtopk_loss,
    batchtopk_loss_sparse,
    use_sparse,
)

B, M, D, H, K, AUX_K = 24, 2, 8, 64, 3, 5


def _model(seed=0) -> Crosscoder:
    cc = Crosscoder(M, D, H, rngs=nnx.Rngs(seed), dec_init_norm=0.5)
    cc.b_enc[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (H,))
    cc.b_dec[...] = 0.1 * jax.random.normal(jax.random.key(seed + 2), (M, D))
    return cc


def _data(seed=3, masked=(4, 17)):
    x = jax.random.normal(jax.random.key(seed), (B, M, D))
    weights = jnp.ones(B).at[jnp.asarray(masked, int)].set(0.0)
    return x, weights


def _loss_and_grads(fn, cc, x, weights, dead):
    graph, params, rest = nnx.split(cc, nnx.Param, ...)

    def loss(p):
        return fn(nnx.merge(graph, p, rest), x, weights, K, dead, AUX_K, 0.25)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, aux, grads


def _assert_tree_close(a, b, rtol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u), np.asarray(v)
        np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * max(np.abs(v).max(), 1e-12))


@pytest.mark.parametrize("n_dead", [0, 7, H])
def test_sparse_equals_dense(n_dead):
    cc = _model()
    x, weights = _data()
    dead = jnp.zeros(H, bool).at[jnp.arange(n_dead) * (H // max(n_dead, 1)) % H].set(True)
    dense = _loss_and_grads(batchtopk_loss, cc, x, weights, dead)
    sparse = _loss_and_grads(batchtopk_loss_sparse, cc, x, weights, dead)
    np.testing.assert_allclose(float(sparse[0]), float(dense[0]), rtol=1e-5)
    for key in ("mse", "aux", "batch_threshold"):
        np.testing.assert_allclose(float(sparse[1][key]), float(dense[1][key]), rtol=1e-5)
    assert (float(dense[1]["aux"]) > 0) == (n_dead > 0)  # AuxK really runs when dead
    np.testing.assert_array_equal(np.asarray(sparse[1]["f"]) > 0, np.asarray(dense[1]["f"]) > 0)
    _assert_tree_close(sparse[1]["f"], dense[1]["f"])
    _assert_tree_close(sparse[2], dense[2])  # every parameter's gradient


def test_selection_is_the_dense_set_with_ties():
    """Equal weighted activations: both paths keep the same pairs as `lax.top_k`."""
    cc = _model()
    x, weights = _data(masked=())
    # Quantised inputs make many pre-activations tie exactly.
    cc.W_enc[...] = jnp.round(cc.W_enc[...] * 4) / 4
    cc.W_dec[...] = jnp.ones_like(cc.W_dec[...]) / np.sqrt(D)
    x = jnp.round(x)
    _, dense_aux, _ = _loss_and_grads(batchtopk_loss, cc, x, weights, jnp.zeros(H, bool))
    _, sparse_aux, _ = _loss_and_grads(batchtopk_loss_sparse, cc, x, weights, jnp.zeros(H, bool))
    weighted = jax.nn.relu(cc.pre_acts(x)) * cc.decoder_norms().sum(-1)
    values = np.asarray(weighted)[np.asarray(weighted) > 0]
    assert len(values) - len(np.unique(values)) > 10  # there are ties to break
    expected = np.asarray(batch_topk(weighted, K))
    np.testing.assert_array_equal(np.asarray(sparse_aux["f"]) > 0, expected)
    np.testing.assert_array_equal(np.asarray(dense_aux["f"]) > 0, expected)


def test_auto_choice_follows_the_ratio():
    assert use_sparse("auto", 4096, 32) and not use_sparse("auto", 4096, 128)
    assert use_sparse("auto", 32768, 100) and use_sparse("sparse", 64, 32)
    assert not use_sparse("dense", 10**6, 1)
    with pytest.raises(ValueError, match="unknown BatchTopK path"):
        use_sparse("fast", 64, 1)


_SHARDED = """
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from tests.conftest import train_config
from xcoder_jax import sharding, train_step as ts
assert jax.device_count() == 8
c = train_config()
c.crosscoder.loss, c.crosscoder.k, c.crosscoder.n_latents = "batchtopk", 4, 64
c.crosscoder.dead_window_tokens = 64  # latents die within the run: AuxK runs too
out = {{}}
x = np.random.default_rng(0).normal(size=(3, 32, 2, 8)).astype(np.float32)
w = np.ones(32, np.float32)
for path in ("dense", "sparse"):
    c.crosscoder.topk_path = path
    hp = ts.HParams.from_config(c, 8, [1.0, 1.0])
    assert hp.loss.sparse == (path == "sparse")
    one = jax.jit(lambda s, b, v: ts.train_step(s, b, v, hp=hp))
    step = sharding.ShardedStep(hp, sharding.make_mesh(4, 2, 32, 64))
    a, b = ts.init_state(hp), step.init()
    for xb in x:
        a, ma = one(a, xb, w)
        b, mb = step.step(b, *step.to_device(xb, w))
    out[path] = (a, b, float(ma["aux_loss"]))
for path, (a, b, aux) in out.items():
    for u, v in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-6)
dense, sparse = (jax.tree.leaves(out[p][0]["params"]) for p in ("dense", "sparse"))
for u, v in zip(dense, sparse, strict=True):
    np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-6)
assert out["sparse"][2] > 0 and abs(out["sparse"][2] - out["dense"][2]) < 1e-4 * out["dense"][2]
print("ok")
"""


def test_sparse_on_eight_devices_equals_one_and_dense():
    """Latent axis over 'model' = 2, rows over 'data' = 4: the same parameters after three
    steps as one device, and as the dense path."""
    run_on_eight_devices(_SHARDED)
