"""Which model an export's slot was trained on, and whether a loaded model is that one.

Extraction records per model slot `activations.models.weights_fingerprint`: the sha256 of a
local model directory's weight files, or "<hub id>@<revision>". `steer` and `ablate` compare a
loaded model with it (`check_identity`) so that a model in the wrong slot is refused.
"""

from __future__ import annotations

import glob
import os
import re

from xcoder_jax import export

_SHA256 = re.compile(r"[0-9a-f]{64}")

# sha256 of a local model directory's weight files, keyed by the directory and the files'
# names, sizes and modification times: a directory is read once per process.
_WEIGHTS_HASHES: dict[tuple, str] = {}


def model_fingerprint(model) -> str | None:
    """The extraction's `weights` fingerprint of a loaded HF model, from where it was loaded.

    Extraction records, per model slot, `activations.models.weights_fingerprint`: the sha256
    of a local model directory's weight files, or "<hub id>@<revision>" for a model read from
    the hub. A loaded model remembers where it came from (`name_or_path`), so this is the
    sha256 of the weight files in that directory (read once per process and directory; later
    calls only look at the files' sizes and times), or the hub id for a model loaded by id (its
    revision is not known from the model and is not compared). None for a model built in
    memory. The files identify the model as it was loaded: changes made to its weights in
    memory since (a fine-tuning step, a dtype cast) are not seen.
    """
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "name_or_path", None
    )
    if not path:
        return None
    path = str(path)
    files = sorted(
        glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))
    )
    if not os.path.isdir(path) or not files:
        return path
    from xcoder_jax.activations.models import weights_fingerprint

    stats = [os.stat(f) for f in files]
    key = (os.path.realpath(path), *((f, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats)))
    if key not in _WEIGHTS_HASHES:
        _WEIGHTS_HASHES[key] = weights_fingerprint(path, None)
    return _WEIGHTS_HASHES[key]


def _same_model(fingerprint: str, recorded: str) -> bool:
    """Whether a `model_fingerprint` is the one recorded at extraction (a weights hash, or
    "<hub id or path>@<revision>", compared without the revision)."""
    return fingerprint == recorded or fingerprint == recorded.rsplit("@", 1)[0]


def _short(fingerprint: str) -> str:
    return f"weights sha256 {fingerprint[:12]}" if _SHA256.fullmatch(fingerprint) else fingerprint


def check_identity(xc, model, model_index: int, who: str = "", fix: str = "") -> None:
    """Raises ExportError unless `model` is the model of slot `model_index`.

    The model's `model_fingerprint` (where it was loaded from) is compared with the ones
    the export records. A model that is the export's model of another slot is refused
    ("this model is the export's distilled model (slot 1), not slot 0 (base)"), and so is
    one that matches no slot, or that was built in memory. Exports that record no
    fingerprints (made elsewhere) are not checked. `who` names the model in the message
    ("this model" / "the model" when empty); `fix` is appended to the other-slot message,
    with "{slot}" replaced by the slot the model is the export's model of.
    `steer` and `ablate` call this unless given check_model=False.
    """
    i = xc.check_slot(model_index)
    prints = xc.model_fingerprints()
    if prints is None:
        return
    fp = model_fingerprint(model)
    matching = [] if fp is None else [s for s, p in enumerate(prints) if _same_model(fp, p)]
    if i in matching:
        return
    if matching:
        o = matching[0]
        raise export.ExportError(
            f"{who or 'this model'} is the export's {xc.role(o)} model (slot {o}), not "
            f"slot {i} ({xc.role(i)}){fix.replace('{slot}', str(o))}"
        )
    what = (
        "it was not loaded from a model directory or hub id, so it cannot be compared "
        "with the models the export records"
        if fp is None
        else f"it is {_short(fp)}"
    )
    recorded = ", ".join(f"slot {s} ({xc.role(s)}) {_short(p)}" for s, p in enumerate(prints))
    raise export.ExportError(
        f"{who or 'the model'} matches neither model of the export ({what}; the export was "
        f"trained on {recorded}); pass check_model=False to use another model on purpose"
    )
