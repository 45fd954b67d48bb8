"""Which latents steering and ablation act on: NRN, marker firing counts, latent specs.

Latent sets are named by specs: "17" or "17+230" (ids), or "<category>:<k>", the k latents
with NRN above `min_nrn` (distilled-leaning; `analysis.distilled_only_min` allows only
distilled-only latents) that fire on most of the category's marker occurrences in the
store (`marker_counts`). An occurrence is read where the config's `fire_offset` places it,
an offset from the marker's first token (`lexicon.marker_read_rows`); the default -1 is the
lexicon's "predict" anchor, the token whose output predicts the marker. Steering and
ablation act on what comes next and measure the marker's logit at that very position, so
the latents they pick are the ones active there. The analysis reads latents at the "read"
anchor instead (the marker's last token: a marker that was just read), which for a
multi-token marker is a different row, so its per-category counts are not these; hence they
are computed here from the store.
"""

from __future__ import annotations

import numpy as np
import torch

from xcoder_jax.analysis.stream import to_float32
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.lexicon import CATEGORY_NAMES, marker_carry, marker_read_rows, stretches


def marker_counts(store, xcoder, forms: dict, categories, anchor: str | int, shards) -> np.ndarray:
    """[n_categories, h]: marker occurrences in the store's `shards` on which each latent fires.

    Latents are selected with these counts, so `shards` are the training shards: the
    documents an effect is then measured on must not be among them.

    forms: {category: [token-id sequence of each marker form]}; anchor: where an occurrence
    is read, a `lexicon.ANCHORS` name or an offset <= 0 from the marker's first token (the
    configs' `fire_offset`; -1 is "predict"). Positions follow `lexicon.marker_read_rows`: an
    occurrence counts in the shard holding its last token, read inside its own document. A
    shard listed right after its predecessor gets the predecessor's last rows as a carry, so
    an occurrence split across the boundary, or read on the predecessor's last row, is
    counted once; rows of shards not in `shards` are never read.
    """
    try:
        carry = marker_carry([ids for cat in categories for ids in forms[cat]], anchor)
    except ValueError as e:
        raise ConfigError(f"fire_offset: {e}") from e
    counts = np.zeros((len(categories), xcoder.n_latents), np.int64)
    all_ids = list(range(xcoder.n_latents))
    prev = None  # (shard id, its last `carry` tokens, index rows, float32 activations or None)
    with torch.no_grad():
        for k in shards:
            tokens = np.asarray(store.shard_tokens(k), np.int64)
            index = np.asarray(store.shard_index(k), np.int64)  # (document, position)
            if prev is not None and prev[0] == k - 1:
                _, prev_tokens, prev_index, prev_acts = prev
            else:
                prev_tokens, prev_index = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
                prev_acts = None
            n_prev = len(prev_tokens)
            ctx_tokens = np.concatenate([prev_tokens, tokens])
            # Runs of consecutive stored tokens: the row read before a marker is the token
            # really before it, not the stored row before an excluded one.
            ctx_docs = stretches(np.concatenate([prev_index, index]))
            acts = None
            for c, cat in enumerate(categories):
                rows = marker_read_rows(ctx_tokens, ctx_docs, forms[cat], anchor, n_prev)
                if not len(rows):
                    continue
                if acts is None:
                    acts = to_float32(store.shard_acts(k))
                x = acts[rows[rows >= 0]]
                if (rows < 0).any():  # read on the previous shard's last rows
                    if prev_acts is None:
                        prev_acts = to_float32(store.shard_acts(k - 1))[-n_prev:]
                    x = np.concatenate([prev_acts[rows[rows < 0] + n_prev], x])
                x = torch.from_numpy(x).to(xcoder.W_enc.device)
                counts[c] += (xcoder.latent_acts(x, all_ids) > 0).sum(0).cpu().numpy()
            tail = slice(len(tokens) - min(carry, len(tokens)), len(tokens))
            # The tail's activations are kept when this shard's were loaded; otherwise the next
            # shard loads them only if it reads one of those rows.
            prev = (k, tokens[tail], index[tail], None if acts is None else acts[tail].copy())
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
