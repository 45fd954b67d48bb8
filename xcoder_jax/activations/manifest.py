"""The activation store's on-disk format: manifest, shard files, checksums, statistics.

A store is a directory:

    manifest.json            format version, models, layer, d_model, dtype, shard list, norms
    m{m}_{k:05d}.npy         shard k of model m's activations: [rows, d_model], 2-byte floats
    tokens_{k:05d}.npy       shard k's token ids: [rows] int32
    index_{k:05d}.npy        shard k's (document, position) pairs: [rows, 2] int32
    stats_{k:05d}.npz        shard k's sums for the normalisation and FVE statistics

    shards.jsonl             while extracting: one line per complete shard, appended

bfloat16 is written as its uint16 bit pattern (`.npy` has no bfloat16 type) and viewed back
on read. Files are written under a temporary name and renamed. While a store is being
written, each finished shard is appended as one line to `shards.jsonl` (so recording a shard
costs the same at the first shard and the 20,000th); a complete store's manifest lists every
shard and the log is gone. Either way the store only ever names complete shards.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from xcoder_jax.errors import XcoderError
from xcoder_jax.fileio import HashingWriter, atomic_write_bytes, fsync_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_LOG = "shards.jsonl"

# On-disk dtype name -> (numpy dtype of the values, numpy dtype of the stored bits).
DTYPES = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)),
    "float16": (np.dtype(np.float16), np.dtype(np.float16)),
    "float32": (np.dtype(np.float32), np.dtype(np.float32)),
}


class StoreError(XcoderError, ValueError):
    """A store that cannot be used as asked: missing, corrupted, or of another format."""


def acts_name(model: int, shard: int) -> str:
    return f"m{model}_{shard:05d}.npy"


def tokens_name(shard: int) -> str:
    return f"tokens_{shard:05d}.npy"


def index_name(shard: int) -> str:
    return f"index_{shard:05d}.npy"


def stats_name(shard: int) -> str:
    return f"stats_{shard:05d}.npz"


def portable(fingerprint: dict | None) -> dict | None:
    """`fingerprint` without where the models were read from: their weights hashes (or hub id
    and revision) identify them, so a workdir moved, copied or named another way
    (`runs/tiny` vs `./runs/tiny`) still holds the same store."""
    if fingerprint is None:
        return None
    models = [{k: v for k, v in m.items() if k != "source"} for m in fingerprint.get("models", [])]
    return {**fingerprint, "models": models}


def save_array(path: str, array: np.ndarray) -> str:
    """Saves `array` atomically as `.npy` and returns the file's sha256."""
    hashed: list[HashingWriter] = []

    def write(f):
        hashed.append(HashingWriter(f))
        np.save(hashed[0], array, allow_pickle=False)

    atomic_write_bytes(path, write)
    return hashed[0].sha.hexdigest()


def differing_keys(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two fingerprints (missing counts as None)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def to_disk(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float activations -> the array stored on disk (bfloat16 as uint16 bits)."""
    value_dtype, bits_dtype = DTYPES[dtype]
    return values.astype(value_dtype, copy=False).view(bits_dtype)


def from_disk(stored: np.ndarray, dtype: str) -> np.ndarray:
    """The stored array -> values (still 2-byte floats for bfloat16/float16)."""
    value_dtype, _ = DTYPES[dtype]
    return stored.view(value_dtype)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise StoreError(f"no activation store at {directory} (missing {MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"unreadable store manifest {path}: {e}") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"store {directory} has format version {version}; this version of xcoder_jax "
            f"reads version {FORMAT_VERSION} (re-extract the activations)"
        )
    if not manifest.get("complete") and os.path.exists(os.path.join(directory, SHARD_LOG)):
        # An unfinished store's shards live in its append-only log; the log, once it
        # exists, holds every shard recorded so far (a resume copies older ones into it).
        manifest["shards"] = read_shard_log(directory)
        manifest["n_rows"] = sum(s["rows"] for s in manifest["shards"])
    return manifest


def append_shard_record(directory: str, record: dict) -> None:
    """Appends one finished shard's record to the store's log, durably: the shard's files
    are made durable first, so a recorded shard never names a file a power loss took."""
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"  # refused: no file
    path = os.path.join(directory, SHARD_LOG)
    creates = not os.path.exists(path)
    fsync_dir(directory)
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if creates:
        fsync_dir(directory)  # the log's own directory entry


def read_shard_log(directory: str) -> list[dict]:
    """The shard records of the log; a last line cut short by a crash is left out."""
    records = []
    try:
        with open(os.path.join(directory, SHARD_LOG)) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                records.append(json.loads(line))
    except FileNotFoundError:
        pass
    except json.JSONDecodeError as e:
        raise StoreError(f"corrupt shard log in {directory}: {e}") from e
    return records


def remove_shard_log(directory: str) -> None:
    """Deletes the store's shard log, if there is one."""
    try:
        os.remove(os.path.join(directory, SHARD_LOG))
    except FileNotFoundError:
        pass


def write_shard_log(directory: str, records: list[dict]) -> None:
    """Replaces the log with exactly `records` (a resume drops a torn last line this way)."""
    data = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records)
    data = data.encode()
    atomic_write_bytes(os.path.join(directory, SHARD_LOG), lambda f: f.write(data))


# --- Statistics ------------------------------------------------------------------------
# Sums are kept per shard in float64 so that resumed and merged stores combine them
# exactly; the normalisation scale and the FVE mean/variance come from their totals.


def shard_sums(acts: np.ndarray) -> dict[str, np.ndarray]:
    """Sums over the rows of one shard. `acts`: [rows, n_models, d_model], raw units.

    Rows holding NaN/inf are left out of the sums and counted in `n_nonfinite`.
    """
    finite = np.isfinite(acts).all(axis=(1, 2))
    x = acts if finite.all() else acts[finite]
    # Products in float32, accumulation in float64: exact enough, and no float64 copy.
    row_sq = np.square(x).sum(-1)  # [rows, n_models]
    return {
        "n": np.array(x.shape[0], np.int64),
        "n_nonfinite": np.array(int((~finite).sum()), np.int64),
        "sum_norm": np.sqrt(row_sq).sum(0, dtype=np.float64),  # [n_models]
        "sum_x": x.sum(0, dtype=np.float64),  # [n_models, d_model]
        "sum_sq": row_sq.sum(0, dtype=np.float64),  # [n_models]
    }


def add_sums(total: dict | None, sums: dict) -> dict:
    if total is None:
        return {k: np.array(v, copy=True) for k, v in sums.items()}
    return {k: total[k] + sums[k] for k in total}


def _ratio(mean_norm: float, total_var: float) -> float | None:
    """||mean|| / sqrt(total variance), None where the rows do not vary."""
    return float(mean_norm / np.sqrt(total_var)) if total_var > 0 else None


def norm_stats(total: dict, d_model: int) -> tuple[list[dict], np.ndarray]:
    """Per-model normalisation scale and FVE statistics from summed shard statistics.

    Returns (per-model dicts with `scale` = sqrt(d) / mean ||x||, `mean_norm`,
    `total_variance` = E||x - mean||^2 in raw units and `mean_to_spread`; the mean vectors
    [n_models, d_model]).
    """
    n = float(total["n"])
    if n == 0:
        raise StoreError("the store has no finite rows: no normalisation scale can be estimated")
    mean = total["sum_x"] / n
    mean_norm = total["sum_norm"] / n
    if not (mean_norm > 0).all():
        zero = [m for m in range(len(mean_norm)) if not mean_norm[m] > 0]
        raise StoreError(
            f"the activations of model(s) {zero} are all zero: no normalisation scale "
            "sqrt(d) / mean ||x|| exists"
        )
    total_var = total["sum_sq"] / n - np.square(mean).sum(-1)
    stats = [
        {
            "scale": float(np.sqrt(d_model) / mean_norm[m]),
            "mean_norm": float(mean_norm[m]),
            "total_variance": float(total_var[m]),
            # ||mean|| / rms deviation: predicts dead latents at init (centring removes it).
            "mean_to_spread": _ratio(np.linalg.norm(mean[m]), total_var[m]),
        }
        for m in range(mean.shape[0])
    ]
    return stats, mean
