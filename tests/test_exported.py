"""The exported crosscoder in torch against the JAX module it was trained as, elementwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from xcoder_jax import export, losses, nrn
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.exported import ExportedCrosscoder

SCALES = np.array([0.25, 3.0], np.float32)  # normalised = raw * scale


def _trained_like(threshold: bool) -> Crosscoder:
    """A crosscoder with nonzero biases and, optionally, a BatchTopK threshold that zeroes
    about half of the positive activations of a random batch."""
    cc = Crosscoder(2, 16, 48, rngs=nnx.Rngs(3), dec_init_norm=0.3)
    key = jax.random.key(4)
    cc.b_enc[...] = 0.05 * jax.random.normal(key, (48,))
    cc.b_dec[...] = 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (2, 16))
    if threshold:
        x = jax.random.normal(jax.random.fold_in(key, 2), (64, 2, 16))
        weighted = cc.encode(x) * cc.decoder_norms().sum(-1)
        cc.threshold[...] = jnp.full((48,), jnp.median(weighted[weighted > 0]))
    return cc


def _export(cc: Crosscoder, loss, directory) -> ExportedCrosscoder:
    weights = {n: np.asarray(getattr(cc, n)[...]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    thr = loss.threshold_on_f(cc)
    if thr is not None:
        weights["threshold"] = np.asarray(thr)
    models = [{"role": "distilled"}, {"role": "base"}]  # slot order is not role order
    export.export(str(directory), weights, SCALES, {"layer": 1, "models": models})
    return ExportedCrosscoder.load(str(directory))


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_torch_twin_equals_the_trained_module(kind, tmp_path):
    loss = losses.L1(1.0, 0.1, 10) if kind == "l1" else losses.BatchTopK(4, 8, 0.1, 0.99)
    cc = _trained_like(threshold=kind == "batchtopk")
    xc = _export(cc, loss, tmp_path)
    x_raw = np.asarray(jax.random.normal(jax.random.key(9), (40, 2, 16))) / SCALES[None, :, None]
    x_norm = x_raw * SCALES[None, :, None]
    f_jax = np.asarray(loss.encode(cc, jnp.asarray(x_norm)))  # training's inference encoder
    x_hat_jax = np.asarray(cc.decode(jnp.asarray(f_jax))) / SCALES[None, :, None]  # raw
    active = f_jax > 0
    assert 0.1 < active.mean() < 0.9  # the threshold and the ReLU both bite
    xt = torch.from_numpy(x_raw.astype(np.float32))
    f_t = xc.encode_t(xt).T.numpy()
    f_some = xc.latent_acts(xt, range(48)).numpy()
    # Same formula, float32 sums in another order: tolerance at the scale of f, except that
    # an activation within rounding of the threshold may fall on either side (none here).
    scale = np.abs(f_jax).max()
    for f in (f_t, f_some):
        np.testing.assert_array_equal(f > 0, active)
        np.testing.assert_allclose(f, f_jax, rtol=1e-4, atol=1e-5 * scale)
    x_hat = xc.reconstruct(xt).numpy()
    np.testing.assert_allclose(x_hat, x_hat_jax, rtol=1e-4, atol=1e-5 * np.abs(x_hat_jax).max())
    # The JAX module rebuilt from the export (raw units) agrees as well.
    raw_module, _ = export.load_export(str(tmp_path), "jax")
    np.testing.assert_allclose(
        np.asarray(raw_module.encode(jnp.asarray(x_raw), kind)), f_jax, rtol=1e-4, atol=1e-5 * scale
    )


def test_facts_of_the_export(tmp_path):
    cc = _trained_like(threshold=False)
    xc = _export(cc, losses.L1(1.0, 0.1, 10), tmp_path)
    w_norm = np.asarray(cc.W_dec[...])
    np.testing.assert_allclose(xc.normalised_decoder(), w_norm, rtol=1e-6)
    assert xc.roles == ["distilled", "base"] and xc.layer == 1
    np.testing.assert_allclose(xc.nrn("l2"), nrn.latent_nrn(w_norm, ["distilled", "base"], "l2"))
    # NRN reads the slots by role: slot 0 is the distilled model here.
    d0, d1 = (np.linalg.norm(w_norm[:, m], axis=-1) for m in (0, 1))
    np.testing.assert_allclose(xc.nrn("l2"), d0 / (d0 + d1), rtol=1e-5)
    np.testing.assert_allclose(xc.mean_norms, np.sqrt(16) / SCALES, rtol=1e-6)
    ids = [3, 7]
    xt = torch.randn(5, 2, 16)
    delta = xc.ablation_delta(xt, ids, 1).numpy()
    expected = xc.latent_acts(xt, ids).numpy() @ xc.W_dec[ids, 1].numpy()
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="out of range"):
        xc.latent_acts(xt, [48])
