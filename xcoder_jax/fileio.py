"""Durable files: atomic writes, content hashes, the mode a new file gets.

Every file the library writes goes through one of the atomic writers: it is written under a
temporary name unique to the process, fsynced, given the mode a plain `open(path, "w")` would
give it (`file_mode`), then renamed onto its path. A reader therefore never sees a partly
written file, whatever kills the writer. Hashes are sha256, of whole files
(`sha256_file`) or of the bytes on their way to disk (`HashingWriter`).

This module needs only the standard library: the store, the export, the zoo and every stage
import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere
    set and restored at once (another thread creating a file in between gets umask 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0o666 less the umask. Every
    atomic writer gives it to the file it writes, whatever mode its writer created the
    temporary file with (safetensors and torch.save create theirs 0o600)."""
    return 0o666 & ~current_umask()


def atomic_write_path(path: str, write) -> None:
    """Writes a file through `write(tmp_path)` (for writers that want a path: safetensors,
    matplotlib), under a temporary name unique to this process with `path`'s extension (so
    a writer can infer the format), fsynced, given `file_mode()`, then renamed onto `path`."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"the writer of {path} wrote nothing")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, write) -> None:
    """Writes a file through `write(fileobj)` under a temporary name, gives it `file_mode()`
    (also when a temporary file left by a crashed run had another), then renames it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes `obj` as strict JSON (NaN/inf raise ValueError before anything is written)."""
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


class HashingWriter:
    """A file object that hashes every byte on its way to disk (no second read)."""

    def __init__(self, f):
        self._f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self._f.write(data)


def fsync_dir(directory: str) -> None:
    """Makes the renames and file creations in `directory` durable (POSIX: a file's data
    can reach the disk before the directory entry that names it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
