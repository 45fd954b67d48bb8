"""The crosscoder module and its losses, against hand computations."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xcoder_jax import export, losses
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.losses.batchtopk import batch_topk, batchtopk_loss, update_threshold
from xcoder_jax.losses.l1 import l1_loss


def assert_close(actual, desired, rtol, atol_frac=None, **kw):
    """assert_allclose with an absolute tolerance of `atol_frac * max|desired|` (default
    `rtol`): an element near zero is compared at the scale of its array, since float32
    rounding of the terms that cancel to it does not shrink with it."""
    desired = np.asarray(desired)
    scale = float(np.abs(desired).max()) if desired.size else 0.0
    atol = (rtol if atol_frac is None else atol_frac) * scale
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=atol, **kw)


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


def _float64_weights(cc):
    """(W_enc, b_enc, W_dec, b_dec) as float64 NumPy: references free of rounding."""
    return tuple(
        np.asarray(getattr(cc, n)[...], np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )


def _numpy_l1(cc, x, lam):
    we, be, wd, bd = _float64_weights(cc)
    x = np.asarray(x, np.float64)
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


def test_batch_topk_gives_masked_rows_slots_to_nobody():
    weighted = jax.random.uniform(jax.random.key(9), (8, 16)) + 0.01
    weighted = weighted.at[:3].set(0.0)  # three rows masked out (weighted by 0)
    mask = batch_topk(weighted, 2, jnp.asarray(5.0))
    assert int(mask.sum()) == 2 * 5 and not bool(mask[:3].any())
    assert float(weighted[mask].min()) >= float(weighted[3:][~mask[3:]].max())


def test_batchtopk_loss_and_inference_threshold():
    cc = _make_crosscoder()
    x = jax.random.normal(jax.random.key(3), (10, 2, 8))
    dead = jnp.zeros(32, bool).at[:4].set(True)
    loss, aux = batchtopk_loss(cc, x, jnp.ones(10), 3, dead, 2, 1 / 32)
    assert int((aux["f"] > 0).sum()) == 30
    np.testing.assert_allclose(loss, aux["mse"] + aux["aux"] / 32, rtol=1e-6)
    assert float(aux["aux"]) > 0
    # With the threshold at the batch's cut, inference keeps at least the training choice.
    # (A hair below the cut: the weighted activations are recomputed by `encode`, and the
    # kept minimum must not be lost to a last-bit difference between the two.)
    cc.threshold[...] = jnp.full(32, aux["batch_threshold"] * (1 - 1e-6))
    f_inf = cc.encode(x, "batchtopk")
    assert bool(jnp.all((aux["f"] > 0) <= (f_inf > 0)))
    # ...and the threshold is a real cut: some latent that training did not keep is off.
    assert int((f_inf > 0).sum()) < int((jax.nn.relu(cc.pre_acts(x)) > 0).sum())


def _numpy_batchtopk(cc, x, weights, k, dead, aux_k):
    """Float64 reference of `batchtopk_loss`: dict of f [batch, h], mse, aux, the AuxK
    activations aux_f [batch, h] and the weighted activations sorted descending.

    Keeps the k * n_valid largest positive decoder-norm-weighted activations of the valid
    rows;
    AuxK: per row, the aux_k largest ReLU pre-activations among the dead latents decode
    (without b_dec) the residual x - x_hat; squared error summed over models and d, mean
    over valid rows.
    """
    we, be, wd, bd = _float64_weights(cc)
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    pre = np.maximum(0, np.einsum("bmd,mdh->bh", x, we) + be)
    norms = np.linalg.norm(wd, axis=-1).sum(-1)  # [h]
    weighted = pre * norms * weights[:, None]
    order = np.argsort(-weighted, axis=None)[: int(k * weights.sum())]
    keep = np.zeros(weighted.size, bool)
    keep[order] = True
    keep = keep.reshape(weighted.shape) & (weighted > 0)
    f = np.where(keep, pre, 0.0)
    x_hat = np.einsum("bh,hmd->bmd", f, wd) + bd

    def mean_sq(target, estimate):
        per_row = np.square(estimate - target).sum((1, 2))
        return (per_row * weights).sum() / max(weights.sum(), 1.0)

    dead_ids = np.flatnonzero(dead)
    aux_f = np.zeros_like(pre)
    for b in range(len(x)):
        top = dead_ids[np.argsort(-pre[b, dead_ids])[:aux_k]]
        aux_f[b, top] = pre[b, top]
    aux_hat = np.einsum("bh,hmd->bmd", aux_f, wd)  # no b_dec: it models a residual
    aux = mean_sq(x - x_hat, aux_hat) if dead_ids.size else 0.0
    return {
        "f": f,
        "mse": mean_sq(x, x_hat),
        "aux": aux,
        "aux_f": aux_f,
        "weighted": np.sort(weighted, axis=None)[::-1],
    }


def _auxk_example():
    """(crosscoder, x [5, 2, 4], weights [5], dead [8]): an example with a clear gap at the
    top-k cut and dead latents that fire; the last row is masked out."""
    cc = _make_crosscoder(n_models=2, d_model=4, n_latents=8)
    cc.b_enc[...] = jnp.linspace(-0.05, 0.05, 8)
    cc.b_dec[...] = jnp.full((2, 4), 0.1)
    x = np.asarray(jax.random.normal(jax.random.key(7), (5, 2, 4)))
    weights = np.array([1, 1, 1, 1, 0], np.float32)
    dead = np.zeros(8, bool)
    dead[[1, 4, 6]] = True
    return cc, x, weights, dead


@pytest.mark.parametrize("aux_k", [2, 5])  # 5 > the 3 dead latents: all of them are used
def test_auxk_matches_hand_computation(aux_k):
    cc, x, weights, dead = _auxk_example()
    k, coeff = 2, 0.25
    ref = _numpy_batchtopk(cc, x, weights, k, dead, aux_k)
    # The example does not hinge on rounding: a clear gap at the top-k cut (k * 4 valid
    # rows), and dead latents that fire in valid rows, so that AuxK reconstructs something.
    cut, next_below = ref["weighted"][k * 4 - 1], ref["weighted"][k * 4]
    assert cut > 0 and cut - next_below > 1e-3 * cut
    assert (ref["aux_f"][:4] > 0).sum(-1).min() >= 1
    loss, aux = batchtopk_loss(
        cc, jnp.asarray(x), jnp.asarray(weights), k, jnp.asarray(dead), aux_k, coeff
    )
    assert int((aux["f"] > 0).sum()) == k * 4  # k per valid row; the masked row gets none
    assert_close(aux["f"], ref["f"], rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], ref["mse"], rtol=1e-5)
    np.testing.assert_allclose(aux["aux"], ref["aux"], rtol=1e-5)
    np.testing.assert_allclose(loss, ref["mse"] + coeff * ref["aux"], rtol=1e-5)
    np.testing.assert_allclose(aux["batch_threshold"], cut, rtol=1e-5)
    # No dead latent: no AuxK term at all.
    _, none = batchtopk_loss(
        cc, jnp.asarray(x), jnp.asarray(weights), k, jnp.zeros(8, bool), aux_k, coeff
    )
    assert float(none["aux"]) == 0.0


def test_threshold_ignores_batches_that_keep_nothing():
    cc = _make_crosscoder()
    x = jax.random.normal(jax.random.key(8), (10, 2, 8))
    dead = jnp.zeros(32, bool)
    # Every row masked out: nothing is kept and the batch's cut is the min of an empty set.
    _, empty = batchtopk_loss(cc, x, jnp.zeros(10), 3, dead, 2, 0.1)
    assert int((empty["f"] > 0).sum()) == 0 and float(empty["batch_threshold"]) == np.inf
    _, full = batchtopk_loss(cc, x, jnp.ones(10), 3, dead, 2, 0.1)
    cut = float(full["batch_threshold"])
    assert 0 < cut < np.inf
    unset = jnp.zeros(32)
    first = update_threshold(unset, full["batch_threshold"], 0.9)
    np.testing.assert_array_equal(first, np.full(32, cut, np.float32))  # first batch sets it
    # An empty batch leaves the threshold exactly as it was, before or after it is set.
    np.testing.assert_array_equal(update_threshold(first, empty["batch_threshold"], 0.9), first)
    np.testing.assert_array_equal(update_threshold(unset, empty["batch_threshold"], 0.9), unset)
    # A normal batch then still moves it by the EMA.
    after = update_threshold(first, jnp.asarray(2 * cut), 0.9)
    np.testing.assert_allclose(after, np.full(32, 1.1 * cut), rtol=1e-6)
    # A threshold already made infinite (by an older run) is reset by the next real cut.
    np.testing.assert_allclose(update_threshold(jnp.full(32, jnp.inf), cut, 0.9), cut, rtol=0)


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
    # jit fuses differently from op-by-op dispatch: last-bit differences, compared at each
    # array's own scale (a gradient element near zero is a sum that cancels).
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        assert_close(a, b, rtol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_is_close():
    cc32 = _make_crosscoder()
    cc16 = _make_crosscoder(dtype=jnp.bfloat16)
    assert cc16.W_enc[...].dtype == jnp.float32
    x = jax.random.normal(jax.random.key(5), (8, 2, 8))
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per input), products are
    # accumulated in float32: a few times 2^-9 of each array's scale.
    assert_close(cc16.pre_acts(x), cc32.pre_acts(x), rtol=2e-2)
    assert_close(cc16(x), cc32(x), rtol=2e-2)
    # ...and the compute dtype is really used.
    assert not np.array_equal(np.asarray(cc16.pre_acts(x)), np.asarray(cc32.pre_acts(x)))


def test_export_in_raw_units_reproduces_the_normalised_model(tmp_path):
    cc = _make_crosscoder()
    cc.b_dec[...] = jnp.full((2, 8), 0.2)
    scales = np.array([0.5, 4.0], np.float32)
    weights = {n: np.asarray(getattr(cc, n)[...]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    export.export(str(tmp_path), weights, scales, {"loss": "l1"})
    raw_model, config = export.load_export(str(tmp_path), "jax")
    x_raw = np.asarray(jax.random.normal(jax.random.key(6), (4, 2, 8))) * 3
    x_norm = x_raw * scales[None, :, None]
    # The scales are folded into the weights in another order of float32 operations.
    assert_close(raw_model.encode(x_raw), cc.encode(x_norm), rtol=1e-4)
    assert_close(raw_model(x_raw) * scales[None, :, None], cc(x_norm), rtol=1e-4)
    tensors, _ = export.load_export(str(tmp_path))
    # Elementwise (W / s) * s: relative rounding of each element, near zero or not.
    np.testing.assert_allclose(
        export.normalised_decoder(tensors, config), weights["W_dec"], rtol=1e-6
    )
    torch_tensors, _ = export.load_export(str(tmp_path), "torch")
    assert tuple(torch_tensors["W_dec"].shape) == (32, 2, 8)


def test_export_refuses_a_nonfinite_config_and_writes_nothing(tmp_path):
    cc = _make_crosscoder()
    weights = {n: np.asarray(getattr(cc, n)[...]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with pytest.raises(ValueError):
        export.export(str(tmp_path / "export"), weights, np.ones(2), {"eval": {"fve": [np.nan]}})
    assert not (tmp_path / "export").exists()


def test_export_with_missing_tensor(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"W_enc": np.zeros((2, 8, 4), np.float32)}, str(tmp_path / "crosscoder.safetensors"))
    with pytest.raises(export.ExportError, match="lacks tensors"):
        export.load_export(str(tmp_path))


# --- With and without jit ------------------------------------------------------------------


def _objective(loss, graph):
    """A loss kind's objective and threshold update over split module state."""

    def run(params, rest, x, weights, dead):
        value, aux = loss(nnx.merge(graph, params, rest), x, weights, jnp.int32(5), dead)
        return value, aux, loss.update(rest, aux)

    return run


class WithAndWithoutJit(chex.TestCase):
    """The module's pieces and each loss kind traced by jit and run op by op, against the
    float64 references above; their boundaries check shapes and dtypes either way."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_module_pieces(self):
        cc = _make_crosscoder(n_latents=16)
        cc.b_enc[...] = jnp.linspace(-0.1, 0.1, 16)
        cc.b_dec[...] = jnp.full((2, 8), 0.3)
        graph, state = nnx.split(cc)

        @self.variant
        def pieces(state, x):
            model = nnx.merge(graph, state)
            pre = model.pre_acts(x)
            return pre, model.decode(jax.nn.relu(pre)), model.decoder_norms(), model(x)

        x = jax.random.normal(jax.random.key(11), (4, 2, 8))
        pre, x_hat, norms, out = pieces(state, x)
        chex.assert_shape([pre, x_hat, norms], [(4, 16), (4, 2, 8), (16, 2)])
        chex.assert_type([pre, x_hat, out, norms], jnp.float32)
        we, be, wd, bd = _float64_weights(cc)
        want_pre = np.einsum("bmd,mdh->bh", np.asarray(x, np.float64), we) + be
        want_hat = np.einsum("bh,hmd->bmd", np.maximum(want_pre, 0), wd) + bd
        assert_close(pre, want_pre, rtol=1e-5)
        assert_close(x_hat, want_hat, rtol=1e-5)
        assert_close(out, want_hat, rtol=1e-5)  # the L1 kind's encoder is the plain ReLU
        assert_close(norms, np.linalg.norm(wd, axis=-1), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_each_loss_kind(self):
        cc, x, weights, dead = _auxk_example()
        graph, params, rest = nnx.split(cc, nnx.Param, ...)
        ref = _numpy_batchtopk(cc, x, weights, 2, dead, 2)
        kinds = {
            "l1": (losses.L1(2.0, 0.0, 10), _numpy_l1(cc, x[:4], 2.0)[0]),
            "dense": (losses.BatchTopK(2, 2, 0.25, 0.9), ref["mse"] + 0.25 * ref["aux"]),
            "sparse": (losses.BatchTopK(2, 2, 0.25, 0.9, True), ref["mse"] + 0.25 * ref["aux"]),
        }
        for name, (loss, want) in kinds.items():
            run = self.variant(_objective(loss, graph))
            value, aux, new_rest = run(params, rest, jnp.asarray(x), weights, jnp.asarray(dead))
            chex.assert_shape([value, aux["f"], aux["x_hat"]], [(), (5, 8), (5, 2, 4)])
            chex.assert_type([value, aux["f"], aux["x_hat"]], jnp.float32)
            np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=name)
            threshold = new_rest["threshold"][...]
            if name == "l1":  # nothing to learn besides the weights
                np.testing.assert_array_equal(threshold, rest["threshold"][...])
            else:  # the first batch sets the threshold to its cut
                np.testing.assert_allclose(threshold, np.full(8, ref["weighted"][7]), rtol=1e-5)

    def test_boundaries_refuse_what_would_broadcast_silently(self):
        cc = _make_crosscoder()
        x = jax.random.normal(jax.random.key(12), (4, 2, 8))
        with self.assertRaises(AssertionError):  # three models' rows read as six of two
            cc.pre_acts(jnp.ones((4, 3, 8)))
        with self.assertRaises(AssertionError):  # one weight for every row
            l1_loss(cc, x, jnp.ones(1), jnp.asarray(1.0))
        with self.assertRaises(AssertionError):  # dead flags of another crosscoder
            batchtopk_loss(cc, x, jnp.ones(4), 2, jnp.zeros(16, bool), 2, 0.1)
