r"""Training from the on-disk store against training from the same rows held in memory.

Both loops run the same jitted train step on batches from the same shuffled reader; one
reads shards from disk (memory-mapped, checksummed on first read), the other from arrays
already in RAM. Rounds alternate; the ratio disk / memory (target >= 0.9) is measured side
by side in one run.

    python -m bench.train_from_store
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from bench import recorded_settings
from configs import tiny
from xcoder_jax import sharding
from xcoder_jax import train_step as ts
from xcoder_jax.activations import ActivationStore, BatchStream
from xcoder_jax.synthetic import synthetic_store

recorded_settings()


class InMemoryStore(ActivationStore):
    """The same store with every shard loaded into RAM up front."""

    def __init__(self, directory: str):
        super().__init__(directory)
        self._cache = {
            k: np.array(super(InMemoryStore, self).shard_acts(k)) for k in range(len(self.shards))
        }

    def shard_acts(self, k: int) -> np.ndarray:
        return self._cache[k]

    def shard_rows(self, k: int, idx: np.ndarray) -> np.ndarray:
        return self._cache[k][idx]


def run_steps(trainer, state, store, steps, batch, position):
    with BatchStream(store, batch, seed=0, normalise=True, start=position, prefetch=4) as stream:
        for _ in range(steps):
            x, _ = next(stream)
            state, metrics = trainer.step(
                state, *trainer.to_device(x, np.ones(batch, np.float32)), with_metrics=False
            )
        jax.block_until_ready(metrics["loss"])
        return state, stream.position


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--steps", type=int, default=40, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_store_")
    try:
        directory = os.path.join(root, "activations")
        synthetic_store(directory, n_rows=args.rows, d=args.d, n_atoms=256, shard_rows=16384)
        stores = {"disk": ActivationStore(directory), "memory": InMemoryStore(directory)}
        c = tiny.get_config()
        c.crosscoder.d_model, c.crosscoder.n_latents = args.d, args.latents
        c.train.batch_size, c.train.steps = args.batch, 10**6
        disk = stores["disk"]
        hp = ts.HParams.from_config(c, disk.d_model, disk.total_variance * disk.scales**2)
        trainer = sharding.ShardedStep(hp, sharding.make_mesh(1, 1, args.batch, args.latents))
        state = trainer.init()
        position = 0
        state, position = run_steps(
            trainer, state, stores["memory"], 3, args.batch, position
        )  # compile
        times = {k: [] for k in stores}
        for _ in range(args.rounds):
            for name, store in stores.items():
                start = time.perf_counter()
                state, position = run_steps(trainer, state, store, args.steps, args.batch, position)
                times[name].append(time.perf_counter() - start)
        rate = {k: args.steps * args.batch / statistics.median(v) for k, v in times.items()}
        print(f"d={args.d}, {args.latents} latents, batch {args.batch}, store {args.rows} rows")
        for k, v in rate.items():
            print(f"{k:>7}: {v:10.0f} rows/s")
        print(f"ratio disk / memory: {rate['disk'] / rate['memory']:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
