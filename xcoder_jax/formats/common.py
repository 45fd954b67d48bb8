"""What the other formats share: our export seen in normalised units, base model first.

Both dictionary_learning and the ckkissane replication keep their weights in the units the
crosscoder was trained in (normalised activations) with the base model in slot 0, so every
writer starts from `normalised_view` of an export, and every reader ends in
`export.export`, which folds the scales back in (raw units) and writes our directory.
SAELens keeps raw units: its writer starts from `raw_view`, its reader divides the scales out.
A sidecar `xcoder_jax.json` beside a converted crosscoder keeps what their formats have no
field for: the per-model scales, the site (block L), the models and the tokenizer (and a
Matryoshka crosscoder's `latent_groups` and the dedicated latents' `exclusive` ranges).
"""

from __future__ import annotations

import json
import os

import numpy as np

from xcoder_jax import exclusive, export, fileio
from xcoder_jax.errors import XcoderError

SIDECAR = "xcoder_jax.json"
BASE_FIRST = ["base", "distilled"]
# Loss kinds whose inference encoder is a JumpReLU with a learned per-latent threshold.
THRESHOLD_LOSSES = ("batchtopk", "matryoshka")


class FormatError(XcoderError, ValueError):
    """A crosscoder in another format that cannot be read, written or used with this store."""


def normalised_view(tensors: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """An export's tensors in NORMALISED units with the base model in slot 0.

    Returns W_enc [m, d, h], b_enc [h], W_dec [h, m, d], b_dec [m, d] (float32), the scales
    [m] (normalised = raw * scale) and, for BatchTopK, `threshold` [h] on f (unit-free).
    """
    order = [export.role_order(config).index(r) for r in BASE_FIRST]
    s = np.asarray(config["scales"], np.float32)[order]
    out = {
        "W_enc": np.asarray(tensors["W_enc"], np.float32)[order] / s[:, None, None],
        "b_enc": np.asarray(tensors["b_enc"], np.float32),
        "W_dec": np.asarray(tensors["W_dec"], np.float32)[:, order] * s[None, :, None],
        "b_dec": np.asarray(tensors["b_dec"], np.float32)[order] * s[:, None],
        "scales": s,
    }
    if "threshold" in tensors:
        out["threshold"] = np.asarray(tensors["threshold"], np.float32)
    return out


def raw_view(tensors: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """An export's tensors as they are (RAW units, float32), base model in slot 0, with the
    scales [m] and, for BatchTopK, `threshold` [h]."""
    order = [export.role_order(config).index(r) for r in BASE_FIRST]
    out = {
        "W_enc": np.asarray(tensors["W_enc"], np.float32)[order],
        "b_enc": np.asarray(tensors["b_enc"], np.float32),
        "W_dec": np.asarray(tensors["W_dec"], np.float32)[:, order],
        "b_dec": np.asarray(tensors["b_dec"], np.float32)[order],
        "scales": np.asarray(config["scales"], np.float32)[order],
    }
    if "threshold" in tensors:
        out["threshold"] = np.asarray(tensors["threshold"], np.float32)
    return out


def rescaled(view: dict, scales: np.ndarray) -> dict:
    """`view` (normalised units of view["scales"], base first) in the normalised units of
    `scales` [m], the raw-unit crosscoder unchanged: for weights that take raw activations,
    the scales only say in which units decoder norms are compared."""
    r = np.asarray(scales, np.float32) / np.asarray(view["scales"], np.float32)
    return {
        **view,
        "W_enc": view["W_enc"] / r[:, None, None],
        "W_dec": view["W_dec"] * r[None, :, None],
        "b_dec": view["b_dec"] * r[:, None],
        "scales": np.asarray(scales, np.float32),
    }


def sidecar(config: dict, fmt: str) -> dict:
    """The facts of an export that the other formats cannot hold, models in base-first order
    (and a Matryoshka crosscoder's `latent_groups`, which only its training used, and the
    dedicated latents' ranges `exclusive`, by side name: `exclusive.record`)."""
    order = [export.role_order(config).index(r) for r in BASE_FIRST]
    models = config.get("models") or [{"role": r} for r in BASE_FIRST]
    groups = config.get("latent_groups")
    ranges = config.get(exclusive.KEY)
    return {
        **({"latent_groups": list(groups)} if groups else {}),
        **({exclusive.KEY: {s: list(r) for s, r in ranges.items()}} if ranges else {}),
        "written_by": "xcoder_jax",
        "format": fmt,
        "roles": BASE_FIRST,
        "scales": [float(config["scales"][i]) for i in order],
        "scales_meaning": "normalised = raw * scale, per model (sqrt(d_model) / mean raw norm); "
        "the weights here are in normalised units",
        "layer": config.get("layer"),
        "site": "input of block `layer` (resid_pre)",
        "d_model": config.get("d_model"),
        "models": [models[i] for i in order] if len(models) == len(order) else models,
        "tokenizer_sha256": config.get("tokenizer_sha256"),
        "loss": config.get("loss"),
        "tokens_trained": config.get("tokens_trained"),
    }


def write_sidecar(directory: str, facts: dict) -> None:
    fileio.atomic_write_json(os.path.join(directory, SIDECAR), facts)


def read_sidecar(directory: str) -> dict | None:
    path = os.path.join(directory, SIDECAR)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def threshold_on_f(theta_weighted, w_dec: np.ndarray) -> np.ndarray:
    """Per-latent threshold on f [h] from a threshold on decoder-norm-weighted f.

    theta_weighted: scalar or [h]; w_dec: [h, m, d] in the units the weighting used. The
    weight of latent i is sum_m ||W_dec[i, m]||_2 (dictionary_learning's CROSSCODER code
    normalisation, and ours).
    """
    norms = np.sqrt(np.square(w_dec.astype(np.float64)).sum(-1)).sum(-1)
    return (np.asarray(theta_weighted, np.float64) / np.maximum(norms, 1e-12)).astype(np.float32)


def weighted_threshold(threshold_f: np.ndarray, w_dec: np.ndarray) -> float:
    """The one threshold on decoder-norm-weighted f that a per-latent threshold on f [h]
    comes from; FormatError when the latents' weighted thresholds differ (a format with a
    single threshold cannot hold them)."""
    norms = np.sqrt(np.square(w_dec.astype(np.float64)).sum(-1)).sum(-1)
    theta = threshold_f.astype(np.float64) * norms
    alive = norms > 0
    if not alive.any():
        return 0.0
    lo, hi = theta[alive].min(), theta[alive].max()
    if hi - lo > 1e-5 * max(abs(hi), 1e-12):
        raise FormatError(
            f"the latents' thresholds on decoder-norm-weighted f range from {lo:.6g} to "
            f"{hi:.6g}; a BatchTopKCrossCoder holds a single threshold"
        )
    return float(np.median(theta[alive]))
