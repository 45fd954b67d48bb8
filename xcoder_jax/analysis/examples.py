"""Max-activating examples: a running top-k per latent, token contexts, automatic labels.

The top-k is kept while streaming over the store (`RunningTopK`), so no more than one batch
of latent activations is ever in memory. Contexts are rebuilt afterwards from the store's
token and (document, position) shards: rows of a document are contiguous in the store, so the
tokens around row g are rows g - before ... g + after that belong to the same document.
The positions the store excludes (position 0, the attention sink, by default) are not in it;
a context that reaches the first stored row of its document says so (`doc_start`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from xcoder_jax.analysis.labels import latent_label

PAD = -1  # token id of window slots outside the document (or the store)


class RunningTopK:
    """The k largest activations of every latent seen so far, and the rows they came from.

    values: [n_latents, k] float32, descending; rows: [n_latents, k] int64 global row ids
    (-1 where fewer than k positive activations were seen).
    """

    def __init__(self, n_latents: int, k: int):
        self.k = k
        self.values = torch.zeros(n_latents, k)
        self.rows = torch.full((n_latents, k), -1, dtype=torch.int64)

    def update(self, f_t: torch.Tensor, row_ids: torch.Tensor) -> None:
        """f_t: [n_latents, batch] activations (latent-major); row_ids: [batch] int64."""
        k = min(self.k, f_t.shape[1])
        vals, idx = torch.topk(f_t, k, dim=1)
        all_vals = torch.cat([self.values, vals], dim=1)
        all_rows = torch.cat([self.rows, row_ids[idx]], dim=1)
        # Merging the batch's own top-k with the kept one is exact: a row outside the batch's
        # top-k cannot be in the union's. (Exact ties may resolve to either row.)
        top_vals, pick = torch.topk(all_vals, self.k, dim=1, sorted=True)
        self.values = top_vals
        self.rows = torch.gather(all_rows, 1, pick)

    def update_sparse(self, latent: torch.Tensor, value: torch.Tensor, row: torch.Tensor) -> None:
        """The same from the nonzero entries of a batch: latent (ascending), value, row: [nnz].

        Work is O(nnz): only entries above their latent's current k-th value are merged,
        each touched latent in one row of a small [touched, k + most entries] matrix.
        """
        keep = value > self.values[latent, -1]
        if not bool(keep.any()):
            return
        latent, value, row = latent[keep], value[keep], row[keep]
        touched, counts = torch.unique_consecutive(latent, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(touched)), counts)
        starts = torch.cumsum(counts, 0) - counts
        column = self.k + torch.arange(len(latent)) - starts[group]
        width = self.k + int(counts.max())
        vals = torch.zeros(len(touched), width)
        rows = torch.full((len(touched), width), -1, dtype=torch.int64)
        vals[:, : self.k], rows[:, : self.k] = self.values[touched], self.rows[touched]
        vals[group, column], rows[group, column] = value, row
        top_vals, pick = torch.topk(vals, self.k, dim=1, sorted=True)
        self.values[touched] = top_vals
        self.rows[touched] = torch.gather(rows, 1, pick)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values [n_latents, k], rows [n_latents, k]); zero activations get row -1."""
        values = self.values.numpy().copy()
        rows = self.rows.numpy().copy()
        rows[values <= 0] = -1
        values[values <= 0] = 0.0
        return values, rows


def gather_windows(store, rows: np.ndarray, before: int, after: int) -> dict[str, np.ndarray]:
    """Token windows around global rows of the store.

    rows: [n] global row ids (>= 0). Returns "tokens" [n, before + 1 + after] (PAD outside
    the row's document), "doc" [n], "position" [n] and "doc_start" [n] bool (the window
    reaches the first stored row of the document; position 0 is not stored).
    """
    rows = np.asarray(rows, np.int64)
    # One row more on the left: the window reaches the document's first stored row exactly
    # when that row is outside the document (whatever its position: excluded tokens may
    # come first).
    offsets = np.arange(-before - 1, after + 1)
    window = rows[:, None] + offsets[None, :]
    valid = (window >= 0) & (window < store.n_rows)
    flat = np.where(valid, window, 0).ravel()
    tokens = np.full(flat.shape, PAD, np.int64)
    docs = np.full(flat.shape, -1, np.int64)
    positions = np.full(flat.shape, -1, np.int64)
    shard_of = np.searchsorted(store.shard_offsets, flat, side="right") - 1
    for k in np.unique(shard_of[valid.ravel()]):
        sel = (shard_of == k) & valid.ravel()
        local = flat[sel] - store.shard_offsets[k]
        tokens[sel] = store.shard_tokens(int(k))[local]
        index = store.shard_index(int(k))[local]
        docs[sel], positions[sel] = index[:, 0], index[:, 1]
    shape = window.shape
    tokens, docs, positions = tokens.reshape(shape), docs.reshape(shape), positions.reshape(shape)
    centre = before + 1
    same_doc = valid & (docs == docs[:, centre : centre + 1])
    tokens = np.where(same_doc, tokens, PAD)
    return {
        "tokens": tokens[:, 1:],
        "doc": docs[:, centre],
        "position": positions[:, centre],
        "doc_start": ~same_doc[:, 0],
    }


def marker_category_at(
    tokens: np.ndarray, centre: int, forms: dict[str, list[tuple[int, ...]]]
) -> list[str | None]:
    """The category whose marker ends at column `centre` of each window, or None.

    tokens: [n, width] windows from `gather_windows` (PAD outside the document).
    """
    out: list[str | None] = [None] * len(tokens)
    for category, seqs in forms.items():
        for ids in seqs:
            n = len(ids)
            if n == 0 or centre + 1 < n:
                continue
            hit = (tokens[:, centre + 1 - n : centre + 1] == np.asarray(ids)).all(1)
            for i in np.flatnonzero(hit):
                out[i] = out[i] or category
    return out


def decode_pieces(tokenizer, pieces: list[list[int]]) -> list[str]:
    if tokenizer is None:
        return [" ".join(f"[{t}]" for t in p) for p in pieces]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust batch decoder: no Python call per piece
        return backend.decode_batch(pieces, skip_special_tokens=False)
    return tokenizer.batch_decode(pieces, skip_special_tokens=False)


def render(
    windows: dict[str, np.ndarray],
    values: np.ndarray,
    rows: np.ndarray,
    before: int,
    *,
    tokenizer=None,
    categories: Sequence[str | None] | None = None,
) -> list[dict]:
    """JSON-ready examples: left context, firing token and right context as text.

    Without a tokenizer, tokens are shown as "[id]". `values` [n]: activations; `rows` [n].
    """
    tokens = windows["tokens"]
    left = [[int(t) for t in w[:before] if t != PAD] for w in tokens]
    mid = [[int(w[before])] for w in tokens]
    right = [[int(t) for t in w[before + 1 :] if t != PAD] for w in tokens]
    texts = decode_pieces(tokenizer, left + mid + right)
    n = len(tokens)
    out = []
    for i in range(n):
        out.append(
            {
                "activation": round(float(values[i]), 5),
                "row": int(rows[i]),
                "doc": int(windows["doc"][i]),
                "position": int(windows["position"][i]),
                "doc_start": bool(windows["doc_start"][i]),
                "left": texts[i],
                "token": texts[n + i],
                "right": texts[2 * n + i],
                "marker": None if categories is None else categories[i],
            }
        )
    return out


def label(examples: list[dict], min_share: float = 0.5) -> dict:
    """A latent's automatic label (`labels.latent_label`: what its firing tokens are) and
    its details: the dominant firing token and the share of examples on it; the dominant
    reasoning category (examples whose firing token ends a marker) and its share."""
    out = {"label": latent_label(examples, min_share)}
    if not examples:
        return out | {"token": None, "token_share": 0.0}
    n = len(examples)
    token, count = Counter(e["token"] for e in examples).most_common(1)[0]
    out.update(token=token, token_share=round(count / n, 3))
    cats = Counter(e["marker"] for e in examples if e.get("marker"))
    if cats:
        category, c_count = cats.most_common(1)[0]
        out.update(category=category, category_share=round(c_count / n, 3))
    return out
