"""Several processes training one crosscoder: starting them, who writes, gathering, faults.

A multi-host run is several copies of the same program (one per host, or per GPU), joined
by `jax.distributed`. They read one workdir on a filesystem they all see. Every process
reads the rows its devices hold (`sharding.ShardedStep.local_rows`), joins every
collective and saves its own shards of the train state; process 0 alone writes
metrics.jsonl, the export and the progress bar.

If a process dies, a collective of the others fails at once (the connection to it is
reset), or the coordinator declares it dead after `heartbeat_seconds` of silence; the others
then stop with `PeerFailure`. Rerunning every process resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from xcoder_jax.errors import ConfigError, XcoderError


class PeerFailure(XcoderError, RuntimeError):
    """Another process of a multi-host run stopped, so this one cannot go on."""

    exit_at_once = True  # a launch script exits without jax.distributed's shutdown


def initialize(config) -> None:
    """Joins the processes of a run (`config.distributed`); no-op otherwise or if joined.

    Empty `coordinator_address` / -1 `num_processes` / -1 `process_id` leave the value to
    JAX's cluster detection (Cloud TPU, SLURM, Open MPI).
    """
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    # CPU devices of different processes exchange data through gloo (GPU and TPU use their
    # own interconnect); without it a CPU run cannot span processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = {k: config[k] for k in ("coordinator_address", "num_processes", "process_id")}
    jax.distributed.initialize(
        **{k: v for k, v in given.items() if v not in ("", -1)},
        heartbeat_timeout_seconds=int(config.get("heartbeat_seconds", 30)),
    )


def is_main() -> bool:
    """Whether this process writes the run's files (metrics, export, progress bars)."""
    return jax.process_index() == 0


def replicated_to_host(tree):
    """Global arrays (sharded over any devices of any processes) -> numpy on every process,
    one full copy of each array per process. Every process must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def sum_over_processes(value: np.ndarray) -> np.ndarray:
    """Elementwise sum of a host array over processes (every process must call it)."""
    if jax.process_count() == 1:
        return np.asarray(value)
    return np.asarray(multihost_utils.process_allgather(np.asarray(value))).sum(0)


@contextlib.contextmanager
def peers_watched(where: str):
    """Turns the runtime error of a collective whose peer has gone into `PeerFailure`."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PeerFailure(
            f"process {jax.process_index()} of {jax.process_count()} stopped {where}: a "
            f"collective failed, most likely because another process of the run died "
            f"({first}). Rerun every process to resume from the last checkpoint."
        ) from e


def process_share(config, shard_index: int, num_shards: int) -> tuple[int, int]:
    """(index, count) of this process's share of the documents in a split extraction.

    `--shard_index/--num_shards` when given (num_shards > 1); else the training launch
    line's `config.process_id` / `config.num_processes`, so that extraction and training
    start the same way; else (0, 1).
    """
    if num_shards > 1:
        return shard_index, num_shards
    n, i = config.get("num_processes", -1), config.get("process_id", -1)
    if n > 1:
        if not 0 <= i < n:
            raise ConfigError(f"config.process_id must be in [0, {n}), got {i}")
        return i, n
    return shard_index, num_shards
