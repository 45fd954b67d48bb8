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

On the first `kl_docs` documents, the same clean and spliced logits also give the splice KL
(`kl`): KL(model m || model m with x_hat_m spliced in), the mean over stored positions with a
95% cluster bootstrap over documents (`analysis.kl`; 0 for an exact reconstruction).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from xcoder_jax import intervention, site
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.analysis.kl import kl_rows
from xcoder_jax.documents import DocumentError, pad_documents
from xcoder_jax.stats import cluster_bootstrap_ci

# Held-out documents that cannot be rebuilt from the sources (`documents.rebuild_documents`).
SpliceError = DocumentError


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
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    roles: Sequence[str] = ("base", "distilled"),
    exclusion: Exclusion | None = None,
    kl_docs: int = 0,
    seed: int = 0,
) -> dict[str, dict]:
    """Clean, spliced and zero-ablated CE per model, in nats per scored token.

    models: the HF causal LMs in crosscoder order; docs: whole token ids [T] (position 0
    on); reconstruct: [batch, seq, n_models, d] raw site activations -> their reconstruction
    (same shape, raw units); exclusion: the store's (default: position 0); kl_docs: the
    first documents the splice KL is measured on (0: none), its bootstrap seeded by `seed`.
    """
    exclusion = exclusion or Exclusion()
    device = next(models[0].parameters()).device
    sums = {r: {"clean": 0.0, "spliced": 0.0, "zero": 0.0} for r in roles}
    kls = {r: ([], []) for r in roles}  # per role: KL per stored position, its document
    count = 0
    for lo in range(0, len(docs), batch_size):
        ids, mask = pad_documents(docs[lo : lo + batch_size], pad_id, device)
        # Stored positions are spliced, and scored where a next token follows. A pad id may
        # or may not be an excluded token, so padding is taken from the mask.
        spliced = intervention.stored_positions(ids, exclusion, mask)
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
            logits = {}
            for name, fn in runs.items():
                with site.block_input_hook(model, layer, fn) if fn else contextlib.nullcontext():
                    logits[name] = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total, n = _ce_sum(logits[name], ids, scored)
                sums[role][name] += total
            if j == 0:
                count += n
            if lo < kl_docs:
                _add_kl(kls[role], logits, spliced, lo, kl_docs)
    out = _ce_summary(sums, count, len(docs))
    for role, (values, clusters) in kls.items():
        if values:
            vals, cl = np.concatenate(values), np.concatenate(clusters)
            out[role]["kl"] = cluster_bootstrap_ci(vals, cl, seed=seed)
            out[role]["kl_docs"] = min(kl_docs, len(docs))
    return out


def _add_kl(acc: tuple[list, list], logits: dict, spliced, lo: int, kl_docs: int) -> None:
    """Appends KL(clean || spliced) at the stored positions of the batch's documents among
    the first `kl_docs` (the batch starts at document `lo`), and their document indices."""
    rows, positions = spliced.nonzero(as_tuple=True)
    keep = lo + rows < kl_docs
    rows, positions = rows[keep], positions[keep]
    acc[0].append(kl_rows(logits["clean"][rows, positions], logits["spliced"][rows, positions]))
    acc[1].append(lo + rows.cpu().numpy())


def _ce_summary(sums: dict, count: int, n_docs: int) -> dict:
    """CE per model and the fraction recovered (module docstring)."""
    out = {}
    for role, s in sums.items():
        ce = {k: s[k] / max(count, 1) for k in ("clean", "spliced", "zero")}
        out[role] = {f"{k}_ce": v if math.isfinite(v) else None for k, v in ce.items()}
        out[role].update(tokens=count, docs=n_docs, fraction_recovered=None)
        denom = ce["zero"] - ce["clean"]
        if not all(math.isfinite(v) for v in ce.values()):
            # Overflowing logits (e.g. a half-precision model): no CE to compare.
            out[role]["reason"] = "non-finite cross-entropy"
        elif abs(denom) <= 1e-12:
            out[role]["reason"] = "zero-ablation does not change the CE: nothing to recover"
        else:
            out[role]["fraction_recovered"] = (ce["zero"] - ce["spliced"]) / denom
    return out
