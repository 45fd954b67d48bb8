"""Splice-in evaluation: how much of each model's next-token loss the crosscoder preserves.

For each model of the pair, the input of block L (the crosscoder's site, through
`site.block_input_hook`) is replaced by the crosscoder's reconstruction, and the next-token
cross-entropy on held-out documents is compared with the clean model and with the input of
block L set to zero:

    fraction recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)

The crosscoder encodes both models' activations at once, so both are read at the site first
and the reconstruction of model m is spliced into model m. The positions the store excludes
(`activations.exclude`: position 0, the attention sink, by default; special tokens where
configured), never seen in training, keep their clean value in both interventions, and only
the predictions made from stored positions are scored. A figure that cannot be computed is
None, with a "reason".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from xcoder_jax import site
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.activations.sources import iter_documents
from xcoder_jax.errors import XcoderError


class SpliceError(XcoderError, ValueError):
    """Held-out documents cannot be rebuilt to match the store."""


def heldout_documents(
    store, heldout: Sequence[int], n_docs: int
) -> tuple[dict[int, tuple[int, np.ndarray]], int]:
    """The first `n_docs` documents of the held-out shards, and how many of them are cut.

    Returns ({doc id: (first stored position, stored token ids)}, n_cut). Documents lying
    wholly in the held-out shards come first; only when there are none (a held-out slice
    shorter than a document) is the document cut by the train/held-out border used, and
    counted in n_cut, since its first rows were trained on.
    """
    docs: dict[int, list[np.ndarray]] = {}
    first: dict[int, int] = {}
    cut: set[int] = set()  # documents that began in a shard outside `heldout`
    for k in heldout:
        # Once n_docs + 1 whole documents have begun, the first n_docs are complete.
        if sum(d not in cut for d in first) > n_docs:
            break
        index = store.shard_index(k)
        tokens = store.shard_tokens(k)
        if k > 0 and k - 1 not in heldout and len(index):
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
    exclusion: Exclusion | None = None,
) -> list[np.ndarray]:
    """Re-tokenises the source documents `stored` names, with the positions the store
    excludes (`exclusion`, the store's `Exclusion.from_manifest`; default position 0).

    stored: {doc id: (first stored position, stored token ids)} from `heldout_documents`.
    Returns [token ids [T] int64] in doc order; raises SpliceError when the source no longer
    gives the stored tokens (the store was extracted from other text or another tokenizer).
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
                raise SpliceError(
                    f"document {doc} re-tokenised from the data sources differs from the "
                    "store's tokens; the store was extracted from other text or tokenizer"
                )
            out[doc] = ids
            if len(out) == len(want):
                break
    missing = want - set(out)
    if missing:
        raise SpliceError(f"the data sources no longer give documents {sorted(missing)[:5]}")
    return [out[d] for d in sorted(out)]


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


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> tuple[float, int]:
    """Summed CE of the predictions made from the positions where `scored` [batch, T] (bool;
    each with a next token), and their count."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:]
    valid = scored[:, :-1]
    ce = torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none")
    return float(ce[valid].sum()), int(valid.sum())


@torch.no_grad()
def splice_ce(
    models: Sequence,
    layer: int,
    docs: list[np.ndarray],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 8,
    pad_id: int = 0,
    roles: Sequence[str] = ("base", "distilled"),
    exclusion: Exclusion | None = None,
) -> dict[str, dict]:
    """Clean, spliced and zero-ablated CE per model, in nats per scored token.

    models: the HF causal LMs in crosscoder order; docs: whole token ids [T] (position 0
    on); reconstruct: [batch, seq, n_models, d] raw site activations -> their reconstruction
    (same shape, raw units); exclusion: the store's (default: position 0).
    """
    exclusion = exclusion or Exclusion()
    device = next(models[0].parameters()).device
    sums = {r: {"clean": 0.0, "spliced": 0.0, "zero": 0.0} for r in roles}
    count = 0
    for lo in range(0, len(docs), batch_size):
        ids, mask = pad_documents(docs[lo : lo + batch_size], pad_id, device)
        # Stored positions are spliced, and scored where a next token follows. A pad id may
        # or may not be an excluded token, so padding is taken from the mask.
        spliced = exclusion.keep(ids) & mask.bool()
        scored = spliced.clone()
        scored[:, :-1] &= mask[:, 1:].bool()
        scored[:, -1] = False
        x = torch.stack([site.forward_to_site(m, layer, ids, mask) for m in models], dim=2)
        x_hat = reconstruct(x.float())
        for j, (role, model) in enumerate(zip(roles, models)):

            def replace(hidden, new, spliced=spliced):
                return torch.where(spliced[..., None], new.to(hidden.dtype), hidden)

            runs = {
                "clean": None,
                "spliced": lambda h, new=x_hat[:, :, j]: replace(h, new),
                "zero": lambda h: replace(h, torch.zeros_like(h)),
            }
            for name, fn in runs.items():
                if fn is None:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                else:
                    with site.block_input_hook(model, layer, fn):
                        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total, n = _ce_sum(logits, ids, scored)
                sums[role][name] += total
            if j == 0:
                count += n
    out = {}
    for role, s in sums.items():
        ce = {k: s[k] / max(count, 1) for k in ("clean", "spliced", "zero")}
        out[role] = {f"{k}_ce": v if math.isfinite(v) else None for k, v in ce.items()}
        out[role].update(tokens=count, docs=len(docs), fraction_recovered=None)
        denom = ce["zero"] - ce["clean"]
        if not all(math.isfinite(v) for v in ce.values()):
            # Overflowing logits (e.g. a half-precision model): no CE to compare.
            out[role]["reason"] = "non-finite cross-entropy"
        elif abs(denom) <= 1e-12:
            out[role]["reason"] = "zero-ablation does not change the CE: nothing to recover"
        else:
            out[role]["fraction_recovered"] = (ce["zero"] - ce["spliced"]) / denom
    return out
