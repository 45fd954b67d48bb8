"""What training records beside its weights: the lines of metrics.jsonl, the rows trained on
(a bitmap), the progress a checkpoint keeps, and the export's config.json (its fields, and
whether an intact export is there).

NumPy and JSON only; `train` writes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from xcoder_jax import exclusive, export, split, strict_json
from xcoder_jax import workdir as wd

# --- metrics.jsonl ----------------------------------------------------------------------


def trim_metrics(path: str, last_step: int) -> None:
    """Drops metric lines past the checkpoint a run resumes from (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def nonfinite_keys(record: dict) -> list[str]:
    """Keys of `record` whose value is or holds a NaN/inf float."""
    return sorted(k for k, v in record.items() if strict_json.has_nonfinite(v))


def log_metrics(path: str, record: dict) -> None:
    """Appends one strict-JSON line; a metric that is NaN/inf (e.g. the FVE of a model whose
    store variance is 0) is written as null and named in `nonfinite_metrics`."""
    bad = nonfinite_keys(record)
    if bad:
        record = {**strict_json.finite_or_none(record), "nonfinite_metrics": bad}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


# --- The rows trained on ----------------------------------------------------------------

# A packed bitmap (np.packbits order: row i is bit 7 - i % 8 of byte i // 8), an eighth of
# a bool array: 50 MB for the paper's 400M rows.


def new_bitmap(n_rows: int) -> np.ndarray:
    return np.zeros((n_rows + 7) // 8, np.uint8)


def mark_rows(bits: np.ndarray, rows: np.ndarray) -> None:
    np.bitwise_or.at(bits, rows >> 3, np.right_shift(128, rows & 7).astype(np.uint8))


def count_rows(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum(dtype=np.int64))


@dataclass
class Progress:
    """Where training is: what a checkpoint keeps beside the state."""

    # Rows trained on, over all processes: each process marks every row of each global
    # batch, so the bitmap is the same everywhere (and saved once).
    seen: np.ndarray
    position: int = 0  # rows the reader has consumed
    tokens: int = 0  # valid rows trained on
    skipped: int = 0  # rows masked out (NaN/inf)

    def counters(self) -> dict:
        """The JSON counters of a checkpoint (the bitmap is saved on its own)."""
        return {"position": self.position, "tokens": self.tokens, "skipped": self.skipped}


# --- The export's config.json -----------------------------------------------------------


def intact_export(workdir: str) -> bool:
    """Whether the workdir holds a complete, undamaged export (a damaged one is written
    again from the final checkpoint, so a rerun repairs it)."""
    try:
        export.check_export(wd.export_dir(workdir))
    except export.ExportError as e:
        if os.path.exists(os.path.join(wd.export_dir(workdir), export.EXPORT_CONFIG)):
            print(f"{e}; writing it again", flush=True)
        return False
    return True


def mean_to_spread(store) -> list[float | None]:
    """Per model ||mean|| / sqrt(E||x - mean||^2): how far the store mean sits from 0 against
    the spread around it (a ratio of norms, the same in normalised and raw units); None
    where the store holds no spread."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.linalg.norm(store.mean, axis=-1) / np.sqrt(store.total_variance)
    return strict_json.finite_or_none([float(r) for r in ratio])


def mean_line(store, centred: bool) -> str:
    """The line training prints at its start: each model's `mean_to_spread`."""
    roles = [m.get("role", f"model {i}") for i, m in enumerate(store.manifest["models"])]
    fmt = lambda v: "undefined" if v is None else f"{v:.3g}"
    ratios = ", ".join(f"{r} {fmt(v)}" for r, v in zip(roles, mean_to_spread(store)))
    return f"store ||mean|| / rms deviation: {ratios} (crosscoder.center = {centred})"


def export_meta(config, store, loss, progress: Progress, heldout, final: dict) -> dict:
    """The export's config.json fields besides the scales (`export.export` adds them):
    the store's models and site, the loss (the loss object: its name, and the latent groups
    of one that has them, Matryoshka's), the run's counts, its held-out split and metrics."""
    m = store.manifest
    return {
        "models": m["models"],
        "layer": m["layer"],
        "d_model": m["d_model"],
        "n_models": m["n_models"],
        "n_latents": config.crosscoder.n_latents,
        "loss": loss.name,
        # Matryoshka's group sizes, in latent order (`exported.ExportedCrosscoder.latent_groups`).
        **({"latent_groups": list(loss.groups)} if getattr(loss, "groups", None) else {}),
        "tokenizer_sha256": m["tokenizer_sha256"],
        "store_rows": store.n_rows,
        "steps": config.train.steps,
        "tokens_trained": progress.tokens,
        "distinct_tokens_trained": count_rows(progress.seen),
        "skipped_rows": progress.skipped,
        # The held-out shards, read back by every later stage (`split.heldout_from_export`).
        split.KEY: split.record(config, heldout),
        "eval": final,
        # Centring subtracts the store mean before encoding (folded into the biases here).
        "center": bool(config.crosscoder.get("center", False)),
        "mean_to_spread": mean_to_spread(store),
        # The dedicated latents' ranges (`exclusive.record`; absent when there are none).
        **exclusive.record(
            config.crosscoder.n_latents, exclusive.from_crosscoder(config.crosscoder)
        ),
    }
