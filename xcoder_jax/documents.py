"""Whole documents of chosen store shards, re-tokenised from the sources, and padded batches.

Stages that run the HF models on documents the crosscoder saw as store rows (splice-in on the
held-out shards, the ablation's measurement on the held-out shards, attribution on the
training shards) take them from here:

    stored, n_cut = shard_documents(store, shards, n_docs)   # {doc: (first position, tokens)}
    docs = rebuild_documents(data_config, workdir, tokenizer, stored, exclusion=exclusion)
    ids, mask = pad_documents(docs[:8], pad_token_id(tokenizer))

The store keeps only the rows it stored (the positions `activations.exclude` leaves out are
not in it), so a document is rebuilt from the data sources and checked token by token against
the rows the store holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.activations.sources import iter_documents
from xcoder_jax.errors import XcoderError


class DocumentError(XcoderError, ValueError):
    """Documents of the store cannot be rebuilt from the data sources to match it."""


def shard_documents(
    store, shards: Sequence[int], n_docs: int
) -> tuple[dict[int, tuple[int, np.ndarray]], int]:
    """The first `n_docs` documents of the listed shards, and how many of them are cut.

    Returns ({doc id: (first stored position, stored token ids)}, n_cut). Documents lying
    wholly in the listed shards come first; only when there are none (shards shorter than a
    document) is a document cut by the border of the listed shards used, and counted in
    n_cut, since its first rows lie in a shard outside them (for held-out shards: rows that
    were trained on).
    """
    docs: dict[int, list[np.ndarray]] = {}
    first: dict[int, int] = {}
    cut: set[int] = set()  # documents that began in a shard outside `shards`
    for k in shards:
        # Once n_docs + 1 whole documents have begun, the first n_docs are complete.
        if sum(d not in cut for d in first) > n_docs:
            break
        index = store.shard_index(k)
        tokens = store.shard_tokens(k)
        if k > 0 and k - 1 not in shards and len(index):
            before = store.shard_index(k - 1)
            if len(before) and before[-1, 0] == index[0, 0]:
                cut.add(int(index[0, 0]))
        for doc in np.unique(index[:, 0]):
            sel = index[:, 0] == doc
            first.setdefault(int(doc), int(index[sel, 1].min()))
            docs.setdefault(int(doc), []).append(np.asarray(tokens[sel], np.int64))
    whole = [d for d in sorted(docs) if d not in cut][:n_docs]
    chosen = whole or sorted(docs)[:n_docs]
    n_cut = sum(d in cut for d in chosen)
    return {d: (first[d], np.concatenate(docs[d])) for d in chosen}, n_cut


def rebuild_documents(
    data_config,
    workdir: str,
    tokenizer,
    stored: dict[int, tuple[int, np.ndarray]],
    *,
    exclusion: Exclusion | None = None,
) -> list[np.ndarray]:
    """Re-tokenises the source documents `stored` names, with the positions the store
    excludes (`exclusion`, the store's `Exclusion.from_manifest`; default position 0).

    stored: {doc id: (first stored position, stored token ids)} from `shard_documents`.
    Returns [token ids [T] int64] in doc order; raises DocumentError when the source no
    longer gives the stored tokens (the store was extracted from other text or tokenizer).
    """
    want = set(stored)
    exclusion = exclusion or Exclusion()
    out = {}
    for doc, ids in iter_documents(data_config, workdir, tokenizer):
        if doc in want:
            ids = np.asarray(ids, np.int64)
            pos, tokens = stored[doc]
            kept = np.flatnonzero(exclusion.keep(ids))
            kept = kept[kept >= pos][: len(tokens)]
            if not np.array_equal(ids[kept], tokens):
                raise DocumentError(
                    f"document {doc} re-tokenised from the data sources differs from the "
                    "store's tokens; the store was extracted from other text or tokenizer"
                )
            out[doc] = ids
            if len(out) == len(want):
                break
    missing = want - set(out)
    if missing:
        raise DocumentError(f"the data sources no longer give documents {sorted(missing)[:5]}")
    return [out[d] for d in sorted(out)]


def pad_token_id(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad token, else 0 (padding is read
    from the attention mask, never from the id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_documents(
    docs: list[np.ndarray], pad_id: int, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask, both [n_docs, longest] on `device`."""
    length = max(len(d) for d in docs)
    ids = torch.full((len(docs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), length), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.from_numpy(d)
        mask[i, : len(d)] = 1
    return ids.to(device), mask.to(device)
