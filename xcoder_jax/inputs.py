"""The files and models a config names, checked before any stage computes: `check(config)`.

A local path that does not exist is named as such (a model directory, a data file or glob,
the prompts file, a relation file). A hub id that is neither a local directory nor in the
local hub cache is refused at once when the hub cannot be reached, instead of after the hub
client's retries.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from xcoder_jax.errors import MissingInputError

ZOO = "zoo"  # a model name meaning the embedded pair (workdir.model_dir)


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode, no route), or None when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return False
    return True


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name": exactly one slash, no leading . / ~)."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def model_problem(field: str, name: str, revision: str | None = None) -> str | None:
    """Why the model `name` (a local directory or a hub id) cannot be loaded, or None."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            return f"{field} = {name!r}: the directory holds no config.json (not a saved model)"
        return None
    if _looks_local(name) or os.path.exists(path):
        return f"{field} = {name!r}: no such directory"
    if _in_hub_cache(name, revision):
        return None
    why = _hub_unreachable()
    if why is None:
        return None
    return (
        f"{field} = {name!r}: not a local directory nor in the local hub cache, and the hub "
        f"cannot be reached ({why}); download it where the hub is reachable and pass its path"
    )


def _file_problem(field: str, path: str) -> str | None:
    return None if os.path.isfile(path) else f"{field} = {path!r}: no such file"


def problems(config) -> list[str]:
    """Every input `config` names that does not exist or cannot be reached."""
    from xcoder_jax.activations.sources import FILE_KINDS, data_paths

    out = []
    models = config.get("models")
    for role in ("base", "distilled"):
        name = models.get(role) if models is not None else None
        if name and name != ZOO:
            out.append(model_problem(f"models.{role}", name, models.get(f"{role}_revision")))
    data = config.get("data")
    for i, source in enumerate(data.get("sources", ()) if data is not None else ()):
        if source.get("kind") in FILE_KINDS:
            try:
                data_paths(source.get("path", ""))
            except MissingInputError as e:
                out.append(f"data.sources[{i}].path: {e}")
    steering = config.get("steering")
    if steering is not None and steering.get("prompts"):
        out.append(_file_problem("steering.prompts", steering.prompts))
    geometry = config.get("geometry")
    if geometry is not None:
        for path in geometry.get("relation_files", ()):
            out.append(_file_problem("geometry.relation_files", path))
        for i, pair in enumerate(geometry.get("pairs", ())):
            for role in ("base", "distilled"):
                name = pair.get(role)
                if name and name != ZOO:
                    out.append(model_problem(f"geometry.pairs[{i}].{role}", name))
    return [p for p in out if p]


def check(config) -> None:
    """Raises MissingInputError listing every missing input of `config`, in one line."""
    found = problems(config)
    if found:
        raise MissingInputError("; ".join(found))
