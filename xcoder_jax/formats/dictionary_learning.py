"""dictionary_learning's `save_pretrained` directory (CrossCoder, BatchTopKCrossCoder).

    <dir>/model.safetensors   encoder.weight [m, d, h], encoder.bias [h],
                              decoder.weight [m, h, d], decoder.bias [m, d],
                              code_normalization_id [], target_rms [],
                              activation_mean [m, d], activation_std [m, d],
                              activation_global_scale [m];  BatchTopK also k [], threshold []
    <dir>/config.json         the constructor's arguments and `dict_class`
    <dir>/xcoder_jax.json     our facts (scales, block L, models, tokenizer): `common.SIDECAR`

Their model takes RAW activations when its activation normaliser is set: it computes
x_n = (x - activation_mean) * activation_global_scale[m], encodes and decodes x_n, and
returns x_hat_n / (activation_global_scale[m] + 1e-8) + activation_mean. We write mean 0
and global scale = our per-model scale s_m, so the weights stay in NORMALISED units. That
keeps what their code derives from the decoder equal to ours: the code normalisation
sum_m ||decoder.weight[m, i]||_2 that BatchTopK thresholds (one threshold on weighted f,
ours too) and that the diffing toolkit's `dec_norm_diff` reads. Folding s_m into the
weights instead would change those norms, and one BatchTopK threshold could no longer
express our encoder. The 1e-8 in their denormalisation moves x_hat by a relative 1e-8 / s_m.

A Matryoshka crosscoder is written as a BatchTopKCrossCoder: its inference is the same
JumpReLU. Their crosscoder classes have no latent groups; the groups, which only its
training used, are kept in the sidecar as `latent_groups` (and come back on import).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xcoder_jax import export, fileio
from xcoder_jax.formats import common
from xcoder_jax.formats.common import FormatError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# CodeNormalization is an Enum of auto() values: CROSSCODER = 1, SAE, MIXED, NONE,
# DECOUPLED = 5. CROSSCODER is the crosscoder's own (sum of per-model decoder L2 norms).
CROSSCODER_CODE_NORM, DECOUPLED_CODE_NORM = 1, 5
CLASSES = ("CrossCoder", "BatchTopKCrossCoder")
TENSORS = (
    "encoder.weight",
    "encoder.bias",
    "decoder.weight",
    "decoder.bias",
    "code_normalization_id",
    "target_rms",
    "activation_mean",
    "activation_std",
    "activation_global_scale",
)


def write(directory: str, view: dict[str, np.ndarray], facts: dict, k: int | None) -> None:
    """Writes `view` (`common.normalised_view`: normalised units, base first) as a
    save_pretrained directory; `k` is BatchTopK's k (its `k` buffer), unused for L1."""
    m, d, h = view["W_enc"].shape
    s = view["scales"].astype(np.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
    state = {
        "encoder.weight": t(view["W_enc"]),
        "encoder.bias": t(view["b_enc"]),
        "decoder.weight": t(view["W_dec"].transpose(1, 0, 2)),
        "decoder.bias": t(view["b_dec"]),
        "code_normalization_id": torch.tensor(CROSSCODER_CODE_NORM),
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.zeros(m, d),
        # Consistent with the global scale their constructor would compute from it,
        # target_rms / sqrt(sum_d std^2) = s_m; only the global scale is used.
        "activation_std": t(np.broadcast_to(1.0 / (s[:, None] * np.sqrt(d)), (m, d))),
        "activation_global_scale": t(s),
    }
    config = {
        "activation_dim": d,
        "dict_size": h,
        "num_layers": m,
        "code_normalization": "CROSSCODER",
        "dict_class": "CrossCoder",
    }
    if "threshold" in view:
        theta = common.weighted_threshold(view["threshold"], view["W_dec"])
        state["k"] = torch.tensor(int(k), dtype=torch.int32)
        state["threshold"] = torch.tensor(theta, dtype=torch.float32)
        config.update(dict_class="BatchTopKCrossCoder", k=int(k))
    os.makedirs(directory, exist_ok=True)
    fileio.atomic_write_path(os.path.join(directory, WEIGHTS), lambda p: save_file(state, p))
    fileio.atomic_write_json(os.path.join(directory, CONFIG), config)
    common.write_sidecar(directory, {**facts, "k": k if "threshold" in view else None})


def read(directory: str) -> tuple[dict, dict]:
    """(view, facts) of a save_pretrained directory. view: normalised-unit tensors, base
    first, as `common.normalised_view` gives them, with `scales` None when the file has no
    activation normaliser; facts: the sidecar's, or {} for a crosscoder trained elsewhere.

    An activation mean is folded into the biases (b_enc -= sum_m s_m mean_m W_enc[m],
    b_dec[m] += s_m mean_m), so the encoder stays a linear map of x_n = raw * s.
    """
    missing = "not a dictionary_learning save_pretrained directory: {path} missing"
    wpath, cpath, config = export.read_pair(directory, WEIGHTS, CONFIG, FormatError, missing)
    cls = config.get("dict_class")
    if cls not in CLASSES:
        raise FormatError(f"{cpath}: dict_class {cls!r} is not a crosscoder ({', '.join(CLASSES)})")
    state = {k: v.float().numpy() for k, v in load_file(wpath).items()}
    missing = [
        n for n in TENSORS + (("threshold",) if cls != "CrossCoder" else ()) if n not in state
    ]
    if missing:
        raise FormatError(f"{wpath} lacks {missing} (a {cls} saves them all)")
    code_norm = int(state["code_normalization_id"])
    if code_norm == DECOUPLED_CODE_NORM or (cls != "CrossCoder" and code_norm != 1):
        raise FormatError(
            f"{wpath}: code normalisation id {code_norm} is not supported (BatchTopK needs "
            f"CROSSCODER = {CROSSCODER_CODE_NORM}; DECOUPLED has per-model latents)"
        )
    w_enc = state["encoder.weight"]
    w_dec = state["decoder.weight"].transpose(1, 0, 2)  # [h, m, d]
    b_enc, b_dec = state["encoder.bias"].copy(), state["decoder.bias"].copy()
    mean, std = state["activation_mean"], state["activation_std"]
    scales = None
    if not (np.isnan(mean).any() or np.isnan(std).any()):  # their has_activation_normalizer
        scales = state["activation_global_scale"].astype(np.float32)
        shift = mean * scales[:, None]  # [m, d] the mean in normalised units
        b_enc -= np.einsum("md,mdh->h", shift, w_enc)
        b_dec += shift
    view = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec, "scales": scales}
    theta = float(state["threshold"]) if "threshold" in state else -1.0
    # A threshold never set (-1) passes every positive activation: a plain ReLU.
    if cls == "BatchTopKCrossCoder" and theta >= 0:
        view["threshold"] = common.threshold_on_f(theta, w_dec)
    facts = common.read_sidecar(directory) or {}
    return view, facts
