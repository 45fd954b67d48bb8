"""The ckkissane crosscoder-model-diff-replication format (the paper's own code reads it).

    <dir>/cc_weights.pt     torch state dict: W_enc [2, d, h], W_dec [h, 2, d], b_enc [h],
                            b_dec [2, d] (float32; their CrossCoder loads it strictly)
    <dir>/cfg.json          their training config (`d_in`, `dict_size`, `hook_point`, ...)
    <dir>/xcoder_jax.json   the scales their format lacks, and our facts (`common.SIDECAR`)

Their model A is the base, B the fine-tuned model. Their CrossCoder takes NORMALISED
activations: training scales each model's activations by sqrt(d_in) / mean norm (their
buffer's `normalisation_factor`, our scale s_m) and does not save the factors, so the
weights here are in normalised units and the factors are in the sidecar:

    f = ReLU(sum_m (x_m * s_m) W_enc[m] + b_enc);   x_hat_m = (f W_dec[:, m] + b_dec[m]) / s_m

Their encoder is a plain ReLU: a BatchTopK or Matryoshka crosscoder (a JumpReLU) has no
form here.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from xcoder_jax import export, fileio
from xcoder_jax.formats import common
from xcoder_jax.formats.common import FormatError

WEIGHTS, CONFIG = "cc_weights.pt", "cfg.json"
TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


def write(directory: str, view: dict[str, np.ndarray], facts: dict, train: dict) -> None:
    """Writes `view` (`common.normalised_view`) as cc_weights.pt + cfg.json + sidecar.

    train: our training settings for cfg.json (seed, batch_size, lr, l1_coeff, beta1,
    beta2, dec_init_norm, seq_len); keys their config has and ours lacks are null.
    """
    if "threshold" in view:
        kind = facts.get("loss") or "BatchTopK"
        raise FormatError(
            "the ckkissane CrossCoder encodes with a plain ReLU and has no threshold: a "
            f"{kind} crosscoder (a JumpReLU) cannot be written in that format"
        )
    m, d, h = view["W_enc"].shape
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
    state = {n: t(view[n]) for n in TENSORS}
    models = facts.get("models") or []
    layer = facts.get("layer")
    cfg = {
        **{k: train.get(k) for k in ("seed", "batch_size", "lr", "l1_coeff", "beta1", "beta2")},
        "num_tokens": facts.get("tokens_trained"),
        "d_in": d,
        "dict_size": h,
        "seq_len": train.get("seq_len"),
        "enc_dtype": "fp32",
        "model_name": models[0].get("source") if models else None,
        "site": "resid_pre",
        "device": "cpu",
        "dec_init_norm": train.get("dec_init_norm"),
        "hook_point": None if layer is None else f"blocks.{layer}.hook_resid_pre",
        # Their training loop's own settings: nothing of ours corresponds.
        **{k: None for k in ("buffer_mult", "model_batch_size", "log_every", "save_every")},
        **{k: None for k in ("wandb_project", "wandb_entity")},
    }
    os.makedirs(directory, exist_ok=True)
    fileio.atomic_write_path(os.path.join(directory, WEIGHTS), lambda p: torch.save(state, p))
    fileio.atomic_write_json(os.path.join(directory, CONFIG), cfg)
    common.write_sidecar(directory, facts)


def read(directory: str) -> tuple[dict, dict]:
    """(view, facts): normalised-unit tensors (A = base first) with `scales` from the
    sidecar (None without one), and the facts the sidecar and cfg.json state (layer from
    `hook_point`, d_model from `d_in`)."""
    missing = "not a ckkissane crosscoder directory: {path} missing"
    wpath, _, cfg = export.read_pair(directory, WEIGHTS, CONFIG, FormatError, missing)
    state = torch.load(wpath, map_location="cpu", weights_only=True)
    missing = [n for n in TENSORS if n not in state]
    if missing:
        raise FormatError(f"{wpath} lacks {missing}")
    view = {n: state[n].float().numpy() for n in TENSORS}
    m, d, h = view["W_enc"].shape
    if view["W_dec"].shape != (h, m, d) or cfg.get("d_in", d) != d:
        raise FormatError(
            f"{wpath}: W_enc {view['W_enc'].shape} and W_dec {view['W_dec'].shape} (d_in "
            f"{cfg.get('d_in')}) do not fit together"
        )
    side = common.read_sidecar(directory) or {}
    view["scales"] = None if side.get("scales") is None else np.asarray(side["scales"], np.float32)
    facts = dict(side)
    hook = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", str(cfg.get("hook_point")))
    if facts.get("layer") is None and hook:
        facts["layer"] = int(hook.group(1))
    facts.setdefault("d_model", cfg.get("d_in"))
    return view, facts
