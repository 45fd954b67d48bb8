"""Reads an activation store: whole shards, chosen rows, and a shuffled batch stream.

The batch stream never holds more than a few shards in memory: each epoch visits the shards
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
            if expected is not None and mf.sha256_file(path) != expected:
                raise mf.StoreError(
                    f"checksum mismatch in {path}: the shard is corrupted or truncated"
                )
            self._verified.add(name)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise mf.StoreError(f"cannot read {path} (truncated or corrupted): {e}") from e

    def shard_acts(self, k: int) -> np.ndarray:
        """Shard k's activations `[rows, n_models, d_model]`, raw units, 2-byte floats."""
        shard = self.shards[k]
        cols = [mf.from_disk(self._load(name), self.manifest["dtype"]) for name in shard["acts"]]
        for name, col in zip(shard["acts"], cols):
            if col.shape != (shard["rows"], self.d_model):
                raise mf.StoreError(
                    f"{name} has shape {col.shape}, expected {(shard['rows'], self.d_model)}"
                )
        return np.stack(cols, axis=1)

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

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows by global id: `[len(ids), n_models, d_model]` float32, raw units."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.n_models, self.d_model), np.float32)
        shard_of = np.searchsorted(self.shard_offsets, ids, side="right") - 1
        for k in np.unique(shard_of):
            sel = shard_of == k
            out[sel] = self.shard_acts(int(k))[ids[sel] - self.shard_offsets[k]]
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

    `shards` restricts the stream to some shards (a held-out split, or one host's share).
    `start` is a position (rows consumed) to resume from; `position` is the current one.
    With `normalise=True` each model's rows are multiplied by its store scale. Batches are
    produced by a background thread `prefetch` ahead. Each batch comes with its rows'
    global ids `[batch]` (int64), so a trainer can count the distinct rows it has seen.
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

    def _load_group(
        self, epoch: int, g: int, shards: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(acts in store order, their global ids shuffled, the shuffling permutation)."""
        acts = np.concatenate([self.store.shard_acts(int(k)) for k in shards])
        ids = np.concatenate(
            [
                np.arange(self.store.shard_offsets[k], self.store.shard_offsets[k + 1])
                for k in shards
            ]
        )
        perm = np.random.default_rng([self.seed, epoch, g]).permutation(len(ids))
        return acts, ids[perm], perm

    def _rows_from(self, position: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """Yields (group acts, shuffled ids, permutation, first index to use) per shard group
        of the endless row sequence starting at `position`."""
        epoch, offset = divmod(position, self.epoch_rows)
        while True:
            seen = 0
            for g, shards in enumerate(self._groups(epoch)):
                size = sum(self.store.shards[k]["rows"] for k in shards)
                if offset >= seen + size:
                    seen += size
                    continue
                acts, ids, perm = self._load_group(epoch, g, shards)
                lo = offset - seen
                yield acts, ids, perm, lo
                seen += size
                offset = seen
            epoch, offset = epoch + 1, 0

    def _produce(self, position: int) -> None:
        try:
            pending: list[tuple[np.ndarray, np.ndarray]] = []
            need = self.batch_size
            for acts, ids, perm, lo in self._rows_from(position):
                while lo < len(ids):
                    take = min(need, len(ids) - lo)
                    pending.append((acts[perm[lo : lo + take]], ids[lo : lo + take]))
                    lo += take
                    need -= take
                    if need == 0:
                        batch = np.concatenate([a for a, _ in pending]).astype(np.float32)
                        if self.scale is not None:
                            batch *= self.scale[None, :, None]
                        batch_ids = np.concatenate([i for _, i in pending])
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
