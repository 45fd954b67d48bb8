"""The portable export: crosscoder.safetensors + config.json, in raw activation units.

The export is the only thing analysis and steering read. Its weights are in RAW activation
units: the store's normalisation scales s_m (normalised = raw * s_m) are folded in,

    W_enc_raw[m] = s_m W_enc[m]          b_enc_raw = b_enc
    W_dec_raw[:, m] = W_dec[:, m] / s_m   b_dec_raw[m] = b_dec[m] / s_m

so that f(x_raw) and x_hat_raw follow the same formulas as in training. The scales are kept
in config.json: relative decoder norms must be compared in normalised units
(`normalised_decoder`). The config's `models` name the role of each model slot
(`role_order`), and its `weights_sha256` the weights file's hash (`check_export`). A
Matryoshka crosscoder's config also lists its `latent_groups`: the sizes of its consecutive
groups of latents, in latent order (`exported.ExportedCrosscoder.latent_groups`).

Writing, reading and validating need NumPy and safetensors only; the "torch" and "jax"
backends of `load_export` import their framework when asked for.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from xcoder_jax import fileio
from xcoder_jax.errors import XcoderError

EXPORT_WEIGHTS = "crosscoder.safetensors"
EXPORT_CONFIG = "config.json"
REQUIRED_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
WEIGHTS_SHA256 = "weights_sha256"  # config.json's hash of crosscoder.safetensors


def export(
    directory: str,
    weights: dict[str, np.ndarray],
    scales: np.ndarray,
    meta: dict,
) -> None:
    """Writes crosscoder.safetensors (raw units) and config.json.

    weights: normalised-unit W_enc [m, d, h], b_enc [h], W_dec [h, m, d], b_dec [m, d], and
    for BatchTopK and Matryoshka `threshold` [h] (on f, i.e. JumpReLU thresholds). scales: [m].
    """
    s = np.asarray(scales, np.float32)
    raw = {
        "W_enc": np.asarray(weights["W_enc"], np.float32) * s[:, None, None],
        "b_enc": np.asarray(weights["b_enc"], np.float32),
        "W_dec": np.asarray(weights["W_dec"], np.float32) / s[None, :, None],
        "b_dec": np.asarray(weights["b_dec"], np.float32) / s[:, None],
    }
    if "threshold" in weights:
        raw["threshold"] = np.asarray(weights["threshold"], np.float32)
    # Strict JSON (a NaN/inf in `meta` raises ValueError), serialised before any file is
    # written so that a refused config leaves no new weights without their config.
    config = {**meta, "scales": [float(x) for x in s], "units": "raw"}
    json.dumps(config, allow_nan=False)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in raw.items()}
    wpath = os.path.join(directory, EXPORT_WEIGHTS)
    fileio.atomic_write_path(wpath, lambda tmp: save_file(tensors, tmp))
    # The config last: its presence marks a complete export, and the weights' hash in it
    # lets every reader tell a truncated or corrupted file from the one written here.
    config[WEIGHTS_SHA256] = fileio.sha256_file(wpath)
    fileio.atomic_write_json(os.path.join(directory, EXPORT_CONFIG), config)


def read_pair(directory: str, weights: str, config: str, error, missing: str):
    """(weights path, config path, the parsed JSON config) of a directory holding a weights
    file and a JSON config, as every crosscoder format does; raises `error(missing.format(
    path=...))` naming the first file that is not there."""
    wpath, cpath = (os.path.join(directory, n) for n in (weights, config))
    for p in (wpath, cpath):
        if not os.path.exists(p):
            raise error(missing.format(path=p))
    with open(cpath) as f:
        return wpath, cpath, json.load(f)


class ExportError(XcoderError, ValueError):
    """An export directory that is missing, incomplete or inconsistent."""


def _damaged(directory: str, why: str) -> ExportError:
    return ExportError(
        f"the export at {directory} is damaged ({why}): rerun training (launch/train.py or "
        "launch/pipeline.py) to write it again from the last checkpoint"
    )


def check_export(directory: str) -> tuple[str, dict]:
    """(weights path, config) of an intact export; raises ExportError otherwise.

    Intact: both files exist, config.json parses, and the weights hash to the config's
    `weights_sha256` (exports written elsewhere, without it, are only checked to be a
    complete safetensors file: header, and data as long as the header says).
    """
    missing = "export file missing: {path}"
    try:
        wpath, _, config = read_pair(directory, EXPORT_WEIGHTS, EXPORT_CONFIG, ExportError, missing)
    except json.JSONDecodeError as e:
        raise _damaged(directory, f"{EXPORT_CONFIG} is not JSON: {e}") from e
    expected = config.get(WEIGHTS_SHA256)
    if expected is not None:
        if fileio.sha256_file(wpath) != expected:
            raise _damaged(directory, f"{EXPORT_WEIGHTS} does not match its recorded sha256")
        return wpath, config
    size = os.path.getsize(wpath)
    try:
        with open(wpath, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise _damaged(directory, f"{EXPORT_WEIGHTS} has no readable header")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise _damaged(directory, f"{EXPORT_WEIGHTS} holds {size} bytes, its header {8 + n + end}")
    return wpath, config


def load_export(directory: str, backend: str = "numpy"):
    """(tensors, config) from an export directory.

    backend "numpy": dict of arrays; "torch": dict of float32 tensors; "jax": a
    `Crosscoder` module in RAW units (its scales are 1).
    """
    wpath, config = check_export(directory)
    try:
        tensors = load_file(wpath)
    except Exception as e:  # safetensors' own errors: a header or data it cannot read
        raise _damaged(directory, f"unreadable: {e}") from e
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise ExportError(f"{wpath} lacks tensors {missing}")
    m, d, h = tensors["W_enc"].shape
    if tensors["W_dec"].shape != (h, m, d):
        raise ExportError(f"W_dec has shape {tensors['W_dec'].shape}, expected {(h, m, d)}")
    if backend == "numpy":
        return tensors, config
    if backend == "torch":
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, config
    if backend == "jax":
        return to_module(tensors, config), config
    raise ValueError(f"unknown backend {backend!r} (numpy, torch, jax)")


def to_module(tensors: dict[str, np.ndarray], config: dict | None = None):
    """A `Crosscoder` holding the given (raw-unit) tensors, with the dedicated latents the
    export's `config` records (`exclusive.from_export`; its weights hold the zeros)."""
    import jax.numpy as jnp
    from flax import nnx

    from xcoder_jax import exclusive
    from xcoder_jax.crosscoder import Crosscoder

    m, d, h = tensors["W_enc"].shape
    model = Crosscoder(m, d, h, rngs=nnx.Rngs(0), exclusive=exclusive.export_counts(config, h))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(model, name)[...] = jnp.asarray(tensors[name])
    if "threshold" in tensors:
        # Exported thresholds are on f; the module's are on decoder-norm-weighted f.
        model.threshold[...] = jnp.asarray(tensors["threshold"]) * model.decoder_norms().sum(-1)
    return model


def role_order(export_config: dict) -> list[str]:
    """The roles of the crosscoder's model slots, in slot order: those the export names, or
    base then distilled when it names none (exports made elsewhere)."""
    roles = [m.get("role") for m in export_config.get("models") or []]
    return roles if sorted(roles) == ["base", "distilled"] else ["base", "distilled"]


def normalised_decoder(tensors: dict[str, np.ndarray], config: dict) -> np.ndarray:
    """W_dec [h, m, d] back in normalised units, where relative decoder norms are compared."""
    return tensors["W_dec"] * np.asarray(config["scales"], np.float32)[None, :, None]
