"""Splice-in evaluation: how much of each model's next-token loss the crosscoder preserves.

For each model of the pair, the input of block L (the crosscoder's site, through
`site.block_input_hook`) is replaced by the crosscoder's reconstruction, and the next-token
cross-entropy on held-out documents is compared with the clean model and with the input of
block L set to zero:

    fraction recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)

The crosscoder encodes both models' activations at once, so both are read at the site first
and the reconstruction of model m is spliced into model m. Position 0 (the attention sink,
never seen in training) keeps its clean value in both interventions, and only predictions
made from positions >= 1 are scored: the one from position 0 cannot change. A figure that
cannot be computed is None, with a "reason".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from xcoder_jax import site
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
    first_position = int(store.manifest.get("first_position", 1))
    docs: dict[int, list[np.ndarray]] = {}
    first: dict[int, int] = {}
    for k in heldout:
        # Once n_docs + 1 documents have begun, the first n_docs are complete.
        if sum(p == first_position for p in first.values()) > n_docs:
            break
        index = store.shard_index(k)
        tokens = store.shard_tokens(k)
        for doc in np.unique(index[:, 0]):
            sel = index[:, 0] == doc
            first.setdefault(int(doc), int(index[sel, 1].min()))
            docs.setdefault(int(doc), []).append(np.asarray(tokens[sel], np.int64))
    whole = [d for d in sorted(docs) if first[d] == first_position][:n_docs]
    chosen = whole or sorted(docs)[:n_docs]
    n_cut = sum(first[d] != first_position for d in chosen)
    return {d: (first[d], np.concatenate(docs[d])) for d in chosen}, n_cut


def rebuild_documents(
    data_config, workdir: str, tokenizer, stored: dict[int, tuple[int, np.ndarray]]
) -> list[np.ndarray]:
    """Re-tokenises the source documents `stored` names (position 0 is not in the store).

    stored: {doc id: (first stored position, stored token ids)} from `heldout_documents`.
    Returns [token ids [T] int64] in doc order; raises SpliceError when the source no longer
    gives the stored tokens (the store was extracted from other text or another tokenizer).
    """
    want = set(stored)
    out = {}
    for doc, ids in iter_documents(data_config, workdir, tokenizer):
        if doc in want:
            ids = np.asarray(ids, np.int64)
            pos, tokens = stored[doc]
            if not np.array_equal(ids[pos : pos + len(tokens)], tokens):
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


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed CE of predictions from positions 1 .. T-2 (targets 2 .. T-1), and their count."""
    pred = logits[:, 1:-1].float()
    target = ids[:, 2:]
    valid = mask[:, 2:].bool()
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
) -> dict[str, dict]:
    """Clean, spliced and zero-ablated CE per model, in nats per scored token.

    models: the HF causal LMs in crosscoder order; docs: token ids [T] with position 0;
    reconstruct: [batch, seq, n_models, d] raw site activations -> their reconstruction
    (same shape, raw units).
    """
    device = next(models[0].parameters()).device
    sums = {r: {"clean": 0.0, "spliced": 0.0, "zero": 0.0} for r in roles}
    count = 0
    for lo in range(0, len(docs), batch_size):
        ids, mask = pad_documents(docs[lo : lo + batch_size], pad_id, device)
        x = torch.stack([site.forward_to_site(m, layer, ids, mask) for m in models], dim=2)
        x_hat = reconstruct(x.float())
        for j, (role, model) in enumerate(zip(roles, models)):

            def replace(hidden, new):
                out = hidden.clone()
                out[:, 1:] = new[:, 1:].to(hidden.dtype)
                return out

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
                total, n = _ce_sum(logits, ids, mask)
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
