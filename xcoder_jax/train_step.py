"""The train state and the pure functions over it: init, one step, evaluation, export.

Every function takes its hyperparameters explicitly (`HParams`, frozen and hashable, so a
jitted step takes it as a static argument); nothing reads a config or a store. State is a
plain dict pytree (Orbax saves it as is):

    step            int32 []
    params          nnx.State of the crosscoder's Params (fp32 master weights)
    rest            nnx.State of its other variables (the BatchTopK threshold)
    opt_state       Optax state
    since_fired     int32 [n_latents]: valid tokens since each latent last fired (capped)
    first_bad_step  int32 []: first step with a non-finite loss, -1 if none

Batches are [batch, n_models, d_model] in NORMALISED units; weights [batch] are 0/1.
`sharding.ShardedStep` places these functions on a device mesh. With `HParams.center` the
crosscoder sees every batch minus the store mean (centred normalised units): the step and
evaluation subtract it, and `export_weights` folds it into the biases.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xcoder_jax import exclusive as excl
from xcoder_jax import losses
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class HParams:
    """What the step computes with. total_var: the FVE denominators per model,
    E||x - mean||^2 in normalised units. center: () or the store mean subtracted from every
    batch, [n_models * d_model] flattened, normalised units (`crosscoder.center`).
    exclusive: (n_base_only, n_distilled_only) dedicated latents (`xcoder_jax.exclusive`)."""

    n_models: int
    d_model: int
    n_latents: int
    loss: losses.L1 | losses.BatchTopK | losses.Matryoshka
    seed: int
    dec_init_norm: float
    dtype: str
    lr: float
    steps: int
    decay_start_frac: float
    beta1: float
    beta2: float
    clip_norm: float
    dead_window_tokens: int
    total_var: tuple[float, ...]
    center: tuple[float, ...] = ()
    exclusive: tuple[int, int] = (0, 0)
    mu_dtype: str = "float32"  # Adam's first moment (`train.mu_dtype`)

    @classmethod
    def from_config(cls, config, d_model: int, total_var, mean=None) -> HParams:
        """From an ml_collections config; `d_model`, `total_var` [n_models] and, with
        `crosscoder.center`, `mean` [n_models, d_model] (normalised units) from the data."""
        cc, tc = config.crosscoder, config.train
        center = ()
        if cc.get("center", False):
            if mean is None:
                raise ConfigError("crosscoder.center needs the store mean")
            mean = np.asarray(mean, np.float32)
            chex.assert_shape(mean, (cc.n_models, int(d_model)))
            center = tuple(float(v) for v in mean.reshape(-1))
        return cls(
            n_models=cc.n_models,
            d_model=int(d_model),
            n_latents=cc.n_latents,
            loss=losses.from_config(config),
            seed=config.seed,
            dec_init_norm=losses.dec_init_norm(config),  # each loss kind has its own
            dtype=cc.dtype,
            lr=tc.lr,
            steps=tc.steps,
            decay_start_frac=tc.decay_start_frac,
            beta1=tc.beta1,
            beta2=tc.beta2,
            clip_norm=tc.clip_norm,
            mu_dtype=tc.mu_dtype,
            dead_window_tokens=cc.dead_window_tokens,
            total_var=tuple(float(v) for v in _per_model(total_var, cc.n_models)),
            center=center,
            exclusive=excl.from_crosscoder(cc),
        )


def _per_model(total_var, n_models: int) -> np.ndarray:
    """The FVE denominators on the host, one per model: [n_models]."""
    total_var = np.asarray(total_var).reshape(-1)
    chex.assert_shape(total_var, (n_models,))
    return total_var


def make_schedule(lr: float, steps: int, decay_start_frac: float) -> optax.Schedule:
    """Learning rate at a 0-based step: constant `lr` for the first
    `int(steps * decay_start_frac)` steps, then linear decay reaching 0 at step `steps`."""
    boundary = int(steps * decay_start_frac)
    return optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(1, steps - boundary))],
        [boundary],
    )


def optimizer(hp: HParams) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam on the schedule; its first moment in `hp.mu_dtype`
    (bfloat16 halves that moment's memory; the second moment stays float32)."""
    schedule = make_schedule(hp.lr, hp.steps, hp.decay_start_frac)
    mu_dtype = COMPUTE_DTYPES[hp.mu_dtype]
    adam = optax.adam(schedule, b1=hp.beta1, b2=hp.beta2, mu_dtype=mu_dtype)
    return optax.chain(optax.clip_by_global_norm(hp.clip_norm), adam)


def _model(hp: HParams, seed: int) -> Crosscoder:
    return Crosscoder(
        hp.n_models,
        hp.d_model,
        hp.n_latents,
        rngs=nnx.Rngs(seed),
        dec_init_norm=hp.dec_init_norm,
        dtype=COMPUTE_DTYPES[hp.dtype],
        exclusive=hp.exclusive,
    )


@functools.lru_cache(maxsize=16)
def graphdef(hp: HParams) -> nnx.GraphDef:
    """The module's structure only: built abstractly, no weights are allocated."""
    return nnx.graphdef(nnx.eval_shape(lambda: _model(hp, 0)))


def merge(hp: HParams, state: dict) -> Crosscoder:
    """The crosscoder module holding the state's weights (normalised units)."""
    return nnx.merge(graphdef(hp), state["params"], state["rest"])


def centred(hp: HParams, x) -> jax.Array:
    """x [b, m, d] (normalised) as the crosscoder sees it: minus the store mean with
    `hp.center`, else as it is."""
    if not hp.center:
        return x
    return x - jnp.asarray(hp.center, jnp.float32).reshape(hp.n_models, hp.d_model)


def init_state(hp: HParams, b_dec=None) -> dict:
    """A fresh state: the module initialised from `hp.seed`, Adam's moments at zero.
    b_dec: [n_models, d_model] normalised start of the decoder bias, in the crosscoder's
    frame (centred with `hp.center`; default 0)."""
    _, params, rest = nnx.split(_model(hp, hp.seed), nnx.Param, ...)
    if b_dec is not None:
        params["b_dec"] = params["b_dec"].replace(jnp.asarray(b_dec, jnp.float32))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": optimizer(hp).init(params),
        "since_fired": jnp.zeros((hp.n_latents,), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),
    }


def _fve(x, x_hat, weights, total_var) -> jax.Array:
    """Fraction of variance explained per model [n_models], about the store mean."""
    err = (jnp.square(x - x_hat).sum(-1) * weights[:, None]).sum(0)
    return 1.0 - err / (jnp.maximum(weights.sum(), 1.0) * jnp.asarray(total_var))


def _check_batch(hp: HParams, batch, weights) -> None:
    """batch [b, n_models, d_model] and weights [b] floating."""
    chex.assert_shape(batch, (None, hp.n_models, hp.d_model))
    chex.assert_shape(weights, (batch.shape[0],))
    chex.assert_type([batch, weights], float)


def train_step(state: dict, batch, weights, *, hp: HParams, with_metrics: bool = True):
    """One optimiser step: (new state, metrics). Without `with_metrics` the metrics hold only
    the loss (the step training runs between logged steps; the state is updated the same)."""
    _check_batch(hp, batch, weights)
    chex.assert_shape(state["since_fired"], (hp.n_latents,))
    chex.assert_type([state["step"], state["since_fired"], state["first_bad_step"]], jnp.int32)
    step = state["step"]
    dead = state["since_fired"] >= hp.dead_window_tokens
    batch = centred(hp, batch)  # the FVE below is the same in either frame

    def objective(params):
        return hp.loss(nnx.merge(graphdef(hp), params, state["rest"]), batch, weights, step, dead)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = optimizer(hp).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    valid = weights.sum().astype(jnp.int32)
    fired = ((aux["f"] > 0) & (weights[:, None] > 0)).any(0)
    cap = hp.dead_window_tokens
    since = jnp.where(fired, 0, jnp.minimum(state["since_fired"] + valid, cap))
    first_bad = state["first_bad_step"]
    bad = jnp.where((first_bad < 0) & ~jnp.isfinite(loss), step + 1, first_bad)
    new_state = {
        "step": step + 1,
        "params": params,
        "rest": hp.loss.update(state["rest"], aux),
        "opt_state": opt_state,
        "since_fired": since,
        "first_bad_step": bad,
    }
    # The state keeps its layout: the step's input is donated to its output.
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    if not with_metrics:
        return new_state, {"loss": loss}
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "sparsity": aux["sparsity"],
        "aux_loss": aux["aux"],
        "lambda": aux["lam"],
        "lr": make_schedule(hp.lr, hp.steps, hp.decay_start_frac)(step),
        "fve": _fve(batch, aux["x_hat"], weights, hp.total_var),
        "l0": ((aux["f"] > 0).sum(-1) * weights).sum() / jnp.maximum(weights.sum(), 1.0),
        "dead_fraction": (since >= cap).mean(),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    if "k" in aux:  # BatchTopK: the step's k (annealed)
        metrics["k"] = aux["k"]
    return new_state, metrics


def eval_batch(state: dict, x, *, hp: HParams):
    """The inference encoder on one batch x [b, m, d] (normalised): (squared error per model
    [m], active (row, latent) pairs [], latents that fired [h] bool)."""
    chex.assert_shape(x, (None, hp.n_models, hp.d_model))
    model = merge(hp, state)
    x = centred(hp, x)
    f = hp.loss.encode(model, x)
    x_hat = model.decode(f)
    return jnp.square(x - x_hat).sum((0, 2)), (f > 0).sum(), (f > 0).any(0)


def evaluate(state: dict, batches: Iterable[np.ndarray], *, hp: HParams, eval_fn=None) -> dict:
    """FVE per model, L0 and dead fraction of the inference encoder over `batches`
    (normalised [b, m, d] each, e.g. the held-out shards). `eval_fn`: a compiled
    `eval_batch` (default: jitted here)."""
    eval_fn = eval_fn or jax.jit(functools.partial(eval_batch, hp=hp))
    err = np.zeros(hp.n_models)
    active, rows = 0, 0
    fired = np.zeros(hp.n_latents, bool)
    for x in batches:
        e, a, fd = jax.device_get(eval_fn(state, x))
        err += e
        active += int(a)
        fired |= fd
        rows += len(x)
    fve = 1.0 - err / (rows * np.asarray(hp.total_var))
    return {
        "fve": fve.tolist(),
        "l0": active / rows,
        "dead_fraction": float(1 - fired.mean()),
        "rows": rows,
    }


def export_weights(state: dict, hp: HParams) -> dict[str, np.ndarray]:
    """The weights on the host in NORMALISED units: W_enc [m, d, h], b_enc [h], W_dec
    [h, m, d], b_dec [m, d], and `threshold` [h] on f (a JumpReLU threshold) for a loss
    that learns one. A centred model's mean mu is folded in, for uncentred inputs:
    b_enc - sum_m mu_m . W_enc[m] and b_dec + mu."""
    model = merge(hp, jax.device_get(state))
    out = {n: np.asarray(getattr(model, n)[...]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    # Through the mask: the dedicated latents' rows are exactly 0 whatever the state holds.
    out["W_enc"], out["W_dec"] = np.asarray(model.enc_weight()), np.asarray(model.dec_weight())
    if hp.center:
        mu = np.asarray(hp.center, np.float64)
        w_enc = out["W_enc"].astype(np.float64).reshape(mu.size, -1)
        out["b_enc"] = (out["b_enc"] - mu @ w_enc).astype(np.float32)
        out["b_dec"] = (out["b_dec"] + mu.reshape(out["b_dec"].shape)).astype(np.float32)
    threshold = hp.loss.threshold_on_f(model)
    if threshold is not None:
        out["threshold"] = np.asarray(threshold)
    return out
