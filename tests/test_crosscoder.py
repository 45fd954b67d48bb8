"""The crosscoder module and its losses, against hand computations."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xcoder_jax import checkpoint as ckpt
from xcoder_jax.crosscoder import Crosscoder, batch_topk, batchtopk_loss, l1_loss


def _make_crosscoder(**overrides):
    kw = dict(n_models=2, d_model=8, n_latents=32, seed=0)
    kw.update(overrides)
    seed = kw.pop("seed")
    return Crosscoder(
        kw.pop("n_models"), kw.pop("d_model"), kw.pop("n_latents"), rngs=nnx.Rngs(seed), **kw
    )


def test_shapes_and_init():
    cc = _make_crosscoder()
    chex.assert_shape(cc.W_enc[...], (2, 8, 32))
    chex.assert_shape(cc.W_dec[...], (32, 2, 8))
    chex.assert_shape(cc.b_enc[...], (32,))
    chex.assert_shape(cc.b_dec[...], (2, 8))
    np.testing.assert_allclose(cc.decoder_norms(), np.full((32, 2), 0.08), rtol=1e-5)
    np.testing.assert_array_equal(cc.W_enc[...], np.transpose(cc.W_dec[...], (1, 2, 0)))
    np.testing.assert_array_equal(cc.b_enc[...], 0)
    x = jax.random.normal(jax.random.key(1), (5, 2, 8))
    chex.assert_shape(cc.encode(x), (5, 32))
    chex.assert_shape(cc(x), (5, 2, 8))
    chex.assert_tree_all_finite(cc(x))


def _numpy_l1(cc, x, lam):
    we, be = np.asarray(cc.W_enc[...]), np.asarray(cc.b_enc[...])
    wd, bd = np.asarray(cc.W_dec[...]), np.asarray(cc.b_dec[...])
    f = np.maximum(0, sum(x[:, m] @ we[m] for m in range(x.shape[1])) + be)
    x_hat = np.stack([f @ wd[:, m] + bd[m] for m in range(x.shape[1])], 1)
    mse = ((x_hat - x) ** 2).sum((1, 2)).mean()
    dec = np.sqrt((wd**2).sum(-1)).sum(-1)  # [h]: sum over models of row L2 norms
    return mse + lam * (f * dec).sum(-1).mean(), mse


def test_l1_loss_matches_hand_computation():
    cc = _make_crosscoder()
    # Non-trivial biases so that every term of the formula matters.
    cc.b_enc[...] = jnp.linspace(-0.1, 0.1, 32)
    cc.b_dec[...] = jnp.full((2, 8), 0.3)
    x = np.asarray(jax.random.normal(jax.random.key(2), (6, 2, 8)))
    loss, aux = l1_loss(cc, jnp.asarray(x), jnp.ones(6), jnp.asarray(2.0))
    want, want_mse = _numpy_l1(cc, x, 2.0)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], want_mse, rtol=1e-5)
    # Masked rows do not count.
    loss_masked, _ = l1_loss(cc, jnp.asarray(x), jnp.array([1, 1, 1, 0, 0, 0.0]), jnp.asarray(2.0))
    np.testing.assert_allclose(loss_masked, _numpy_l1(cc, x[:3], 2.0)[0], rtol=1e-5)


def test_l1_loss_on_a_tiny_example_by_hand():
    # One model, d=1, one latent: W_enc = W_dec = 1, biases 0.
    cc = _make_crosscoder(n_models=1, d_model=1, n_latents=1, dec_init_norm=1.0)
    cc.W_enc[...] = jnp.ones((1, 1, 1))
    cc.W_dec[...] = jnp.ones((1, 1, 1))
    x = jnp.array([[[2.0]], [[-1.0]]])
    # Row 1: f = 2, x_hat = 2, err 0, sparsity 2. Row 2: f = 0, x_hat = 0, err 1.
    loss, aux = l1_loss(cc, x, jnp.ones(2), jnp.asarray(0.5))
    np.testing.assert_allclose(aux["mse"], 0.5)
    np.testing.assert_allclose(aux["sparsity"], 1.0)
    np.testing.assert_allclose(loss, 0.5 + 0.5 * 1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_batch_topk_keeps_exactly_k_per_row_on_average(k):
    weighted = jax.random.uniform(jax.random.key(k), (16, 64)) + 0.01
    mask = batch_topk(weighted, k)
    assert int(mask.sum()) == k * 16
    # Those kept are the largest of the whole batch.
    assert float(weighted[mask].min()) >= float(weighted[~mask].max())


def test_batchtopk_loss_and_inference_threshold():
    cc = _make_crosscoder()
    x = jax.random.normal(jax.random.key(3), (10, 2, 8))
    dead = jnp.zeros(32, bool).at[:4].set(True)
    loss, aux = batchtopk_loss(cc, x, jnp.ones(10), 3, dead, 2, 1 / 32)
    assert int((aux["f"] > 0).sum()) == 30
    np.testing.assert_allclose(loss, aux["mse"] + aux["aux"] / 32, rtol=1e-6)
    assert float(aux["aux"]) > 0
    # With the threshold at the batch's cut, inference keeps at least the training choice.
    cc.threshold[...] = jnp.full(32, aux["batch_threshold"])
    f_inf = cc.encode(x, "batchtopk")
    assert bool(jnp.all((aux["f"] > 0) <= (f_inf > 0)))


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_jit_and_eager_agree(kind):
    cc = _make_crosscoder()
    x = jax.random.normal(jax.random.key(4), (8, 2, 8))
    graphdef, state = nnx.split(cc)

    def loss_of(state, x):
        model = nnx.merge(graphdef, state)
        if kind == "l1":
            return l1_loss(model, x, jnp.ones(8), jnp.asarray(2.0))[0]
        return batchtopk_loss(model, x, jnp.ones(8), 2, jnp.zeros(32, bool), 2, 0.1)[0]

    eager = jax.value_and_grad(loss_of)(state, x)
    jitted = jax.jit(jax.value_and_grad(loss_of))(state, x)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_fp32_params_and_is_close():
    cc32 = _make_crosscoder()
    cc16 = _make_crosscoder(dtype=jnp.bfloat16)
    assert cc16.W_enc[...].dtype == jnp.float32
    x = jax.random.normal(jax.random.key(5), (8, 2, 8))
    np.testing.assert_allclose(cc16(x), cc32(x), rtol=0.05, atol=0.02)


def test_export_in_raw_units_reproduces_the_normalised_model(tmp_path):
    cc = _make_crosscoder()
    cc.b_dec[...] = jnp.full((2, 8), 0.2)
    scales = np.array([0.5, 4.0], np.float32)
    weights = {n: np.asarray(getattr(cc, n)[...]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    ckpt.export(str(tmp_path), weights, scales, {"loss": "l1"})
    raw_model, config = ckpt.load_export(str(tmp_path), "jax")
    x_raw = np.asarray(jax.random.normal(jax.random.key(6), (4, 2, 8))) * 3
    x_norm = x_raw * scales[None, :, None]
    np.testing.assert_allclose(raw_model.encode(x_raw), cc.encode(x_norm), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        raw_model(x_raw) * scales[None, :, None], cc(x_norm), rtol=1e-4, atol=1e-4
    )
    tensors, _ = ckpt.load_export(str(tmp_path))
    np.testing.assert_allclose(
        ckpt.normalised_decoder(tensors, config), weights["W_dec"], rtol=1e-6
    )
    torch_tensors, _ = ckpt.load_export(str(tmp_path), "torch")
    assert tuple(torch_tensors["W_dec"].shape) == (32, 2, 8)


def test_export_with_missing_tensor(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"W_enc": np.zeros((2, 8, 4), np.float32)}, str(tmp_path / "crosscoder.safetensors"))
    with pytest.raises(ckpt.ExportError, match="lacks tensors"):
        ckpt.load_export(str(tmp_path))
