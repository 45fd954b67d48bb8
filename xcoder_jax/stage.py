"""What every stage after training shares: content fingerprints, skip-if-done, one commit.

A stage is its science as a function that returns a results dict, framed by two calls:

    old = stage.done(out_dir, "results.json", fingerprint, ["figure.png"])
    if old is not None:
        return old
    ... compute results ...
    return stage.commit(out_dir, "results.json", results, {"figure.png": draw})

`commit` writes every output under a unique temporary name (fsynced, then renamed) and the
results file LAST, in strict JSON carrying the fingerprint; `done` accepts a results file
only when every output exists and its fingerprint equals the current one, and removes it
otherwise, before the stage replaces any output. A results file on disk therefore always
belongs to complete outputs of its own run, and a killed stage simply runs again.
Fingerprints hold content (hashes of files, config values), never paths inside the workdir,
so a moved workdir still skips its finished stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

from xcoder_jax import export, fileio
from xcoder_jax import workdir as wd


def canonical(obj):
    """`obj` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, default=str))


def digest(obj) -> str:
    """sha256 of `obj`'s canonical JSON: a short content fingerprint of a config section."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(fmt: int, p, **inputs) -> dict:
    """A stage's fingerprint, the one way every stage builds it: its output format version,
    the fields it declared as changing what it computes (`params.StageParams`), and its
    inputs by content (export and store hashes, a prompts file's sha256, ...)."""
    return {"format": fmt, "params": p.fingerprint(), **inputs}


def file_sha(path: str) -> str | None:
    """sha256 of a file, None when it does not exist."""
    return fileio.sha256_file(path) if os.path.exists(path) else None


def export_hash(workdir: str) -> dict:
    """The export's files by content."""
    ed = wd.export_dir(workdir)
    return {n: file_sha(os.path.join(ed, n)) for n in (export.EXPORT_WEIGHTS, export.EXPORT_CONFIG)}


def done(directory: str, results: str, fingerprint: dict, outputs=()) -> dict | None:
    """The stored results when they and every output exist and match `fingerprint`.

    Otherwise the stage is about to run: a results file left by another run is removed here,
    before any output is replaced, so an interrupted run can never leave old results beside
    new outputs (which a later run with the old settings would take as done).
    """
    path = os.path.join(directory, results)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        stored = json.load(f)
    complete = all(os.path.exists(os.path.join(directory, p)) for p in outputs)
    if complete and stored.get("fingerprint") == canonical(fingerprint):
        return stored
    os.remove(path)
    return None


def commit(
    directory: str,
    results_name: str,
    results: dict,
    outputs: dict[str, Callable[[str], None]] | None = None,
) -> dict:
    """Writes `outputs` ({name: writer(path)}) atomically, then `results` (strict JSON).

    Each writer gets a temporary path with the output's extension (so matplotlib and others
    infer the format); it is renamed into place once written. Returns the results as they
    read back from disk.
    """
    text = json.dumps(results, allow_nan=False)  # refuse NaN before anything is written
    os.makedirs(directory, exist_ok=True)
    for name, write in (outputs or {}).items():
        fileio.atomic_write_path(os.path.join(directory, name), write)
    fileio.atomic_write_json(os.path.join(directory, results_name), results)
    return json.loads(text)
