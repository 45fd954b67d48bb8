"""The train state, its sharding over the mesh, and the one pure jitted train step.

State is a plain dict pytree (Orbax saves it as is):
    step            int32 []
    params          nnx.State of the crosscoder's Params (fp32 master weights)
    rest            nnx.State of its other variables (the BatchTopK threshold)
    opt_state       Optax state
    since_fired     int32 [n_latents]: valid tokens since each latent last fired (capped)
    first_bad_step  int32 []: first step with a non-finite loss, -1 if none
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from xcoder_jax import checkpoint as ckpt
from xcoder_jax.crosscoder import Crosscoder, batchtopk_loss, l1_loss, update_threshold
from xcoder_jax.errors import ConfigError

# Fields that must not change when a run resumes from its checkpoints.
RESUME_FIELDS = (
    "seed",
    "crosscoder",
    "train.batch_size",
    "train.steps",
    "train.lr",
    "train.beta1",
    "train.beta2",
    "train.clip_norm",
    "train.decay_start_frac",
)


def config_fields(config) -> dict:
    """The resume-relevant fields of `config`, flattened to {"a.b": value}."""
    out = {}
    for name in RESUME_FIELDS:
        value = config
        for part in name.split("."):
            value = value[part]
        if hasattr(value, "to_dict"):
            out.update({f"{name}.{k}": v for k, v in sorted(value.to_dict().items())})
        else:
            out[name] = value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    keys = set(saved) | set(current)
    return sorted(
        f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
        for k in keys
        if saved.get(k) != current.get(k)
    )


def make_schedule(lr: float, steps: int, decay_start_frac: float) -> optax.Schedule:
    """Learning rate at a 0-based step: constant `lr` for the first
    `int(steps * decay_start_frac)` steps, then linear decay reaching 0 at step `steps`."""
    boundary = int(steps * decay_start_frac)
    return optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(1, steps - boundary))],
        [boundary],
    )


def l1_lambda(step, l1_coeff: float, warmup_frac: float, steps: int) -> jax.Array:
    """The L1 coefficient at a 0-based step: linear from 0 at step 0 to `l1_coeff` at step
    `warmup_frac * steps` (at least 1), constant after. Returns float32 []."""
    warmup = max(1.0, warmup_frac * steps)
    return l1_coeff * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)


def _spec(path, leaf) -> P:
    """Latent axis on 'model'; everything else replicated. Works for params and Adam moments."""
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    if np.ndim(leaf) == 0:
        return P()
    if "W_enc" in names:
        return P(None, None, "model")
    if "W_dec" in names:
        return P("model", None, None)
    if names & {"b_enc", "threshold", "since_fired"}:
        return P("model")
    return P()


class Trainer:
    """Builds the mesh, the abstract state and its shardings, and the jitted step."""

    def __init__(self, config, store):
        self.config, self.store = config, store
        cc, tc = config.crosscoder, config.train
        self.kind = cc.loss
        if self.kind not in ("l1", "batchtopk"):
            raise ConfigError(f"unknown crosscoder.loss {self.kind!r} (l1, batchtopk)")
        n_dev = jax.device_count()
        model_axis = config.mesh.model
        data_axis = config.mesh.data if config.mesh.data > 0 else n_dev // model_axis
        if data_axis * model_axis != n_dev:
            raise ConfigError(f"mesh {data_axis}x{model_axis} does not match {n_dev} devices")
        if tc.batch_size % data_axis or cc.n_latents % model_axis:
            raise ConfigError("batch_size must divide over 'data' and n_latents over 'model'")
        # Auto axes: shardings are constraints for the compiler (GSPMD), not part of the types.
        self.mesh = jax.make_mesh(
            (data_axis, model_axis), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto)
        )
        self.batch_sharding = NamedSharding(self.mesh, P("data", None, None))
        self.weight_sharding = NamedSharding(self.mesh, P("data"))
        self.scales = store.scales
        # FVE denominators in normalised units: E||x - mean||^2 * s^2, per model.
        self.total_var = jnp.asarray(store.total_variance * store.scales**2)
        dtype = {"float32": None, "bfloat16": jnp.bfloat16}[cc.dtype]
        # The module's structure only: built abstractly, no weights are allocated.
        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: self._model(0, dtype)))
        self.schedule = make_schedule(tc.lr, tc.steps, tc.decay_start_frac)
        self.tx = optax.chain(
            optax.clip_by_global_norm(tc.clip_norm),
            optax.adam(self.schedule, b1=tc.beta1, b2=tc.beta2),
        )
        self._abstract = jax.eval_shape(self._init)
        self.state_sharding = jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(self.mesh, _spec(p, x)), self._abstract
        )
        self._init_jit = jax.jit(self._init, out_shardings=self.state_sharding)
        # Two compilations of one step: with every metric (for the steps that log) and with
        # the loss alone (the rest, about 10% faster on a CPU; the state is updated the same).
        self._step_jit = {
            with_metrics: jax.jit(
                functools.partial(self._step, with_metrics=with_metrics),
                in_shardings=(self.state_sharding, self.batch_sharding, self.weight_sharding),
                out_shardings=(self.state_sharding, None),
                donate_argnums=0,
            )
            for with_metrics in (True, False)
        }
        self._eval_jit = jax.jit(self._eval_batch)

    def _model(self, seed: int, dtype=None) -> Crosscoder:
        cc = self.config.crosscoder
        return Crosscoder(
            cc.n_models,
            self.store.d_model,
            cc.n_latents,
            rngs=nnx.Rngs(seed),
            dec_init_norm=cc.dec_init_norm,
            dtype=dtype,
        )

    def _init(self) -> dict:
        model = self._model(self.config.seed)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,
            "opt_state": self.tx.init(params),
            "since_fired": jnp.zeros((self.config.crosscoder.n_latents,), jnp.int32),
            "first_bad_step": jnp.full((), -1, jnp.int32),
        }

    def init_state(self) -> dict:
        return self._init_jit()

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state (the target of a checkpoint restore)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self._abstract,
            self.state_sharding,
        )

    def to_device(self, batch: np.ndarray, weights: np.ndarray):
        """Host rows [local_batch, m, d] -> a global array sharded over 'data'."""
        return (
            jax.make_array_from_process_local_data(self.batch_sharding, batch),
            jax.make_array_from_process_local_data(self.weight_sharding, weights),
        )

    def step(self, state, batch, weights, with_metrics: bool = True):
        """One training step: (new state, metrics). The input state is donated (consumed).
        Without `with_metrics` the metrics hold only the loss."""
        return self._step_jit[with_metrics](state, batch, weights)

    # --- The pure step -------------------------------------------------------------------
    def _loss(self, params, rest, x, weights, step, since_fired):
        cc, tc = self.config.crosscoder, self.config.train
        model = nnx.merge(self.graphdef, params, rest)
        if self.kind == "l1":
            lam = l1_lambda(step, cc.l1_coeff, cc.l1_warmup_frac, tc.steps)
            loss, aux = l1_loss(model, x, weights, lam)
        else:
            lam = jnp.zeros(())
            dead = since_fired >= cc.dead_window_tokens
            loss, aux = batchtopk_loss(model, x, weights, cc.k, dead, cc.aux_k, cc.aux_coeff)
        return loss, {**aux, "lam": lam}

    def _step(self, state, x, weights, with_metrics: bool):
        step = state["step"]
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        (loss, aux), grads = grad_fn(
            state["params"], state["rest"], x, weights, step, state["since_fired"]
        )
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rest = state["rest"]
        if self.kind == "batchtopk":
            new = update_threshold(
                rest["threshold"][...],
                aux["batch_threshold"],
                self.config.crosscoder.threshold_ema,
            )
            rest = jax.tree.map(lambda v: v, rest)
            rest["threshold"] = rest["threshold"].replace(new)
        valid = weights.sum().astype(jnp.int32)
        fired = ((aux["f"] > 0) & (weights[:, None] > 0)).any(0)
        cap = self.config.crosscoder.dead_window_tokens
        since = jnp.where(fired, 0, jnp.minimum(state["since_fired"] + valid, cap))
        finite = jnp.isfinite(loss)
        bad = jnp.where((state["first_bad_step"] < 0) & ~finite, step + 1, state["first_bad_step"])
        new_state = {
            "step": step + 1,
            "params": params,
            "rest": rest,
            "opt_state": opt_state,
            "since_fired": since,
            "first_bad_step": bad,
        }
        if not with_metrics:
            return new_state, {"loss": loss}
        metrics = {
            "loss": loss,
            "mse": aux["mse"],
            "sparsity": aux["sparsity"],
            "aux_loss": aux["aux"],
            "lambda": aux["lam"],
            "lr": self.schedule(step),
            "fve": self._fve(x, aux["x_hat"], weights),
            "l0": ((aux["f"] > 0).sum(-1) * weights).sum() / jnp.maximum(weights.sum(), 1.0),
            "dead_fraction": (since >= cap).mean(),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        return new_state, metrics

    def _fve(self, x, x_hat, weights):
        """Fraction of variance explained per model [n_models], about the store mean."""
        err = (jnp.square(x - x_hat).sum(-1) * weights[:, None]).sum(0)
        return 1.0 - err / (jnp.maximum(weights.sum(), 1.0) * self.total_var)

    # --- Evaluation and export -----------------------------------------------------------
    def _eval_batch(self, state, x):
        model = nnx.merge(self.graphdef, state["params"], state["rest"])
        f = model.encode(x, self.kind)
        x_hat = model.decode(f)
        return jnp.square(x - x_hat).sum((0, 2)), (f > 0).sum(), (f > 0).any(0)

    def evaluate(self, state, shards: list[int]) -> dict:
        """FVE per model, L0 and dead fraction of the inference encoder on held-out shards."""
        err = np.zeros(self.store.n_models)
        active = 0
        fired = np.zeros(self.config.crosscoder.n_latents, bool)
        rows = 0
        for _, acts in self.store.iter_shards(shards):
            x = np.asarray(acts, np.float32) * self.scales[None, :, None]
            for i in range(0, len(x), self.config.train.batch_size):
                e, a, fd = jax.device_get(
                    self._eval_jit(state, x[i : i + self.config.train.batch_size])
                )
                err += e
                active += int(a)
                fired |= fd
            rows += len(x)
        fve = 1.0 - err / (rows * np.asarray(self.total_var))
        return {
            "fve": fve.tolist(),
            "l0": active / rows,
            "dead_fraction": float(1 - fired.mean()),
            "rows": rows,
        }

    def export(self, state, directory: str, meta: dict) -> None:
        model = nnx.merge(
            self.graphdef, jax.device_get(state["params"]), jax.device_get(state["rest"])
        )
        weights = {
            n: np.asarray(getattr(model, n)[...]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        if self.kind == "batchtopk":
            norms = np.asarray(model.decoder_norms().sum(-1))
            weights["threshold"] = np.asarray(model.threshold[...]) / np.maximum(norms, 1e-12)
        m = self.store.manifest
        ckpt.export(
            directory,
            weights,
            self.scales,
            {
                "models": m["models"],
                "layer": m["layer"],
                "d_model": m["d_model"],
                "n_models": m["n_models"],
                "n_latents": self.config.crosscoder.n_latents,
                "loss": self.kind,
                "tokenizer_sha256": m["tokenizer_sha256"],
                "store_rows": self.store.n_rows,
                "steps": self.config.train.steps,
                **meta,
            },
        )
