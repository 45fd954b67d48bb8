"""The zoo's files, written so that an interrupted build never leaves a partial one: data
as JSONL swapped in whole, and model dirs written under a temporary name, stamped with what
they were built for (`read_stamp`) and then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil

from xcoder_jax.fileio import atomic_write_bytes, file_mode

STAMP = "zoo_stamp.json"  # inside each finished model dir: the config hash it was built for


def temporary_path(path: str) -> str:
    """A temporary sibling of `path`, unique per process so concurrent builds never share one."""
    return f"{path}.tmp{os.getpid()}"


def write_jsonl(path: str, rows: list) -> None:
    """One JSON object a line: a dict as it is, a string as {"text": ...}."""
    lines = (json.dumps(r if isinstance(r, dict) else {"text": r}, allow_nan=False) for r in rows)
    data = "".join(line + "\n" for line in lines).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def save_model_atomic(model, tokenizer, path: str, stamp: dict) -> None:
    """Write a model dir under a temporary name, then swap it in: a dir at `path` is always
    complete."""
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(stamp, f, allow_nan=False)
    for name in os.listdir(tmp):  # save_pretrained writes its weights 0600, the rest 0644
        os.chmod(os.path.join(tmp, name), file_mode())
    if os.path.exists(path):  # a directory cannot be renamed onto a non-empty one
        old = temporary_path(path) + "old"
        os.replace(path, old)
        shutil.rmtree(old)
    os.replace(tmp, path)


def read_stamp(path: str) -> dict | None:
    """What a finished model dir was built for ({"weights": ..., "training": ...})."""
    try:
        with open(os.path.join(path, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_stamped(path: str, weights: dict) -> bool:
    """Whether the model dir at `path` is finished and was built for `weights`."""
    stamp = read_stamp(path)
    return stamp is not None and stamp.get("weights") == weights
