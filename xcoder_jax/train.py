"""Crosscoder training: `train_and_evaluate(config, workdir)`, read top to bottom.

Reads the workdir's activation store in normalised units, trains with Optax (Adam, the
paper's constant-then-linear-decay schedule, global-norm clipping) in one pure jitted step
with donated state, sharded over a ('data', 'model') mesh, checkpoints with Orbax and resumes
by default, logs health metrics to metrics.jsonl, and exports the portable raw-unit file.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import strict_json
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


# --- Metrics ----------------------------------------------------------------------------


def _trim_metrics(path: str, last_step: int) -> None:
    """Drops metric lines past the checkpoint a run resumes from (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def _nonfinite_keys(record: dict) -> list[str]:
    """Keys of `record` whose value is or holds a NaN/inf float."""
    return sorted(k for k, v in record.items() if strict_json.has_nonfinite(v))


def _log(path: str, record: dict) -> None:
    """Appends one strict-JSON line; a metric that is NaN/inf (e.g. the FVE of a model whose
    store variance is 0) is written as null and named in `nonfinite_metrics`."""
    bad = _nonfinite_keys(record)
    if bad:
        record = {**strict_json.finite_or_none(record), "nonfinite_metrics": bad}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


# The rows trained on, as a packed bitmap (np.packbits order: row i is bit 7 - i % 8 of byte
# i // 8), an eighth of a bool array: 50 MB for the paper's 400M rows.
def _new_bitmap(n_rows: int) -> np.ndarray:
    return np.zeros((n_rows + 7) // 8, np.uint8)


def _mark(bits: np.ndarray, rows: np.ndarray) -> None:
    np.bitwise_or.at(bits, rows >> 3, np.right_shift(128, rows & 7).astype(np.uint8))


def _count(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum(dtype=np.int64))


def _count_across_hosts(bits: np.ndarray) -> int:
    """Distinct rows trained on, over all hosts (each host marks the rows it read)."""
    if jax.process_count() == 1:
        return _count(bits)
    from jax.experimental import multihost_utils

    return _count(np.bitwise_or.reduce(multihost_utils.process_allgather(bits), axis=0))


# --- The loop ---------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes) the crosscoder of `workdir`; returns the final eval metrics."""
    if config.get("distributed", False):
        given = {k: config[k] for k in ("coordinator_address", "num_processes", "process_id")}
        jax.distributed.initialize(**{k: v for k, v in given.items() if v not in ("", -1)})
    store = open_store(config, workdir)
    train_shards, eval_shards = store.split(config.train.eval_shards)
    # Each host reads its own share of the training shards.
    host_shards = train_shards[jax.process_index() :: jax.process_count()]
    tc = config.train
    # FVE denominators in normalised units: E||x - mean||^2 * s^2, per model.
    hp = ts.HParams.from_config(config, store.d_model, store.total_variance * store.scales**2)
    mesh = make_mesh(config.mesh.data, config.mesh.model, tc.batch_size, hp.n_latents)
    trainer = ShardedStep(hp, mesh)

    mngr = ckpt.manager(workdir, tc.checkpoint_every, tc.keep_checkpoints)
    metrics_file = wd.metrics_path(workdir)
    latest = mngr.latest_step()
    seen = _new_bitmap(store.n_rows)
    if latest is not None:
        extra = ckpt.restore_extra(mngr, latest)
        differing = ckpt.incompatible_fields(extra["config"], ckpt.config_fields(config))
        if differing:
            raise TrainingError(
                f"{wd.checkpoints_dir(workdir)} was trained with another config; differing "
                f"fields: {', '.join(differing)} (use another workdir, or the old values)"
            )
        exported = os.path.join(wd.export_dir(workdir), ckpt.EXPORT_CONFIG)
        if latest >= tc.steps and os.path.exists(exported):
            with open(exported) as f:
                return json.load(f)["eval"]  # finished and exported: nothing to do
        state, extra, seen = ckpt.restore(mngr, latest, trainer.abstract_state(), store.n_rows)
        position, tokens, skipped = extra["position"], extra["tokens"], extra["skipped"]
        _trim_metrics(metrics_file, latest)
        start = latest
    else:
        # The decoder bias may start at the store's mean (normalised units).
        start_at_mean = config.crosscoder.get("b_dec_init", "zero") == "mean"
        state = trainer.init(store.mean * store.scales[:, None] if start_at_mean else None)
        position, tokens, skipped, start = 0, 0, 0, 0
        if os.path.exists(metrics_file):
            os.remove(metrics_file)

    def extra_now():
        return {
            "position": position,
            "tokens": tokens,
            "skipped": skipped,
            "config": ckpt.config_fields(config),
        }

    def check_finite(state, step):
        bad = int(jax.device_get(state["first_bad_step"]))
        if bad >= 0:
            mngr.wait_until_finished()
            good = mngr.latest_step()
            raise TrainingError(
                f"non-finite loss at step {bad}; training stopped. The last good checkpoint "
                f"(step {good}) is kept in {wd.checkpoints_dir(workdir)}"
            )

    local_batch = tc.batch_size // jax.process_count()
    stream = BatchStream(
        store,
        local_batch,
        seed=config.seed,
        shards=host_shards,
        group_shards=tc.group_shards,
        normalise=True,
        start=position,
        prefetch=tc.prefetch,
    )
    # The store counted its NaN/inf rows when it was written; without any, the per-batch
    # scan is skipped (a store from before that count is scanned).
    scan_rows = store.manifest.get("nonfinite_rows", 1) > 0
    all_valid = np.ones(local_batch, np.float32)
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step")
    try:
        for step in range(start, tc.steps):
            batch, ids = next(stream)
            if scan_rows:
                batch, weights, bad = clean_rows(batch, tc.nonfinite_rows)
            else:
                weights, bad = all_valid, 0
            skipped += bad
            _mark(seen, ids[weights > 0])
            done = step + 1
            log_now = done % tc.log_every == 0 or done == tc.steps
            state, metrics = trainer.step(state, *trainer.to_device(batch, weights), log_now)
            position = stream.position
            tokens += int(weights.sum())
            if log_now:
                check_finite(state, done)
                record = {
                    k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                    for k, v in jax.device_get(metrics).items()
                }
                record.update(
                    step=done, tokens=tokens, distinct_rows=_count(seen), skipped_rows=skipped
                )
                if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
                    heldout = store.normalised_batches(eval_shards, tc.batch_size)
                    record.update(
                        {f"eval_{k}": v for k, v in trainer.evaluate(state, heldout).items()}
                    )
                # check_finite above has already stopped a run whose loss is not finite.
                _log(metrics_file, record)
                bar.set_postfix(loss=f"{record['loss']:.3g}", l0=f"{record['l0']:.1f}")
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                check_finite(state, done)
                ckpt.save(mngr, done, state, extra_now(), seen, force=done == tc.steps)
            bar.update(1)
    finally:
        bar.close()
        stream.close()
        mngr.wait_until_finished()
    check_finite(state, tc.steps)
    heldout = store.normalised_batches(eval_shards, tc.batch_size)
    final = strict_json.finite_or_none(trainer.evaluate(state, heldout))
    m = store.manifest
    ckpt.export(
        wd.export_dir(workdir),
        ts.export_weights(state, hp),
        store.scales,
        {
            "models": m["models"],
            "layer": m["layer"],
            "d_model": m["d_model"],
            "n_models": m["n_models"],
            "n_latents": hp.n_latents,
            "loss": hp.loss.name,
            "tokenizer_sha256": m["tokenizer_sha256"],
            "store_rows": store.n_rows,
            "steps": tc.steps,
            "tokens_trained": tokens,
            "distinct_tokens_trained": _count_across_hosts(seen),
            "skipped_rows": skipped,
            "eval": final,
        },
    )
    mngr.close()
    return final
