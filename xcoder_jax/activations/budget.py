"""The disk budget of an extraction, checked before anything is written.

A store holds, per row, n_models x d_model activations of the store's dtype plus a token id
and (doc, position) (three int32). At the paper's 400M tokens with two models in bfloat16:

    1.5B pair (d_model 1536): 400e6 x 2 x 1536 x 2 B = 2.46e12 B = 2.46 TB (2.24 TiB)
    7B pair   (d_model 3584): 400e6 x 2 x 3584 x 2 B = 5.73e12 B = 5.73 TB
    14B pair  (d_model 5120): 400e6 x 2 x 5120 x 2 B = 8.19e12 B = 8.19 TB (7.45 TiB)

(activations only; the ids and positions add 12 B per row, 4.8 GB at 400M rows).
`extract.max_rows` caps a run deliberately; `check_disk` refuses one the disk cannot hold.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator

import numpy as np

from xcoder_jax.activations import manifest as mf
from xcoder_jax.errors import XcoderError

ROW_EXTRA_BYTES = 12  # token id and (doc, position): three int32 per row


class DiskBudgetError(XcoderError, OSError):
    """The disk cannot hold the store an extraction would write."""


def value_bytes(dtype: str) -> int:
    return mf.DTYPES[dtype][1].itemsize


def row_bytes(n_models: int, d_model: int, dtype: str) -> int:
    """Bytes one row takes on disk: n_models x d_model values, its token id and position."""
    return n_models * d_model * value_bytes(dtype) + ROW_EXTRA_BYTES


def human(n: float) -> str:
    """Decimal units, as disks are sold (1 TB = 1e12 B)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def cap_rows(
    docs: Iterable[tuple[int, np.ndarray]], max_rows: int, keep
) -> Iterator[tuple[int, np.ndarray]]:
    """The documents up to `max_rows` stored rows in all (-1: no cap); the last one is
    truncated so the total is exactly `max_rows` when the corpus has that many rows.
    keep: ids [T] -> bool [T], the positions a store keeps (`exclude.Exclusion.keep`)."""
    left = max_rows
    for doc, ids in docs:
        if max_rows >= 0:
            if left <= 0:
                return
            kept = np.flatnonzero(keep(ids))
            if len(kept) > left:
                ids = ids[: kept[left - 1] + 1]
            left -= min(len(kept), left)
        yield doc, ids


def check_disk(
    docs: Iterable[tuple[int, np.ndarray]],
    keep,
    n_models: int,
    d_model: int,
    dtype: str,
    directory: str,
    rows_on_disk: int = 0,
    log=print,
) -> dict:
    """Counts the rows `docs` give, prints rows, bytes and free space, and raises
    DiskBudgetError when the rows still to write do not fit in the free space.

    rows_on_disk: rows a resumed extraction already wrote (their bytes are spent). Counting
    stops as soon as the store cannot fit. Returns {"rows", "bytes", "free"}.
    """
    per_row = row_bytes(n_models, d_model, dtype)
    free = free_bytes(directory)
    rows, complete = 0, True
    for _, ids in docs:
        rows += int(np.count_nonzero(keep(ids)))
        if (rows - rows_on_disk) * per_row > free:
            complete = False
            break
    need = max(rows - rows_on_disk, 0) * per_row
    acts = rows * n_models * d_model * value_bytes(dtype)
    at_least = "" if complete else "at least "
    line = (
        f"store budget: {at_least}{rows} rows x {n_models} models x d_model {d_model} x "
        f"{value_bytes(dtype)} B ({dtype}) = {at_least}{human(acts)} of activations, "
        f"{at_least}{human(rows * per_row)} with token ids and positions"
    )
    if rows_on_disk:
        line += f" ({rows_on_disk} rows already on disk)"
    log(f"{line}; {human(free)} free on {directory}")
    if need > free:
        fits = rows_on_disk + free // per_row
        raise DiskBudgetError(
            f"the disk holding {directory} has {human(free)} free but the store needs "
            f"{at_least}{human(need)} more ({at_least}{rows} rows x {per_row} B per row); "
            f"free space, extract elsewhere, or cap the run with "
            f"--config.extract.max_rows={fits} (the rows that fit). At the paper's 400M "
            "tokens a pair needs 2.46 TB (1.5B, d_model 1536) to 8.19 TB (14B, d_model 5120)"
        )
    return {"rows": rows, "bytes": rows * per_row, "free": free}
