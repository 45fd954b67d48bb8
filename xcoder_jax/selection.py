"""Which latents steering and ablation act on: NRN, marker firing counts, latent specs.

Latent sets are named by specs: "17" or "17+230" (ids), or "<category>:<k>", the k latents
with NRN above `min_nrn` (distilled-leaning; `analysis.distilled_only_min` allows only
distilled-only latents) that fire on most of the category's marker occurrences in the
store, read at `fire_offset` tokens from the marker (`marker_counts`). The analysis reads
latents on the marker token itself (offset 0); those describe a marker that was just read.
Steering and ablation act on what comes next, so they default to offset -1: the latents
active where the model predicts the marker. That per-latent count is not in the analysis'
outputs, hence computed here from the store.
"""

from __future__ import annotations

import numpy as np
import torch

from xcoder_jax import checkpoint as ckpt
from xcoder_jax.analysis import norms
from xcoder_jax.analysis.stream import to_float32
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.lexicon import CATEGORY_NAMES, find_marker


def export_nrn(tensors: dict, export_config: dict, norm: str) -> np.ndarray:
    """NRN [h] of every latent of an export (0 base-only, 0.5 shared, 1 distilled-only)."""
    w_norm = ckpt.normalised_decoder(tensors, export_config)
    return norms.latent_nrn(w_norm, ckpt.role_order(export_config), norm)


def marker_counts(store, xcoder, forms: dict, categories, offset: int, shards) -> np.ndarray:
    """[n_categories, h]: marker occurrences in the store's `shards` on which each latent fires.

    Latents are selected with these counts, so `shards` are the training shards: the
    documents an effect is then measured on must not be among them.

    A latent is read at `offset` tokens from the marker's first token (-1: the position
    whose output predicts the marker, where the logit is measured; 0: the marker itself),
    inside the same document and shard.
    """
    counts = np.zeros((len(categories), xcoder.n_latents), np.int64)
    all_ids = list(range(xcoder.n_latents))
    with torch.no_grad():
        for k in shards:
            tokens = np.asarray(store.shard_tokens(k), np.int64)
            docs = np.asarray(store.shard_index(k)[:, 0], np.int64)
            acts = None
            for c, cat in enumerate(categories):
                starts = np.concatenate(
                    [find_marker(tokens, form, docs) for form in forms[cat]] + [np.zeros(0, int)]
                )
                rows = starts + offset
                ok = (rows >= 0) & (rows < len(tokens))
                rows, starts = rows[ok], starts[ok]
                rows = np.unique(rows[docs[rows] == docs[starts]])
                if not len(rows):
                    continue
                if acts is None:
                    acts = to_float32(store.shard_acts(k))
                x = torch.from_numpy(acts[rows]).to(xcoder.W_enc.device)
                counts[c] += (xcoder.latent_acts(x, all_ids) > 0).sum(0).cpu().numpy()
    return counts


class TooFewLatents(XcoderError, ValueError):
    """A "<category>:<k>" spec names more latents than qualify in this crosscoder."""


def select_latents(spec: str, nrn: np.ndarray, counts: dict | None, min_nrn: float) -> list[int]:
    """Latent ids of one spec (see the module docstring).

    nrn: [h]; counts: {category: [h] marker firing counts} (from `marker_counts`), needed by
    "<category>:<k>" specs only.
    """
    spec = str(spec).strip()
    h = len(nrn)
    if ":" not in spec:
        try:
            ids = [int(s) for s in spec.split("+")]
        except ValueError as e:
            raise ConfigError(f"bad latent spec {spec!r}: ids '17+230' or '<category>:<k>'") from e
        bad = [i for i in ids if not 0 <= i < h]
        if bad:
            raise ConfigError(f"latent ids {bad} out of range: the export has {h} latents")
        return ids
    cat, k = spec.split(":", 1)
    if cat not in CATEGORY_NAMES:
        raise ConfigError(f"unknown category {cat!r} in {spec!r}; one of {CATEGORY_NAMES}")
    c = np.asarray(counts[cat])
    order = [int(i) for i in np.argsort(-c, kind="stable") if c[i] > 0 and nrn[i] > min_nrn]
    if len(order) < int(k):
        raise TooFewLatents(f"{spec!r}: only {len(order)} latents with NRN > {min_nrn} fire on it")
    return order[: int(k)]
