"""The pure train step: built from hyperparameters alone, laid out from variable metadata."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.conftest import train_config
from xcoder_jax import losses, sharding
from xcoder_jax import train_step as ts
from xcoder_jax.errors import ConfigError
from xcoder_jax.losses.l1 import l1_loss


def _hp(kind="l1", **over) -> ts.HParams:
    c = train_config()
    c.crosscoder.loss, c.crosscoder.k = kind, 4
    hp = ts.HParams.from_config(c, d_model=8, total_var=[2.0, 3.0])
    return ts.HParams(**{**hp.__dict__, **over})


def test_state_layout_comes_from_variable_metadata():
    specs = sharding.state_specs(jax.eval_shape(lambda: ts.init_state(_hp("batchtopk"))))
    params = specs["params"]
    assert params["W_enc"].get_value() == P(None, None, "model")
    assert params["W_dec"].get_value() == P("model", None, None)
    assert params["b_enc"].get_value() == P("model") and params["b_dec"].get_value() == P(
        None, None
    )
    assert specs["rest"]["threshold"].get_value() == P("model")
    adam = specs["opt_state"][1][0]
    for moment in (adam.mu, adam.nu):
        assert moment["W_enc"].get_value() == P(None, None, "model")
        assert moment["W_dec"].get_value() == P("model", None, None)
    assert adam.count == P()
    assert specs["since_fired"] == P("model") and specs["step"] == P()


def test_step_is_adam_on_the_losss_gradient():
    """One step from the state equals Optax applied by hand to the gradient of `l1_loss`."""
    hp = _hp("l1")
    state = ts.init_state(hp)
    x = jax.random.normal(jax.random.key(1), (16, 2, 8))
    weights = jnp.ones(16).at[3].set(0.0)
    new, metrics = ts.train_step(state, x, weights, hp=hp)

    lam = losses.l1_lambda(0, hp.loss.l1_coeff, hp.loss.warmup_frac, hp.steps)
    graph = ts.graphdef(hp)

    def loss_of(params):
        return l1_loss(nnx.merge(graph, params, state["rest"]), x, weights, lam)[0]

    loss, grads = jax.value_and_grad(loss_of)(state["params"])
    tx = ts.optimizer(hp)
    updates, _ = tx.update(grads, tx.init(state["params"]), state["params"])
    expected = optax.apply_updates(state["params"], updates)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    assert int(new["step"]) == 1 and int(new["first_bad_step"]) == -1
    # Metrics use the explicit FVE denominators: 1 - err / (rows * total_var).
    model = nnx.merge(graph, state["params"], state["rest"])
    err = (jnp.square(x - model(x)).sum(-1) * weights[:, None]).sum(0)
    np.testing.assert_allclose(
        np.asarray(metrics["fve"]), 1 - np.asarray(err) / (15 * np.array([2.0, 3.0])), rtol=1e-5
    )


def test_hparams_are_static_and_the_state_carries_everything_else():
    hp = _hp("batchtopk")
    assert hash(hp) == hash(_hp("batchtopk"))  # usable as a static jit argument
    step = jax.jit(lambda s, x, w: ts.train_step(s, x, w, hp=hp, with_metrics=False))
    x = jax.random.normal(jax.random.key(2), (16, 2, 8))
    a, _ = step(ts.init_state(hp), x, jnp.ones(16))
    b, _ = step(ts.init_state(hp), x, jnp.ones(16))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert float(a["rest"]["threshold"][...].max()) > 0  # the loss object updated it
    exported = ts.export_weights(a, hp)
    assert set(exported) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}


def test_unknown_loss_is_a_config_error():
    c = train_config()
    c.crosscoder.loss = "topk"
    kinds = ", ".join(losses.MODULES)
    with pytest.raises(ConfigError, match=rf"unknown crosscoder.loss 'topk' \({kinds}\)"):
        losses.from_config(c)


def test_mesh_that_does_not_fit_is_a_config_error():
    n = jax.device_count()
    with pytest.raises(ConfigError, match=f"mesh {2 * n}x1 does not match {n} devices"):
        sharding.make_mesh(2 * n, 1, 64, 32)


def test_decoder_bias_can_start_at_a_given_mean():
    hp = _hp("batchtopk")
    mean = np.arange(16, dtype=np.float32).reshape(2, 8) / 10
    state = ts.init_state(hp, b_dec=mean)
    np.testing.assert_array_equal(np.asarray(state["params"]["b_dec"][...]), mean)
    fresh = ts.init_state(hp)
    np.testing.assert_array_equal(np.asarray(fresh["params"]["b_dec"][...]), np.zeros((2, 8)))
    # Only b_dec moves: the rest of the initialisation is the seed's.
    np.testing.assert_array_equal(
        np.asarray(state["params"]["W_dec"][...]), np.asarray(fresh["params"]["W_dec"][...])
    )


class StepWithAndWithoutJit(chex.TestCase):
    """The pure step traced by jit and run op by op: the loss it reports is its loss kind's,
    and the state it returns has the layout of the one it took (donation needs it)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_keeps_the_state_layout(self):
        hp = _hp("l1")
        state = ts.init_state(hp)
        x = jax.random.normal(jax.random.key(3), (16, 2, 8))
        weights = jnp.ones(16).at[0].set(0.0)
        new, metrics = self.variant(functools.partial(ts.train_step, hp=hp))(state, x, weights)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
        chex.assert_shape([metrics["loss"], metrics["fve"]], [(), (2,)])
        chex.assert_tree_all_finite(metrics)
        want, _ = hp.loss(ts.merge(hp, state), x, weights, 0, jnp.zeros(hp.n_latents, bool))
        np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)
        assert int(new["step"]) == 1

    def test_step_refuses_a_batch_of_another_shape(self):
        hp = _hp("l1")
        state = ts.init_state(hp)
        with self.assertRaises(AssertionError):  # d_model 4, the crosscoder's is 8
            ts.train_step(state, jnp.ones((16, 2, 4)), jnp.ones(16), hp=hp)
        with self.assertRaises(AssertionError):  # one weight per row
            ts.train_step(state, jnp.ones((16, 2, 8)), jnp.ones(8), hp=hp)


def test_bfloat16_first_moment_is_stored_as_such_and_tracks_exact_adam():
    """train.mu_dtype = "bfloat16": Adam's first moment is bfloat16, its second float32,
    and ten steps stay within bfloat16 rounding of exact Adam (but are not identical)."""
    exact, half = _hp("l1"), _hp("l1", mu_dtype="bfloat16")
    x = jax.random.normal(jax.random.key(2), (16, 2, 8))
    weights = jnp.ones(16)
    states = {}
    for hp in (exact, half):
        state = ts.init_state(hp)
        for _ in range(10):
            state, _ = ts.train_step(state, x, weights, hp=hp, with_metrics=False)
        states[hp.mu_dtype] = state
    adam = states["bfloat16"]["opt_state"][1][0]
    assert {leaf.dtype for leaf in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    flat = lambda state: np.concatenate([np.ravel(v) for v in jax.tree.leaves(state["params"])])
    a, b = flat(states["float32"]), flat(states["bfloat16"])
    moved = np.abs(a - flat(ts.init_state(exact)))
    # bfloat16's 8-bit mantissa bounds the moment's relative error per step, so the two
    # trajectories differ by a small share of the distance moved (1.8% measured), as a whole:
    # a weight whose moment is near 0 may move differently.
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(moved)
    assert np.abs(a - b).max() > 0
    with pytest.raises(ConfigError, match="train.mu_dtype"):
        from xcoder_jax import config_check

        c = train_config()
        c.train.mu_dtype = "float16"
        config_check.check(c)
