"""Which L1 step training runs, dense or sparse, chosen per step from the last logged L0.

`crosscoder.l1_path`:

    "dense"     the dense step throughout (and any loss other than L1: its own step)
    "sparse"    the sparse step throughout, at the capacity of the last logged L0
    "auto"      the sparse step while the last logged L0 / n_latents is below
                `l1_sparse.SPARSE_MAX_DENSITY`, else the dense one

Both paths compute the same loss, gradients and Adam update to float tolerance on the same
state pytree (`tests/test_sparse_l1.py`), so a switch mid-run changes only the speed, and a
checkpoint does not depend on the path. The L0 is the logged metric (every
`train.log_every` steps), replicated: every process sees the same value and chooses alike.
Before the first logged L0 of a run or of a resume, "auto" runs dense and "sparse" at
`l1_sparse.max_capacity` (the L0 of a fresh crosscoder is about half the latents).

Capacities are buckets 1.19x apart (`l1_sparse.capacity_for`); a step keeps its capacity
while it is at least the bucket of the logged L0 and at most SHRINK x it, so a new step is
compiled only when the L0 has moved by a bucket up or by SHRINK down, and for at most
MAX_CAPACITIES capacities a run. Each (path, capacity) is compiled once, on first use.
"""

from __future__ import annotations

import dataclasses

from xcoder_jax.losses import l1, l1_sparse
from xcoder_jax.sharding import ShardedStep

MAX_CAPACITIES = 6
# A capacity over SHRINK x the L0's bucket gives way to it: two buckets of room at most
# (padded slots cost as much as pairs), and an L0 that wavers across one bucket's edge
# keeps its step.
SHRINK = 1.5


def next_capacity(current: int, l0: float, batch: int, n_latents: int, used=()) -> int:
    """The capacity after a logged L0: `current` (0: none) while it is at least the bucket
    of l0 and at most SHRINK x it, else that bucket. Once `used` holds MAX_CAPACITIES, a
    new bucket is replaced by the smallest used one above it, else the largest used one
    (the batches that overflow it then run dense, exactly)."""
    want = l1_sparse.capacity_for(l0, batch, n_latents)
    if want <= current <= SHRINK * want:
        return current
    used = sorted(set(used))
    if want in used or len(used) < MAX_CAPACITIES:
        return want
    return next((c for c in used if c >= want), used[-1])


def next_loss(path: str, loss: l1.L1, l0: float, batch: int, n_latents: int, used=()) -> l1.L1:
    """The L1 loss object of the next steps after a logged L0 (see the module docstring)."""
    if path == "dense" or (path == "auto" and l0 >= l1_sparse.SPARSE_MAX_DENSITY * n_latents):
        return dataclasses.replace(loss, sparse=False, capacity=0)
    current = loss.capacity if loss.sparse else 0
    capacity = next_capacity(current, l0, batch, n_latents, used)
    return dataclasses.replace(loss, sparse=True, capacity=capacity)


class Paths:
    """The train step of the current path: `step` runs it, `observe` takes each logged L0.

    trainer: the run's ShardedStep (its loss from `crosscoder.l1_path`); the other paths'
    steps share its mesh and state layout."""

    def __init__(self, trainer: ShardedStep, config):
        hp = trainer.hp
        l1_run = hp.loss.name == l1.NAME
        self.path = config.crosscoder.get("l1_path", "dense") if l1_run else "dense"
        self.batch, self.n_latents = config.train.batch_size, hp.n_latents
        self.loss = hp.loss
        self._trainers = {hp.loss: trainer}

    def trainer(self) -> ShardedStep:
        """The compiled steps of the current loss object (built on first use)."""
        if self.loss not in self._trainers:
            first = next(iter(self._trainers.values()))
            hp = dataclasses.replace(first.hp, loss=self.loss)
            self._trainers[self.loss] = ShardedStep(hp, first.mesh)
        return self._trainers[self.loss]

    def step(self, state, batch, weights, with_metrics: bool = True):
        """One training step on the current path: (new state, metrics); `state` is donated."""
        return self.trainer().step(state, batch, weights, with_metrics)

    def observe(self, l0: float) -> None:
        """Takes a logged L0 (mean active latents per valid row): the next steps' path."""
        if self.path == "dense":
            return
        used = [loss.capacity for loss in self._trainers if loss.sparse]
        self.loss = next_loss(self.path, self.loss, l0, self.batch, self.n_latents, used)
