"""What the stages after training read: the store and the export, checked to belong together,
the store's split into training and held-out shards, and store rows as float32.

    inputs = load_inputs(config, workdir)        # StageInputs: store, xcoder, train, heldout

The export is read once, as the `ExportedCrosscoder` with its config (roles, block L, scales);
every stage that reads both the store and the export starts here.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from xcoder_jax import split
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.export import ExportError
from xcoder_jax.exported import ExportedCrosscoder


@dataclass(frozen=True)
class StageInputs:
    """The store, the export (PyTorch, raw units, on the CPU) and the store's shards split
    as training split them: `train` the crosscoder was trained on, `heldout` it was not."""

    store: ActivationStore
    xcoder: ExportedCrosscoder
    train: list[int]
    heldout: list[int]


def load_inputs(config, workdir: str) -> StageInputs:
    """`workdir`'s store and export, checked to belong together (`check_pair`), and the
    store's split as training used it (`split_shards`)."""
    store = ActivationStore(wd.activations_dir(workdir), verify=config.train.verify_store)
    xcoder = ExportedCrosscoder.load(wd.export_dir(workdir))
    check_pair(store, xcoder.config)
    train, heldout = split_shards(config, store, xcoder.config)
    return StageInputs(store=store, xcoder=xcoder, train=list(train), heldout=list(heldout))


def split_shards(config, store: ActivationStore, export_config: dict) -> tuple[list, list]:
    """(training shards, held-out shards) of `store` as training split them: the held-out
    shards the export records (`split.heldout_from_export`: ConfigError when
    `train.eval_shards` is not the value training used), the others trained on."""
    heldout = split.heldout_from_export(export_config, store, config)
    held = set(heldout)
    return [k for k in range(len(store.shards)) if k not in held], list(heldout)


def check_pair(store: ActivationStore, export_config: dict) -> None:
    """Raises ExportError unless the export was trained on a store like this one."""
    man = store.manifest
    problems = []
    for key, have in (("layer", store.layer), ("d_model", store.d_model)):
        if export_config.get(key) != have:
            problems.append(f"{key}: export {export_config.get(key)}, store {have}")
    if export_config.get("n_models", store.n_models) != store.n_models:
        problems.append(f"n_models: export {export_config['n_models']}, store {store.n_models}")
    if export_config.get("tokenizer_sha256") != man.get("tokenizer_sha256"):
        problems.append("tokenizer: export and store were made with different tokenizers")
    ident = lambda ms: [(m.get("role"), m.get("source"), m.get("weights")) for m in ms or []]
    if ident(export_config.get("models")) != ident(man.get("models")):
        problems.append(
            f"models: export {ident(export_config.get('models'))}, store {ident(man.get('models'))}"
        )
    if problems:
        raise ExportError(
            "the export and the activation store come from different models or sites: "
            + "; ".join(problems)
        )


def to_float32(acts: np.ndarray) -> np.ndarray:
    """Store activations (bfloat16, float16 or float32) as float32 [rows, m, d].

    bfloat16 is the top half of a float32, so a shift of its bits converts it exactly and
    much faster than a per-element cast.
    """
    if acts.dtype == ml_dtypes.bfloat16:
        bits = np.ascontiguousarray(acts).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.asarray(acts, np.float32)
