"""SAELens's on-disk SAE: the crosscoder as ONE JumpReLU SAE over both models' activations.

    <dir>/sae_weights.safetensors  W_enc [m*d, h], b_enc [h], W_dec [h, m*d], b_dec [m*d],
                                   threshold [h]   (float32, RAW units, base model first)
    <dir>/cfg.json                 architecture "jumprelu", d_in = m*d, d_sae = h, ...
    <dir>/xcoder_jax.json          our facts (scales, block L, models): `common.SIDECAR`

The files follow SAELens 6.18.0 (sae_lens/saes/sae.py: `SAEConfig`, `SAE.save_model`,
`SAE.load_from_disk`; sae_lens/saes/jumprelu_sae.py: `JumpReLUSAE.encode` / `decode`;
sae_lens/loading/pretrained_sae_loaders.py: `handle_config_defaulting`,
`LLM_METADATA_KEYS`): the config's own fields at the top level, the model, hook and dataset
in `metadata`. The top level also repeats what SAELens 5.x required there (`hook_layer`,
`activation_fn_str`, ...); 6.x keeps only its dataclass fields and ignores them.

Its JumpReLU SAE takes x = concat(x_base, x_distilled) (raw, the input of block L of each):

    f = ReLU(pre) * (pre > threshold),  pre = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc
    x_hat = f W_dec + b_dec             (x_hat[:d] the base model's, x_hat[d:] the distilled)

Our encoder does not subtract b_dec: `apply_b_dec_to_input` is false. Ours keeps f >= t
where SAELens keeps pre > threshold, so a positive t is written as the float32 just below
it, which keeps the same f for every float32 pre; an L1 crosscoder gets threshold 0, a ReLU.
A Matryoshka crosscoder is written as a BatchTopK one (the same JumpReLU at inference); its
nested latent groups, which only its training used, are in `metadata.crosscoder` and the
sidecar as `latent_groups`; so are the dedicated latents' ranges, as `exclusive`.
"""

from __future__ import annotations

import os
import re

import numpy as np
from safetensors.numpy import save_file
from safetensors.torch import load_file

from xcoder_jax import export, fileio
from xcoder_jax.formats import common
from xcoder_jax.formats.common import FormatError

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
SAELENS_VERSION = "6.18.0"  # the version whose cfg.json layout is written
ARCHITECTURES = ("jumprelu", "standard")  # standard: ReLU, no threshold
HOOK = "blocks.{layer}.hook_resid_pre"
LOST = (
    "one SAE over two models: d_in is the concatenation of both models' activations at "
    "`hook_name` (base first, then distilled; SAELens tools attach an SAE to one hook of one "
    "model and cannot build this input); the per-model decoder slices are W_dec[:, :d] and "
    "W_dec[:, d:], whose norms crosscoder analysis compares in normalised units (the scales "
    "are in xcoder_jax.json); SAELens's decoder-norm tools see the L2 norm of the whole row"
)


def _threshold_out(t: np.ndarray) -> np.ndarray:
    """Ours (keep f >= t) as SAELens's (keep pre > threshold)."""
    return np.where(t > 0, np.nextafter(t, np.float32(-np.inf)), t).astype(np.float32)


def _threshold_in(t: np.ndarray) -> np.ndarray:
    """SAELens's (keep pre > threshold) as ours (keep f >= t)."""
    return np.where(t > 0, np.nextafter(t, np.float32(np.inf)), t).astype(np.float32)


def _cfg(raw: dict, facts: dict, run: dict) -> dict:
    m, d, h = raw["W_enc"].shape
    layer = facts.get("layer")
    hook = None if layer is None else HOOK.format(layer=layer)
    models = facts.get("models") or []
    llm = {
        "model_name": models[0].get("source") if models else None,
        "hook_name": hook,
        "hook_head_index": None,
        "prepend_bos": None,  # not recorded here
        "context_size": run.get("context_size"),
        "dataset_path": run.get("dataset_path"),
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
    }
    crosscoder = {
        "written_by": "xcoder_jax",
        "lost": LOST,
        "input": f"concat([base {hook}, distilled {hook}], -1), raw units",
        "models": [{"role": x.get("role"), "source": x.get("source")} for x in models],
        "n_models": m,
        "d_model": d,
        "layer": layer,
        "loss": facts.get("loss"),
        # Matryoshka's nested groups: sizes in latent order (training only; inference is the
        # JumpReLU above).
        **({"latent_groups": facts["latent_groups"]} if facts.get("latent_groups") else {}),
        # The dedicated latents' ranges by side (`exclusive.record`), when there are any.
        **({"exclusive": facts["exclusive"]} if facts.get("exclusive") else {}),
        "threshold": "SAELens keeps pre > threshold, the crosscoder f >= t: a positive t is "
        "stored as the float32 just below it (the same f in float32); 0 is a ReLU",
    }
    return {
        "architecture": "jumprelu",
        "d_in": m * d,
        "d_sae": h,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            **llm,
            "crosscoder": crosscoder,
        },
        # SAELens 5.x's required top-level fields.
        **llm,
        "hook_layer": layer,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "finetuning_scaling_factor": False,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
    }


def write(directory: str, raw: dict[str, np.ndarray], facts: dict, run: dict) -> None:
    """Writes `raw` (`common.raw_view`: raw units, base first) as sae_weights.safetensors +
    cfg.json + sidecar. run: context_size and dataset_path for cfg.json's metadata."""
    m, d, h = raw["W_enc"].shape
    threshold = raw.get("threshold", np.zeros(h, np.float32))
    state = {
        "W_enc": raw["W_enc"].reshape(m * d, h),
        "b_enc": raw["b_enc"],
        "W_dec": raw["W_dec"].reshape(h, m * d),
        "b_dec": raw["b_dec"].reshape(m * d),
        "threshold": _threshold_out(np.asarray(threshold, np.float32)),
    }
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
    os.makedirs(directory, exist_ok=True)
    fileio.atomic_write_path(os.path.join(directory, WEIGHTS), lambda p: save_file(state, p))
    fileio.atomic_write_json(os.path.join(directory, CONFIG), _cfg(raw, facts, run))
    common.write_sidecar(directory, facts)


def _check_cfg(cpath: str, cfg: dict) -> None:
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise FormatError(f"{cpath}: architecture {arch!r} is not one of {ARCHITECTURES}")
    norm = cfg.get("normalize_activations") or "none"  # 5.x wrote false for none
    if norm != "none":
        raise FormatError(
            f"{cpath}: normalize_activations {norm!r}; only SAEs on raw activations ('none', "
            "a scaling factor folded in) can be read"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise FormatError(f"{cpath}: reshape_activations {cfg['reshape_activations']!r}")


def _facts(cfg: dict, directory: str, d: int) -> dict:
    facts = dict(common.read_sidecar(directory) or {})
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", str(hook))
    if facts.get("layer") is None and match:
        facts["layer"] = int(match.group(1))
    facts.setdefault("d_model", d)
    return facts


def read(directory: str) -> tuple[dict, dict]:
    """(view, facts): the SAE as a crosscoder over len(BASE_FIRST) models (its d_in split in
    equal halves, base first), in the normalised units of the sidecar's scales (scales 1
    without one: the weights take raw activations), and the sidecar's facts with block L
    from `hook_name`.

    apply_b_dec_to_input is folded into b_enc (b_enc - b_dec W_enc); the threshold is kept
    when the sidecar says BatchTopK or Matryoshka or some threshold is positive (none
    positive: a ReLU).
    """
    missing = "not a SAELens SAE directory: {path} missing"
    wpath, cpath, cfg = export.read_pair(directory, WEIGHTS, CONFIG, FormatError, missing)
    _check_cfg(cpath, cfg)
    state = {k: v.double().numpy() for k, v in load_file(wpath).items()}
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    jump = cfg.get("architecture") == "jumprelu"
    absent = [n for n in names + (("threshold",) if jump else ()) if n not in state]
    if absent:
        raise FormatError(f"{wpath} lacks {absent}")
    if "scaling_factor" in state and not np.all(state["scaling_factor"] == 1):
        raise FormatError(f"{wpath}: a finetuning scaling factor is not supported")
    (d_in, h), m = state["W_enc"].shape, len(common.BASE_FIRST)
    if d_in % m or state["W_dec"].shape != (h, d_in) or cfg.get("d_in", d_in) != d_in:
        raise FormatError(
            f"{wpath}: W_enc {state['W_enc'].shape}, W_dec {state['W_dec'].shape} (d_in "
            f"{cfg.get('d_in')}) are not an SAE over {m} models' concatenated activations"
        )
    d = d_in // m
    b_enc = state["b_enc"]
    if cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc - state["b_dec"] @ state["W_enc"]
    facts = _facts(cfg, directory, d)
    s = np.ones(m, np.float32) if facts.get("scales") is None else facts["scales"]
    s = np.asarray(s, np.float64)
    view = {
        "W_enc": state["W_enc"].reshape(m, d, h) / s[:, None, None],
        "b_enc": b_enc,
        "W_dec": state["W_dec"].reshape(h, m, d) * s[None, :, None],
        "b_dec": state["b_dec"].reshape(m, d) * s[:, None],
    }
    if jump and (facts.get("loss") in common.THRESHOLD_LOSSES or (state["threshold"] > 0).any()):
        view["threshold"] = _threshold_in(state["threshold"].astype(np.float32))
    view = {k: v.astype(np.float32) for k, v in view.items()}
    view["scales"] = s.astype(np.float32)
    return view, facts
