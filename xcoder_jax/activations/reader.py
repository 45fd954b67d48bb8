"""Reads an activation store: whole shards, chosen rows, and a shuffled batch stream.

The batch stream reads only the rows of the batches it yields: each epoch visits the shards
in a seeded order, `group_shards` at a time, and shuffles rows within the group (a shuffle
buffer across shards). Its position (rows consumed) fully determines what comes next, so a
resumed run continues with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from xcoder_jax import fileio
from xcoder_jax.activations import manifest as mf
from xcoder_jax.errors import ConfigError


class ActivationStore:
    """A complete store on disk. Activations come back as `[rows, n_models, d_model]`.

    With `verify=True` every file's sha256 is checked against the manifest the first time
    it is read (a corrupted or truncated shard raises `StoreError`).
    """

    def __init__(self, directory: str, verify: bool = True):
        self.directory = directory
        self.manifest = mf.read_manifest(directory)
        if not self.manifest.get("complete"):
            raise mf.StoreError(
                f"store {directory} is unfinished; rerun the extraction to resume it"
            )
        self.verify = verify
        self.shards: list[dict] = self.manifest["shards"]
        self.shard_offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self._verified: set[str] = set()
        # Every shard file's checksum by its path relative to the store.
        self._sha256 = {k: v for s in self.shards for k, v in s["sha256"].items()}
        self.mean = self._load(self.manifest["mean"]).astype(np.float32)

    # --- Facts ---------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.shard_offsets[-1])

    @property
    def n_models(self) -> int:
        return self.manifest["n_models"]

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def layer(self) -> int:
        return self.manifest["layer"]

    @property
    def scales(self) -> np.ndarray:
        """Per-model normalisation scales `[n_models]`: normalised = raw * scale."""
        return np.array([n["scale"] for n in self.manifest["norm"]], np.float32)

    @property
    def total_variance(self) -> np.ndarray:
        """Per-model E||x - mean||^2 `[n_models]`, raw units (the FVE denominator)."""
        return np.array([n["total_variance"] for n in self.manifest["norm"]], np.float32)

    # --- Files ---------------------------------------------------------------------------
    def _load(self, name: str) -> np.ndarray:
        """A store file, memory-mapped; shard files are checksummed on first read."""
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            raise mf.StoreError(f"store file missing: {path}")
        if self.verify and name not in self._verified:
            expected = self._sha256.get(name)
            if expected is not None and fileio.sha256_file(path) != expected:
                raise mf.StoreError(
                    f"checksum mismatch in {path}: the shard is corrupted or truncated"
                )
            self._verified.add(name)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise mf.StoreError(f"cannot read {path} (truncated or corrupted): {e}") from e

    def _column(self, name: str, rows: int) -> np.ndarray:
        """One model's activations file of a shard, memory-mapped, 2-byte floats [rows, d]."""
        col = mf.from_disk(self._load(name), self.manifest["dtype"])
        if col.shape != (rows, self.d_model):
            raise mf.StoreError(f"{name} has shape {col.shape}, expected {(rows, self.d_model)}")
        return col

    def shard_acts(self, k: int) -> np.ndarray:
        """Shard k's activations `[rows, n_models, d_model]`, raw units, 2-byte floats."""
        shard = self.shards[k]
        return np.stack([self._column(name, shard["rows"]) for name in shard["acts"]], axis=1)

    def shard_rows(self, k: int, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (positions within shard k) of shard k `[len(idx), n_models, d_model]`,
        raw units, 2-byte floats; only those rows are read from disk."""
        shard = self.shards[k]
        if len(idx) == shard["rows"]:  # every row (ids are distinct): one sequential read
            return self.shard_acts(k)[idx]
        return np.stack([self._column(n, shard["rows"])[idx] for n in shard["acts"]], axis=1)

    def shard_tokens(self, k: int) -> np.ndarray:
        """Shard k's token ids `[rows]`."""
        return np.asarray(self._load(self.shards[k]["tokens"]))

    def shard_index(self, k: int) -> np.ndarray:
        """Shard k's (document, position) pairs `[rows, 2]`."""
        return np.asarray(self._load(self.shards[k]["index"]))

    def verify_all(self) -> None:
        """Checks every shard file's checksum (raises StoreError on the first mismatch)."""
        for shard in self.shards:
            for name in (*shard["acts"], shard["tokens"], shard["index"]):
                self._load(name)

    def rows(self, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Rows by global id: `[len(ids), n_models, d_model]` in raw units, float32 (or
        `dtype=None`: the store's 2-byte floats). Only the rows asked for are read."""
        ids = np.asarray(ids, np.int64)
        value_dtype = mf.DTYPES[self.manifest["dtype"]][0]
        out = np.empty((len(ids), self.n_models, self.d_model), dtype or value_dtype)
        shard_of = np.searchsorted(self.shard_offsets, ids, side="right") - 1
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            where = where[np.argsort(ids[where], kind="stable")]  # file order
            out[where] = self.shard_rows(int(k), ids[where] - self.shard_offsets[k])
        return out

    def iter_shards(self, shards: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(k, shard activations) in store order, one shard in memory at a time."""
        for k in range(len(self.shards)) if shards is None else shards:
            yield k, self.shard_acts(k)

    def normalised_batches(self, shards: Sequence[int], batch_rows: int) -> Iterator[np.ndarray]:
        """The rows of `shards` in store order as float32 [<= batch_rows, m, d] NORMALISED."""
        for _, acts in self.iter_shards(shards):
            x = np.asarray(acts, np.float32) * self.scales[None, :, None]
            for i in range(0, len(x), batch_rows):
                yield x[i : i + batch_rows]

    def split(self, n_heldout: int) -> tuple[list[int], list[int]]:
        """(training shards, held-out shards): the last `n_heldout` shards are held out.

        Training and latent selection read the first list; evaluation and every effect
        measured on documents not selected on read the second (`train.eval_shards`).
        """
        n = len(self.shards)
        if n_heldout >= n:
            raise ConfigError(
                f"the store has {n} shards; holding out {n_heldout} leaves none to train on "
                "(lower train.eval_shards or extract with smaller shard_rows)"
            )
        return list(range(n - n_heldout)), list(range(n - n_heldout, n))


class BatchStream:
    """An endless stream of shuffled batches `[batch, n_models, d_model]` float32.

    `shards` restricts the stream to some shards (e.g. the training split). `start` is a
    position (rows consumed) to resume from; `position` is the current one. With
    `normalise=True` each model's rows are multiplied by its store scale. Batches are
    produced by a background thread `prefetch` ahead. Each batch comes with the global ids
    `[batch_size]` (int64) of its rows, so a trainer can count the distinct rows trained on.

    `part` selects the positions within each batch that this reader loads (a process of a
    multi-host run reads only the rows its devices hold): the batch is then
    `[len(range(batch_size)[part]), n_models, d_model]` while the ids stay those of the whole
    batch. The rows of batch t, and which positions hold them, depend only on the seed,
    the shards, `group_shards` and `batch_size`, never on the part or the number of readers.
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        seed: int,
        *,
        shards: Sequence[int] | None = None,
        group_shards: int = 4,
        normalise: bool = False,
        start: int = 0,
        prefetch: int = 2,
        part: slice = slice(None),
    ):
        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.shard_ids = list(range(len(store.shards)) if shards is None else shards)
        if not self.shard_ids:
            raise ValueError("the batch stream has no shards to read")
        self.epoch_rows = sum(store.shards[k]["rows"] for k in self.shard_ids)
        self.group_shards = max(1, group_shards)
        self.scale = store.scales if normalise else None
        self.part = part
        self.position = start
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True)
        self._thread.start()

    # --- The deterministic plan ----------------------------------------------------------
    def _groups(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.shard_ids)
        g = self.group_shards
        return [list(order[i : i + g]) for i in range(0, len(order), g)]

    def _group_ids(self, epoch: int, g: int, shards: list[int]) -> np.ndarray:
        """The global ids of a shard group's rows, shuffled (the group is the shuffle buffer)."""
        offsets = self.store.shard_offsets
        ids = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in shards])
        return ids[np.random.default_rng([self.seed, epoch, g]).permutation(len(ids))]

    def _ids_from(self, position: int) -> Iterator[np.ndarray]:
        """The endless sequence of row ids from `position`, one shard group at a time."""
        epoch, offset = divmod(position, self.epoch_rows)
        while True:
            seen = 0
            for g, shards in enumerate(self._groups(epoch)):
                size = sum(self.store.shards[k]["rows"] for k in shards)
                if offset < seen + size:
                    yield self._group_ids(epoch, g, shards)[offset - seen :]
                    offset = seen + size
                seen += size
            epoch, offset = epoch + 1, 0

    def _produce(self, position: int) -> None:
        lo, hi, _ = self.part.indices(self.batch_size)
        try:
            pending: list[tuple[np.ndarray, np.ndarray]] = []
            need, row = self.batch_size, position
            for ids in self._ids_from(position):
                # The group's rows this reader loads (those at positions lo..hi of their
                # batch), read once per group in file order, kept as 2-byte floats.
                mine = (row + np.arange(len(ids))) % self.batch_size
                mine = (mine >= lo) & (mine < hi)
                wanted = np.sort(ids[mine])
                acts = self.store.rows(wanted, dtype=None)
                row += len(ids)
                i = 0
                while i < len(ids):
                    take = min(need, len(ids) - i)
                    chunk = ids[i : i + take]
                    picked = acts[np.searchsorted(wanted, chunk[mine[i : i + take]])]
                    pending.append((picked, chunk))
                    i, need = i + take, need - take
                    if need == 0:
                        batch = np.concatenate([a for a, _ in pending]).astype(np.float32)
                        if self.scale is not None:
                            batch *= self.scale[None, :, None]
                        batch_ids = np.concatenate([c for _, c in pending])
                        pending, need = [], self.batch_size
                        if not self._put((batch, batch_ids)):
                            return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # --- Consumer side -------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.position += self.batch_size
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
