"""Checkpoints (Orbax): the train state, the reader's position and the rows trained on, and
the config fields a resumed run must share with the run that saved them.

The portable export that training ends with is `xcoder_jax.export`.
"""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp

from xcoder_jax import workdir as wd

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
    "train.mu_dtype",
    # Which rows a batch holds: the shards held out (`split`) and those shuffled together.
    "train.eval_shards",
    "train.group_shards",
)


# Fields inside RESUME_FIELDS that choose how a result is computed, not what it is (the
# BatchTopK paths, and the L1 paths, agree to float tolerance): a run may resume with another
# value.
HOW_NOT_WHAT = ("crosscoder.topk_path", "crosscoder.l1_path")


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
    out = {k: v for k, v in out.items() if k not in HOW_NOT_WHAT}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    """The fields whose values differ, as "name (saved -> current)". A field the checkpoint
    does not hold was added after it was written; fields are added with defaults that keep
    the earlier behaviour, so it is not a difference."""
    return sorted(
        f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
        for k in saved
        if saved.get(k) != current.get(k)
    )


def manager(workdir: str, save_every: int, keep: int) -> ocp.CheckpointManager:
    """Orbax manager over <workdir>/checkpoints: saves every `save_every` steps, keeps `keep`."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(wd.checkpoints_dir(workdir)),
        options=options,
        item_names=("state", "extra", "seen"),
    )


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state,
    extra: dict,
    seen: np.ndarray,
    force: bool = False,
) -> bool:
    """Saves the train state (a pytree), JSON-able `extra` (reader position, counters) and
    the bitmap of store rows trained on (`seen`: packed bits, uint8 [ceil(n_rows / 8)])."""
    return mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            extra=ocp.args.JsonSave(extra),
            seen=ocp.args.StandardSave({"bits": seen.copy()}),  # saved while training goes on
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, n_rows: int):
    """(state, extra, seen) at `step`; `abstract_state` gives shapes, dtypes, shardings."""
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            extra=ocp.args.JsonRestore(),
            seen=ocp.args.StandardRestore(),
        ),
    )
    seen = np.array(out.seen["bits"], np.uint8)  # writable: training keeps marking rows
    if seen.shape != ((n_rows + 7) // 8,):
        raise ValueError(f"checkpoint {step} has a row bitmap for another store size")
    return out.state, out.extra, seen


def restore_extra(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
