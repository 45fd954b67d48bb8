"""A crosscoder trained elsewhere as this workdir's export, checked against its store.

`import_crosscoder` reads a dictionary_learning, ckkissane or SAELens directory, checks
that it fits the workdir's activation store (d_model, number of models, block L, the models
and tokenizer where the file names them, its normalisation), and writes <workdir>/export/
in our format (raw units), so analysis, steering and ablation run on it unchanged.
"""

from __future__ import annotations

import os

import numpy as np

from xcoder_jax import exclusive, export
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.errors import ConfigError
from xcoder_jax.formats import ckkissane, common, dictionary_learning, saelens
from xcoder_jax.formats.common import FormatError

READERS = {
    "dictionary_learning": dictionary_learning.read,
    "ckkissane": ckkissane.read,
    "saelens": saelens.read,
}
# Formats whose weights take raw activations: there the scales only choose the units decoder
# norms are compared in, and the raw-unit weights are kept whichever source they come from.
RAW_UNITS = ("saelens",)
# Where the per-model scales (normalised = raw * scale) come from: the file itself (its
# activation normaliser, or our sidecar), the store (the crosscoder was trained on
# activations normalised as sqrt(d) / mean norm over this store, as ckkissane's buffer does),
# or none (it was trained on raw activations: scales 1).
SCALE_SOURCES = ("file", "store", "raw")


def _check(facts: dict, view: dict, store: ActivationStore) -> list[str]:
    """What does not fit, one phrase each."""
    m, d, _ = view["W_enc"].shape
    man, problems = store.manifest, []
    if d != store.d_model:
        problems.append(f"d_model: crosscoder {d}, store {store.d_model}")
    elif facts.get("d_model", d) != d:
        problems.append(f"d_model: the crosscoder states {facts['d_model']}, its weights {d}")
    if m != store.n_models:
        problems.append(
            f"models: the crosscoder reads {m} models, the store holds {store.n_models}"
        )
    if facts.get("layer") is not None and facts["layer"] != store.layer:
        problems.append(
            f"layer: crosscoder trained at block {facts['layer']}, store at {store.layer}"
        )
    tok = facts.get("tokenizer_sha256")
    if tok is not None and tok != man.get("tokenizer_sha256"):
        problems.append("tokenizer: the crosscoder's and the store's differ")
    stored = {x.get("role"): x.get("weights") for x in man.get("models") or []}
    for x in facts.get("models") or []:
        have = stored.get(x.get("role"))
        if x.get("weights") and have and x["weights"] != have:
            problems.append(
                f"models: the {x['role']} model the crosscoder was trained on "
                f"({x.get('source')}) has other weights than the store's"
            )
    return problems


def import_crosscoder(
    path: str, fmt: str, workdir: str, scales: str = "file", overwrite: bool = False
) -> dict:
    """Writes the crosscoder at `path` (format `fmt`) as <workdir>/export/; returns its config.

    scales: one of `SCALE_SOURCES`. Raises FormatError naming every mismatch with the
    workdir's store, or the missing normalisation.
    """
    if fmt not in READERS:
        raise ConfigError(f"unknown crosscoder format {fmt!r} ({', '.join(READERS)})")
    if scales not in SCALE_SOURCES:
        raise ConfigError(f"scales must be one of {SCALE_SOURCES}, got {scales!r}")
    export_dir = wd.export_dir(workdir)
    if os.path.exists(os.path.join(export_dir, export.EXPORT_CONFIG)) and not overwrite:
        raise FormatError(f"{export_dir} already holds an export; pass overwrite to replace it")
    store = ActivationStore(wd.activations_dir(workdir))
    view, facts = READERS[fmt](path)
    problems = _check(facts, view, store)
    if problems:
        raise FormatError(
            f"the crosscoder at {path} does not fit the store of {workdir}: " + "; ".join(problems)
        )
    roles = export.role_order({"models": store.manifest.get("models")})
    order = [common.BASE_FIRST.index(r) for r in roles]  # base-first slots -> store's order
    if scales == "file":
        if view["scales"] is None:
            raise FormatError(
                f"missing normalisation: {path} does not say how activations were scaled for "
                "training (no activation normaliser or scale factors beside it); if it was "
                "trained on activations scaled to mean norm sqrt(d_model) over data like this "
                "store's, use scales 'store'; if on raw activations, 'raw'"
            )
        s = np.asarray(view["scales"], np.float32)[order]
    elif scales == "store":
        s = np.asarray(store.scales, np.float32)
    else:
        s = np.ones(store.n_models, np.float32)
    if fmt in RAW_UNITS:
        base_first = np.empty_like(s)
        base_first[order] = s
        view = common.rescaled(view, base_first)
    weights = {
        "W_enc": view["W_enc"][order],
        "b_enc": view["b_enc"],
        "W_dec": view["W_dec"][:, order],
        "b_dec": view["b_dec"][order],
    }
    if "threshold" in view:
        weights["threshold"] = view["threshold"]
    man = store.manifest
    meta = {
        "models": man.get("models"),
        "layer": store.layer,
        "d_model": store.d_model,
        "n_models": store.n_models,
        "n_latents": int(view["b_enc"].shape[0]),
        "loss": facts.get("loss") or ("batchtopk" if "threshold" in view else "l1"),
        "tokenizer_sha256": man.get("tokenizer_sha256"),
        "tokens_trained": facts.get("tokens_trained"),
        "imported": {"format": fmt, "path": os.path.abspath(path), "scales_from": scales},
    }
    if facts.get("latent_groups"):  # a Matryoshka crosscoder's groups, from our sidecar
        meta["latent_groups"] = [int(n) for n in facts["latent_groups"]]
    # The dedicated latents' ranges, from our sidecar (ExportError unless the documented layout).
    h = meta["n_latents"]
    meta.update(exclusive.record(h, exclusive.export_counts(facts, h)))
    export.export(export_dir, weights, s, meta)
    return export.load_export(export_dir, "numpy")[1]
