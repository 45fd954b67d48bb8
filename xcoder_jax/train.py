"""Crosscoder training: `train_and_evaluate(config, workdir)`, read top to bottom.

Reads the workdir's activation store in normalised units, trains with Optax (Adam, the
paper's constant-then-linear-decay schedule, global-norm clipping) in one pure jitted step
with donated state, sharded over a ('data', 'model') mesh, checkpoints with Orbax and resumes
by default, logs health metrics to metrics.jsonl, and exports the portable raw-unit file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import chex
import jax
import numpy as np
from tqdm.auto import tqdm

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import export, l1_switch, multihost, split, strict_json
from xcoder_jax import train_records as records
from xcoder_jax import train_step as ts
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore, BatchStream
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.sharding import ShardedStep, make_mesh


class TrainingError(XcoderError, RuntimeError):
    """Training cannot go on: a non-finite loss, bad rows, or an incompatible resume."""


# --- Data -------------------------------------------------------------------------------


def open_store(config, workdir: str) -> ActivationStore:
    store = ActivationStore(wd.activations_dir(workdir), verify=config.train.verify_store)
    cc = config.crosscoder
    if store.n_models != cc.n_models:
        raise ConfigError(
            f"the store holds {store.n_models} models, the config expects {cc.n_models}"
        )
    if cc.d_model > 0 and store.d_model != cc.d_model:
        raise ConfigError(f"the store has d_model {store.d_model}, the config expects {cc.d_model}")
    return store


def clean_rows(batch: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows with NaN/inf are refused ("error") or zeroed and masked out ("skip").

    Returns (batch, weights [batch] float32 0/1, number of bad rows).
    """
    ok = np.isfinite(batch).all(axis=(1, 2))
    bad = int((~ok).sum())
    if bad and policy == "error":
        raise TrainingError(
            f"{bad} rows of the store hold NaN/inf; set train.nonfinite_rows='skip' to mask them"
        )
    if bad:
        batch = np.where(ok[:, None, None], batch, 0.0).astype(np.float32)
    return batch, ok.astype(np.float32), bad


# --- The run ----------------------------------------------------------------------------


@dataclass
class _Run:
    """What a training run works with, fixed at its start."""

    config: Any
    workdir: str
    store: ActivationStore
    train_shards: list[int]
    heldout: list[int]  # held out: evaluation here, every measurement of the later stages
    hp: ts.HParams
    trainer: ShardedStep
    mngr: Any  # the Orbax checkpoint manager
    main: bool  # whether this process writes the files (every process computes alike)


def _setup(config, workdir: str) -> _Run:
    """The store and its split, the hyperparameters, the compiled step, the checkpoints."""
    store = open_store(config, workdir)
    train_shards, heldout = store.split(config.train.eval_shards)
    tc, mc = config.train, config.mesh
    # FVE denominators in normalised units: E||x - mean||^2 * s^2, per model; the mean too.
    norm_var, norm_mean = store.total_variance * store.scales**2, store.mean * store.scales[:, None]
    hp = ts.HParams.from_config(config, store.d_model, norm_var, norm_mean)
    across = mc.get("model_across_processes", False)
    mesh = make_mesh(mc.data, mc.model, tc.batch_size, hp.n_latents, across)
    trainer = ShardedStep(hp, mesh)
    mngr = ckpt.manager(workdir, tc.checkpoint_every, tc.keep_checkpoints)
    main = multihost.is_main()
    if main:
        print(records.mean_line(store, bool(hp.center)), flush=True)
    return _Run(config, workdir, store, train_shards, heldout, hp, trainer, mngr, main)


def _start(run: _Run, latest: int | None) -> tuple[dict, records.Progress]:
    """The state and progress to go on from: checkpoint `latest` (its later metric lines
    are dropped), or a fresh start (an old metrics file is removed)."""
    store, metrics_file = run.store, wd.metrics_path(run.workdir)
    if latest is not None:
        abstract = run.trainer.abstract_state()
        state, extra, seen = ckpt.restore(run.mngr, latest, abstract, store.n_rows)
        if run.main:
            records.trim_metrics(metrics_file, latest)
        return state, records.Progress(seen, extra["position"], extra["tokens"], extra["skipped"])
    # The decoder bias may start at the store's mean (normalised units; 0 when centred).
    start_at_mean = run.config.crosscoder.get("b_dec_init", "zero") == "mean" and not run.hp.center
    state = run.trainer.init(store.mean * store.scales[:, None] if start_at_mean else None)
    if run.main and os.path.exists(metrics_file):
        os.remove(metrics_file)
    return state, records.Progress(records.new_bitmap(store.n_rows))


def _check_finite(run: _Run, state) -> None:
    """TrainingError once the state has met a non-finite loss."""
    bad = int(jax.device_get(state["first_bad_step"]))
    if bad >= 0:
        run.mngr.wait_until_finished()
        good = run.mngr.latest_step()
        kept = (
            "no checkpoint was saved before it"
            if good is None
            else f"the last good checkpoint (step {good}) is kept in "
            f"{wd.checkpoints_dir(run.workdir)}"
        )
        raise TrainingError(f"non-finite loss at step {bad}; training stopped: {kept}")


def _evaluate(run: _Run, state) -> dict:
    """Held-out metrics of the inference encoder (every process evaluates alike)."""
    heldout = run.store.normalised_batches(run.heldout, run.config.train.batch_size)
    return run.trainer.evaluate(state, heldout)


# --- The loop ---------------------------------------------------------------------------


def _next_batch(run: _Run, stream: BatchStream, progress: records.Progress):
    """The next batch on the devices, (x, weights), its rows counted and marked.

    Every batch is scanned for NaN/inf rows, whatever the manifest counted when the store
    was written: a shard damaged since then (and read with verify_store off) must still
    meet `nonfinite_rows`, not turn into a non-finite loss. Only "skip" needs the batch's
    valid rows gathered from every process (a sync per step); "error" stops at the first.
    """
    tc = run.config.train
    batch, ids = next(stream)
    batch, weights, _ = clean_rows(batch, tc.nonfinite_rows)  # "error" raises
    x, w = run.trainer.to_device(batch, weights, tc.batch_size)
    if tc.nonfinite_rows == "skip":
        # The whole batch's valid rows, on every process: counting its own rows alone
        # would make the counters depend on the number of processes.
        valid = multihost.replicated_to_host(run.trainer.replicate(w)) > 0
        progress.skipped += int((~valid).sum())
        progress.tokens += int(valid.sum())
        records.mark_rows(progress.seen, ids[valid])
    else:
        progress.tokens += len(ids)
        records.mark_rows(progress.seen, ids)
    return x, w


def _log_step(run: _Run, state, metrics, progress: records.Progress, done: int):
    """Step `done`'s line of metrics.jsonl, evaluated on the held-out shards when due:
    (the line, the held-out metrics or None)."""
    tc = run.config.train
    _check_finite(run, state)
    record = {
        k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
        for k, v in jax.device_get(metrics).items()
    }
    distinct = records.count_rows(progress.seen)
    record.update(
        step=done, tokens=progress.tokens, distinct_rows=distinct, skipped_rows=progress.skipped
    )
    evaluation = None
    if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
        evaluation = _evaluate(run, state)
        record.update({f"eval_{k}": v for k, v in evaluation.items()})
    # _check_finite above has already stopped a run whose loss is not finite.
    if run.main:
        records.log_metrics(wd.metrics_path(run.workdir), record)
    return record, evaluation


def _save(run: _Run, state, progress: records.Progress, done: int) -> None:
    """A checkpoint at step `done`: the state, the rows trained on, and the JSON extra."""
    _check_finite(run, state)
    extra = {
        **progress.counters(),
        "config": ckpt.config_fields(run.config),
        split.KEY: split.record(run.config, run.heldout),
        "processes": jax.process_count(),  # informative: a resume may use another count
    }
    ckpt.save(run.mngr, done, state, extra, progress.seen, force=done == run.config.train.steps)


def _loop(run: _Run, state, progress: records.Progress, start: int):
    """Steps `start` to `train.steps`, logged and checkpointed: (the final state, its
    held-out metrics if the last step evaluated them, else None)."""
    tc = run.config.train
    # Every process follows the one global row order and reads the rows its devices hold.
    stream = BatchStream(
        run.store,
        tc.batch_size,
        seed=run.config.seed,
        shards=run.train_shards,
        group_shards=tc.group_shards,
        normalise=True,
        start=progress.position,
        prefetch=tc.prefetch,
        part=run.trainer.local_rows(tc.batch_size),
    )
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not run.main)
    peer_lost = False
    final_eval = None  # held-out metrics of the final state, once computed
    paths = l1_switch.Paths(run.trainer, run.config)  # the L1 step: dense or sparse
    try:
        with multihost.peers_watched("while training"):
            for step in range(start, tc.steps):
                x, w = _next_batch(run, stream, progress)
                done = step + 1
                log_now = done % tc.log_every == 0 or done == tc.steps
                state, metrics = paths.step(state, x, w, log_now)
                progress.position = stream.position
                if log_now:
                    record, evaluation = _log_step(run, state, metrics, progress, done)
                    paths.observe(record["l0"])  # the next steps' path
                    if done == tc.steps and evaluation is not None:
                        final_eval = evaluation  # the export's: not computed again
                    bar.set_postfix(loss=f"{record['loss']:.3g}", l0=f"{record['l0']:.1f}")
                if done % tc.checkpoint_every == 0 or done == tc.steps:
                    _save(run, state, progress, done)
                bar.update(1)
    except multihost.PeerFailure:
        peer_lost = True  # a save under way cannot complete without the lost process
        raise
    finally:
        bar.close()
        stream.close()
        if not peer_lost:
            run.mngr.wait_until_finished()
    return state, final_eval


# --- The export -------------------------------------------------------------------------


def _export(run: _Run, state, progress: records.Progress, final_eval: dict | None) -> dict:
    """Writes the portable export of the final state (process 0); returns its held-out
    metrics, NaN/inf ones as None."""
    with multihost.peers_watched("while exporting"):
        if final_eval is None:  # no evaluation at the last step (or nothing left to train)
            final_eval = _evaluate(run, state)
        final = strict_json.finite_or_none(final_eval)
        # The weights gathered to every process (one copy each), written by process 0.
        params = multihost.replicated_to_host({k: state[k] for k in ("params", "rest")})
        weights = ts.export_weights(params, run.hp)
    try:  # a finite loss at the last step does not make its update finite
        chex.assert_tree_all_finite(weights)
    except AssertionError as e:
        raise TrainingError(f"the final weights hold NaN/inf; nothing exported ({e})") from e
    if run.main:
        meta = records.export_meta(run.config, run.store, run.hp.loss, progress, run.heldout, final)
        export.export(wd.export_dir(run.workdir), weights, run.store.scales, meta)
    return final


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes) the crosscoder of `workdir`; returns the final eval metrics.

    With `config.distributed` every process of the run calls this with the same config and
    workdir (see `multihost`); the result does not depend on the number of processes.
    """
    multihost.initialize(config)
    run = _setup(config, workdir)
    latest = run.mngr.latest_step()
    if latest is not None:
        saved = ckpt.restore_extra(run.mngr, latest)["config"]
        differing = ckpt.incompatible_fields(saved, ckpt.config_fields(config))
        if differing:
            raise TrainingError(
                f"{wd.checkpoints_dir(workdir)} was trained with another config; differing "
                f"fields: {', '.join(differing)} (use another workdir, or the old values)"
            )
        if latest >= config.train.steps and records.intact_export(workdir):
            with open(os.path.join(wd.export_dir(workdir), export.EXPORT_CONFIG)) as f:
                return json.load(f)["eval"]  # finished and exported: nothing to do
    state, progress = _start(run, latest)
    state, final_eval = _loop(run, state, progress, 0 if latest is None else latest)
    _check_finite(run, state)
    final = _export(run, state, progress, final_eval)
    run.mngr.close()
    return final
