"""Writes an activation store shard by shard, resumably.

Rows arrive document by document in a fixed order. Every full shard is written under
temporary names, renamed, and then recorded by appending a line to the store's shard log
(`shards.jsonl`); the store therefore names only complete shards, and a restarted extraction
resumes right after the last recorded row (document, position) without duplicates or gaps.
The complete manifest, written at the end, lists every shard and replaces the log.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from xcoder_jax import fileio
from xcoder_jax.activations import manifest as mf
from xcoder_jax.errors import ConfigError


class StoreWriter:
    """Appends rows `[T, n_models, d_model]` (raw units) to a store directory.

    Opening a directory that holds an unfinished store with the same `fingerprint` resumes
    it; `resume_point` is then the last (document, position) already on disk and rows at or
    before it are dropped by `add`. A finished store, or one with another fingerprint, is
    an error (the caller decides whether a finished store means "skip").
    """

    def __init__(
        self,
        directory: str,
        *,
        n_models: int,
        d_model: int,
        dtype: str,
        shard_rows: int,
        fingerprint: dict,
        meta: dict,
    ):
        if dtype not in mf.DTYPES:
            raise ConfigError(f"unknown store dtype {dtype!r}; expected one of {sorted(mf.DTYPES)}")
        if shard_rows <= 0:
            raise ConfigError(f"shard_rows must be positive, got {shard_rows}")
        self.directory = directory
        self.n_models, self.d_model, self.dtype = n_models, d_model, dtype
        self.shard_rows = shard_rows
        self.fingerprint = fingerprint
        self.meta = meta
        self.shards: list[dict] = []
        self.resume_point: tuple[int, int] | None = None
        if os.path.exists(os.path.join(directory, mf.MANIFEST)):
            self._resume()
        else:
            os.makedirs(directory, exist_ok=True)
            mf.remove_shard_log(directory)  # a log without its store
            self._write_manifest(complete=False)
        self._acts: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._index: list[np.ndarray] = []
        self._buffered = 0
        # The document of the last row taken for a shard (-1: none yet): a shard's row starts
        # a document where its document differs from the row before it.
        self._last_doc = self.resume_point[0] if self.resume_point else -1
        # One background thread writes shards (conversion, files, fsync, log line) while the
        # caller computes the next rows; at most one shard is in flight, so memory is bounded.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._pending: Future | None = None

    def _resume(self) -> None:
        manifest = mf.read_manifest(self.directory)
        if manifest.get("complete"):
            raise mf.StoreError(f"store {self.directory} is already complete")
        old = manifest.get("fingerprint", {})
        differing = mf.differing_keys(mf.portable(old), mf.portable(self.fingerprint))
        if differing:
            raise mf.StoreError(
                f"{self.directory} holds an unfinished store made with other settings "
                f"(differing: {', '.join(differing)}); remove it or use another workdir"
            )
        self.shards = manifest["shards"]
        if self.shards:
            self.resume_point = tuple(self.shards[-1]["last"])
        # The log first (every shard so far, a torn last line dropped), then the header
        # without shards: whichever a crash leaves, mf.read_manifest finds each shard once.
        mf.write_shard_log(self.directory, self.shards)
        self._write_manifest(complete=False)

    @property
    def rows_written(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def add(self, acts: np.ndarray, tokens: np.ndarray, doc: int, positions: np.ndarray) -> None:
        """Buffers one document's rows and writes every shard that fills up.

        acts: [T, n_models, d_model] raw units; tokens: [T] ids; positions: [T] positions
        of these rows in the document.
        """
        if acts.shape[1:] != (self.n_models, self.d_model):
            raise ValueError(
                f"rows of shape {acts.shape[1:]}, expected {(self.n_models, self.d_model)}"
            )
        if self.resume_point is not None:
            last_doc, last_pos = self.resume_point
            if doc < last_doc:
                return
            if doc == last_doc:
                keep = positions > last_pos
                acts, tokens, positions = acts[keep], tokens[keep], positions[keep]
        if len(positions) == 0:
            return
        index = np.stack([np.full(len(positions), doc), positions], axis=1).astype(np.int32)
        self._acts.append(np.asarray(acts))
        self._tokens.append(np.asarray(tokens, np.int32))
        self._index.append(index)
        self._buffered += len(positions)
        while self._buffered >= self.shard_rows:
            self._wait()
            rows = self._take(self.shard_rows)
            self._pending = self._pool.submit(self._write_shard, *rows)

    def _wait(self) -> None:
        """Waits for the shard in flight; re-raises its error, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The next n buffered rows (acts, tokens, index) and the document of the row before."""
        acts, tokens, index = (np.concatenate(b) for b in (self._acts, self._tokens, self._index))
        self._acts, self._tokens, self._index = [acts[n:]], [tokens[n:]], [index[n:]]
        self._buffered -= n
        prev_doc, self._last_doc = self._last_doc, int(index[n - 1, 0])
        return acts[:n], tokens[:n], index[:n], prev_doc

    def _write_shard(
        self, acts: np.ndarray, tokens: np.ndarray, index: np.ndarray, prev_doc: int
    ) -> None:
        n = len(index)
        k = len(self.shards)
        stored = mf.to_disk(acts, self.dtype)  # [n, n_models, d]
        hashes = {}
        acts_files = []
        for m in range(self.n_models):
            name = mf.acts_name(m, k)
            hashes[name] = mf.save_array(
                os.path.join(self.directory, name), np.ascontiguousarray(stored[:, m])
            )
            acts_files.append(name)
        for name, array in ((mf.tokens_name(k), tokens), (mf.index_name(k), index)):
            hashes[name] = mf.save_array(os.path.join(self.directory, name), array)
        # Statistics of the values as stored, so they describe exactly what readers see.
        sums = mf.shard_sums(mf.from_disk(stored, self.dtype).astype(np.float32))
        stats = mf.stats_name(k)
        fileio.atomic_write_bytes(
            os.path.join(self.directory, stats), lambda f: np.savez(f, **sums)
        )
        record = {
            "id": k,
            "rows": int(n),
            "acts": acts_files,
            "tokens": mf.tokens_name(k),
            "index": mf.index_name(k),
            "stats": stats,
            "sha256": hashes,
            "first": [int(index[0, 0]), int(index[0, 1])],
            "last": [int(index[-1, 0]), int(index[-1, 1])],
            # A document's first stored row starts it (whatever its position: excluded tokens
            # may come first); summed, these count documents.
            "docs_started": int(np.sum(np.diff(index[:, 0], prepend=prev_doc) != 0)),
        }
        mf.append_shard_record(self.directory, record)
        self.shards.append(record)

    def _write_manifest(self, complete: bool, extra: dict | None = None) -> dict:
        manifest = {
            "format_version": mf.FORMAT_VERSION,
            "complete": complete,
            "n_models": self.n_models,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "shard_rows": self.shard_rows,
            "fingerprint": self.fingerprint,
            # An unfinished store's shards are in the log (mf.read_manifest joins them).
            "shards": self.shards if complete else [],
            "n_rows": self.rows_written if complete else 0,
            **self.meta,
            **(extra or {}),
        }
        fileio.atomic_write_json(os.path.join(self.directory, mf.MANIFEST), manifest)
        return manifest

    def close(self) -> dict:
        """Writes the last (short) shard and the final manifest with the statistics."""
        try:
            self._wait()
            if self._buffered:
                self._write_shard(*self._take(self._buffered))
        finally:
            self._pool.shutdown(wait=True)
        if not self.shards:
            raise mf.StoreError(f"no rows were written to {self.directory}")
        return finalize(self.directory, self._write_manifest)


def finalize(directory: str, write_manifest) -> dict:
    """Totals the shards' statistics and writes the manifest marked complete."""
    manifest = mf.read_manifest(directory)
    total = None
    for shard in manifest["shards"]:
        with np.load(os.path.join(directory, shard["stats"])) as z:
            total = mf.add_sums(total, {k: z[k] for k in z.files})
    norms, mean = mf.norm_stats(total, manifest["d_model"])
    fileio.atomic_write_bytes(
        os.path.join(directory, "mean.npy"), lambda f: np.save(f, mean.astype(np.float32))
    )
    complete = write_manifest(
        True,
        {
            "n_docs": sum(s["docs_started"] for s in manifest["shards"]),
            "nonfinite_rows": int(total["n_nonfinite"]),
            "norm": norms,
            "mean": "mean.npy",
        },
    )
    # The complete manifest lists every shard; the log it was built from is no longer needed.
    mf.remove_shard_log(directory)
    return complete


def merge_parts(part_dirs: list[str], directory: str) -> dict:
    """Joins complete stores extracted with `--shard_index/--num_shards` into one manifest.

    Shard files stay where they are; the merged manifest names them by relative path
    (`part-000-of-003/m0_00000.npy`), so merging copies no activations.
    """
    parts = [mf.read_manifest(p) for p in part_dirs]
    # A log left in the merged directory by an abandoned extraction there is not part of it.
    mf.remove_shard_log(directory)
    for p, m in zip(part_dirs, parts):
        if not m.get("complete"):
            raise mf.StoreError(f"cannot merge: {p} is not a complete store")
    strip = lambda fp: {k: v for k, v in fp.items() if k != "shard_index"}
    first = parts[0]
    for p, m in zip(part_dirs[1:], parts[1:]):
        a = strip(mf.portable(first["fingerprint"]))
        b = strip(mf.portable(m["fingerprint"]))
        differing = mf.differing_keys(a, b)
        if differing:
            raise mf.StoreError(f"cannot merge {part_dirs[0]} and {p}: they differ in {differing}")
    indices = sorted(m["fingerprint"].get("shard_index", 0) for m in parts)
    expected = list(range(first["fingerprint"].get("num_shards", 1)))
    if indices != expected:
        raise mf.StoreError(f"cannot merge: have parts {indices}, need {expected}")
    shards = []
    for part_dir, m in zip(part_dirs, parts):
        rel = os.path.relpath(part_dir, directory)
        j = lambda name, rel=rel: f"{rel}/{name}"
        for s in m["shards"]:
            shards.append(
                {
                    **s,
                    "id": len(shards),
                    "acts": [j(a) for a in s["acts"]],
                    "tokens": j(s["tokens"]),
                    "index": j(s["index"]),
                    "stats": j(s["stats"]),
                    "sha256": {j(k): v for k, v in s["sha256"].items()},
                }
            )
    keep = {
        k: v for k, v in first.items() if k not in ("shards", "norm", "mean", "n_docs", "n_rows")
    }
    keep["fingerprint"] = strip(first["fingerprint"])
    keep["parts"] = [os.path.relpath(p, directory) for p in part_dirs]

    def write_manifest(complete: bool, extra: dict) -> dict:
        manifest = {
            **keep,
            "complete": complete,
            "shards": shards,
            "n_rows": sum(s["rows"] for s in shards),
            **extra,
        }
        fileio.atomic_write_json(os.path.join(directory, mf.MANIFEST), manifest)
        return manifest

    write_manifest(False, {})
    return finalize(directory, write_manifest)
