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
from xcoder_jax import multihost, strict_json
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


def _intact_export(workdir: str) -> bool:
    """Whether the workdir holds a complete, undamaged export (a damaged one is written
    again from the final checkpoint, so a rerun repairs it)."""
    try:
        ckpt.check_export(wd.export_dir(workdir))
    except ckpt.ExportError as e:
        if os.path.exists(os.path.join(wd.export_dir(workdir), ckpt.EXPORT_CONFIG)):
            print(f"{e}; writing it again", flush=True)
        return False
    return True


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


# --- The loop ---------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes) the crosscoder of `workdir`; returns the final eval metrics.

    With `config.distributed` every process of the run calls this with the same config and
    workdir (see `multihost`); the result does not depend on the number of processes.
    """
    multihost.initialize(config)
    main = multihost.is_main()
    store = open_store(config, workdir)
    train_shards, eval_shards = store.split(config.train.eval_shards)
    tc = config.train
    # FVE denominators in normalised units: E||x - mean||^2 * s^2, per model.
    hp = ts.HParams.from_config(config, store.d_model, store.total_variance * store.scales**2)
    mesh = make_mesh(
        config.mesh.data,
        config.mesh.model,
        tc.batch_size,
        hp.n_latents,
        config.mesh.get("model_across_processes", False),
    )
    trainer = ShardedStep(hp, mesh)

    mngr = ckpt.manager(workdir, tc.checkpoint_every, tc.keep_checkpoints)
    metrics_file = wd.metrics_path(workdir)
    latest = mngr.latest_step()
    # Rows trained on, over all processes: each process marks every row of each global
    # batch, so the bitmap is the same everywhere (and saved once).
    seen = _new_bitmap(store.n_rows)
    if latest is not None:
        extra = ckpt.restore_extra(mngr, latest)
        differing = ckpt.incompatible_fields(extra["config"], ckpt.config_fields(config))
        if differing:
            raise TrainingError(
                f"{wd.checkpoints_dir(workdir)} was trained with another config; differing "
                f"fields: {', '.join(differing)} (use another workdir, or the old values)"
            )
        if latest >= tc.steps and _intact_export(workdir):
            with open(os.path.join(wd.export_dir(workdir), ckpt.EXPORT_CONFIG)) as f:
                return json.load(f)["eval"]  # finished and exported: nothing to do
        state, extra, seen = ckpt.restore(mngr, latest, trainer.abstract_state(), store.n_rows)
        position, tokens, skipped = extra["position"], extra["tokens"], extra["skipped"]
        if main:
            _trim_metrics(metrics_file, latest)
        start = latest
    else:
        # The decoder bias may start at the store's mean (normalised units).
        start_at_mean = config.crosscoder.get("b_dec_init", "zero") == "mean"
        state = trainer.init(store.mean * store.scales[:, None] if start_at_mean else None)
        position, tokens, skipped, start = 0, 0, 0, 0
        if main and os.path.exists(metrics_file):
            os.remove(metrics_file)

    def extra_now():
        return {
            "position": position,
            "tokens": tokens,
            "skipped": skipped,
            "config": ckpt.config_fields(config),
            "processes": jax.process_count(),  # informative: a resume may use another count
        }

    def check_finite(state, step):
        bad = int(jax.device_get(state["first_bad_step"]))
        if bad >= 0:
            mngr.wait_until_finished()
            good = mngr.latest_step()
            kept = (
                "no checkpoint was saved before it"
                if good is None
                else f"the last good checkpoint (step {good}) is kept in "
                f"{wd.checkpoints_dir(workdir)}"
            )
            raise TrainingError(f"non-finite loss at step {bad}; training stopped: {kept}")

    # Every process follows the one global row order and reads the rows its devices hold.
    part = trainer.local_rows(tc.batch_size)
    stream = BatchStream(
        store,
        tc.batch_size,
        seed=config.seed,
        shards=train_shards,
        group_shards=tc.group_shards,
        normalise=True,
        start=position,
        prefetch=tc.prefetch,
        part=part,
    )
    # Every batch is scanned for NaN/inf rows, whatever the manifest counted when the store
    # was written: a shard damaged since then (and read with verify_store off) must still
    # meet `nonfinite_rows`, not turn into a non-finite loss. Only "skip" needs the batch's
    # valid rows gathered from every process (a sync per step); "error" stops at the first.
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not main)
    peer_lost = False
    final_eval = None  # held-out metrics of the final state, once computed
    try:
        with multihost.peers_watched("while training"):
            for step in range(start, tc.steps):
                batch, ids = next(stream)
                batch, weights, _ = clean_rows(batch, tc.nonfinite_rows)  # "error" raises
                x, w = trainer.to_device(batch, weights, tc.batch_size)
                if tc.nonfinite_rows == "skip":
                    # The whole batch's valid rows, on every process: counting its own rows
                    # alone would make the counters depend on the number of processes.
                    valid = multihost.replicated_to_host(trainer.replicate(w)) > 0
                    skipped += int((~valid).sum())
                    tokens += int(valid.sum())
                    _mark(seen, ids[valid])
                else:
                    tokens += len(ids)
                    _mark(seen, ids)
                done = step + 1
                log_now = done % tc.log_every == 0 or done == tc.steps
                state, metrics = trainer.step(state, x, w, log_now)
                position = stream.position
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
                        evaluation = trainer.evaluate(state, heldout)
                        if done == tc.steps:
                            final_eval = evaluation  # the export's: not computed again
                        record.update({f"eval_{k}": v for k, v in evaluation.items()})
                    # check_finite above has already stopped a run whose loss is not finite.
                    if main:
                        _log(metrics_file, record)
                    bar.set_postfix(loss=f"{record['loss']:.3g}", l0=f"{record['l0']:.1f}")
                if done % tc.checkpoint_every == 0 or done == tc.steps:
                    check_finite(state, done)
                    ckpt.save(mngr, done, state, extra_now(), seen, force=done == tc.steps)
                bar.update(1)
    except multihost.PeerFailure:
        peer_lost = True  # a save under way cannot complete without the lost process
        raise
    finally:
        bar.close()
        stream.close()
        if not peer_lost:
            mngr.wait_until_finished()
    check_finite(state, tc.steps)
    with multihost.peers_watched("while exporting"):
        if final_eval is None:  # no evaluation at the last step (or nothing left to train)
            heldout = store.normalised_batches(eval_shards, tc.batch_size)
            final_eval = trainer.evaluate(state, heldout)
        final = strict_json.finite_or_none(final_eval)
        # The weights gathered to every process (one copy each), written by process 0.
        weights = ts.export_weights(
            multihost.replicated_to_host({k: state[k] for k in ("params", "rest")}), hp
        )
    m = store.manifest
    if main:
        ckpt.export(
            wd.export_dir(workdir),
            weights,
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
                "distinct_tokens_trained": _count(seen),
                "skipped_rows": skipped,
                "eval": final,
            },
        )
    mngr.close()
    return final
