"""The train step placed on a ('data', 'model') device mesh.

Rows of a batch are split over "data"; the latent axis of every weight, of Adam's moments
and of the per-latent counters over "model". The layouts of the crosscoder's variables come
from their own partition metadata (`crosscoder.LATENT_AXIS`), which Optax's moments inherit;
the state's other fields are laid out by `STATE_LAYOUT`.
"""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from xcoder_jax import train_step as ts
from xcoder_jax.crosscoder import DATA_AXIS, LATENT_AXIS
from xcoder_jax.errors import ConfigError

# The train state's fields that are not module variables (see `train_step`).
STATE_LAYOUT = {"step": P(), "since_fired": P(LATENT_AXIS), "first_bad_step": P()}


def make_mesh(
    data: int, model: int, batch_size: int, n_latents: int, model_across_processes: bool = False
) -> jax.sharding.Mesh:
    """A (data x model) mesh over every device; `data` <= 0 takes the devices `model`
    leaves. ConfigError when the axes do not fit the devices, the batch or the latents.

    By default neighbouring devices (those of one process first) share the latent axis and
    processes split the batch, the cheap way round: only gradients cross hosts. With
    `model_across_processes` the latent axis spans processes instead (each host holds a
    share of the latents of a crosscoder too large for one), and every process reads all
    rows of each batch.
    """
    n_dev = jax.device_count()
    data = data if data > 0 else n_dev // model
    if data * model != n_dev:
        raise ConfigError(f"mesh {data}x{model} does not match {n_dev} devices")
    if batch_size % data or n_latents % model:
        raise ConfigError("batch_size must divide over 'data' and n_latents over 'model'")
    # Auto axes: shardings are constraints for the compiler (GSPMD), not part of the types.
    axis_types = (AxisType.Auto, AxisType.Auto)
    if not model_across_processes:
        return jax.make_mesh((data, model), (DATA_AXIS, LATENT_AXIS), axis_types=axis_types)
    # Each process's devices together, laid out model-major: the processes follow one
    # another along 'model'.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = np.array(devices).reshape(model, data).T
    return jax.sharding.Mesh(devices, (DATA_AXIS, LATENT_AXIS), axis_types=axis_types)


def state_specs(abstract: dict) -> dict:
    """PartitionSpecs of a train state (same tree), from variable metadata and STATE_LAYOUT."""
    specs = {k: nnx.get_partition_spec(abstract[k]) for k in ("params", "rest", "opt_state")}
    # Variable-free leaves (Adam's step count) are replicated.
    specs["opt_state"] = jax.tree.map(lambda s: s if isinstance(s, P) else P(), specs["opt_state"])
    missing = set(abstract) - set(specs) - set(STATE_LAYOUT)
    if missing:
        raise KeyError(f"no layout for train state fields {sorted(missing)}")
    return {**specs, **{k: STATE_LAYOUT[k] for k in abstract if k in STATE_LAYOUT}}


class ShardedStep:
    """`train_step` functions compiled for one mesh: init, the step (with and without
    metrics, the input state donated), evaluation, and host-to-device transfer."""

    def __init__(self, hp: ts.HParams, mesh: jax.sharding.Mesh):
        self.hp, self.mesh = hp, mesh
        self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS, None, None))
        self.weight_sharding = NamedSharding(mesh, P(DATA_AXIS))
        init = functools.partial(ts.init_state, hp)
        self._abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((hp.n_models, hp.d_model), "f4"))
        self.state_sharding = jax.tree.map(
            lambda s: NamedSharding(mesh, s),
            state_specs(self._abstract),
            is_leaf=lambda x: isinstance(x, P),
        )
        self.replicated = NamedSharding(mesh, P())
        self._init = jax.jit(init, out_shardings=self.state_sharding)
        # Two compilations of one step: with every metric (for the steps that log) and with
        # the loss alone (the rest, about 10% faster on a CPU; the state is updated the same).
        self._step = {
            with_metrics: jax.jit(
                functools.partial(ts.train_step, hp=hp, with_metrics=with_metrics),
                in_shardings=(self.state_sharding, self.batch_sharding, self.weight_sharding),
                # Metrics replicated: every process can read them.
                out_shardings=(self.state_sharding, self.replicated),
                donate_argnums=0,
            )
            for with_metrics in (True, False)
        }
        self.eval_batch = jax.jit(
            functools.partial(ts.eval_batch, hp=hp), out_shardings=self.replicated
        )
        self._gather = jax.jit(lambda x: x, out_shardings=self.replicated)

    def init(self, b_dec=None) -> dict:
        """A fresh state; b_dec [n_models, d_model] normalised (default 0)."""
        if b_dec is None:
            b_dec = np.zeros((self.hp.n_models, self.hp.d_model), np.float32)
        b_dec = np.asarray(b_dec, np.float32)
        chex.assert_shape(b_dec, (self.hp.n_models, self.hp.d_model))
        return self._init(b_dec)

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state (the target of a checkpoint restore)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self._abstract,
            self.state_sharding,
        )

    def local_rows(self, batch_size: int) -> slice:
        """The positions of a global batch held by this process's devices (all of them in
        one process; a contiguous block, or all of them when 'model' spans processes)."""
        shape = (batch_size, self.hp.n_models, self.hp.d_model)
        spans = {
            idx[0].indices(batch_size)[:2]
            for idx in self.batch_sharding.addressable_devices_indices_map(shape).values()
        }
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != hi - lo:
            raise ConfigError(f"this process's rows of the batch are not contiguous: {spans}")
        return slice(lo, hi)

    def to_device(self, batch: np.ndarray, weights: np.ndarray, batch_size: int | None = None):
        """Host rows [local_rows, m, d] and weights [local_rows] -> global arrays
        [batch_size, m, d] and [batch_size] sharded over 'data': each process passes the
        rows at its `local_rows(batch_size)` (all rows in one process, the default)."""
        chex.assert_shape(batch, (None, self.hp.n_models, self.hp.d_model))
        chex.assert_shape(weights, (len(batch),))
        chex.assert_type([batch, weights], float)
        n = len(batch) if batch_size is None else batch_size
        return (
            jax.make_array_from_process_local_data(
                self.batch_sharding, batch, (n, *batch.shape[1:])
            ),
            jax.make_array_from_process_local_data(self.weight_sharding, weights, (n,)),
        )

    def replicate(self, x):
        """A global array as a copy on every device (every process can read it whole)."""
        return self._gather(x)

    def lowered(self, state, batch, weights, with_metrics: bool = True):
        """The step lowered for these arguments (`.compile().as_text()`: its HLO)."""
        return self._step[with_metrics].lower(state, batch, weights)

    def step(self, state, batch, weights, with_metrics: bool = True):
        """One training step: (new state, metrics). The input state is donated (consumed)."""
        return self._step[with_metrics](state, batch, weights)

    def evaluate(self, state, batches) -> dict:
        """Held-out metrics; every process evaluates the same `batches` (numpy, normalised)."""
        on_mesh = (
            jax.make_array_from_process_local_data(self.replicated, np.asarray(x)) for x in batches
        )
        return ts.evaluate(state, on_mesh, hp=self.hp, eval_fn=self.eval_batch)
