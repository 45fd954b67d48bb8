"""Latents chosen by their attribution to a marker's log-probability (gradient x activation).

For a category C and a model m, a latent's attribution is the first-order change of the log-
probability of C's markers (at the positions that predict them) when the latent's
contribution f_i W_dec[i, m] is added to model m's block-L input, summed over every position
of the document (attention carries earlier positions' contributions forward):

    a_i = sum_occurrences sum_q f_i(x_q) W_dec[i, m] . d log p(marker) / d h_q

averaged per occurrence. Documents are independent rows of a batch, so one backward pass
gives each document's sum; the standard error is the cluster-robust one of a ratio estimator
over documents. A latent *passes* when a - 1.96 se > 0: removing it is predicted to lower the
markers' log-probability. Computed on TRAINING documents; effects are measured elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from xcoder_jax import intervention, site
from xcoder_jax.ablation.probe import marker_positions
from xcoder_jax.documents import pad_documents
from xcoder_jax.specificity import Screened


@dataclass
class Attribution(Screened):
    """score, se: [C, h] mean attribution per occurrence (log-probability units) and its
    standard error; n_occurrences, n_documents: [C]; model: the role attributed in."""

    categories: list[str]
    n_occurrences: np.ndarray
    n_documents: np.ndarray
    model: str


def _ratio(per_doc: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio estimate sum A_d / sum n_d [h] and its cluster-robust standard error."""
    total = counts.sum()
    if total == 0:
        h = per_doc.shape[1]
        return np.zeros(h), np.full(h, np.inf)
    r = per_doc.sum(0) / total
    k = len(counts)
    if k < 2:
        return r, np.full_like(r, np.inf)
    resid = per_doc - counts[:, None] * r[None]
    se = np.sqrt(k / (k - 1) * (resid**2).sum(0)) / total
    return r, se


def marker_attribution(
    models, roles, xcoder, docs, *, forms, categories, exclusion, batch_size: int, pad_id: int,
    target: str = "distilled",
) -> Attribution:  # fmt: skip
    """Attribution of every latent to every category's marker log-probability in `target`.

    docs: [token ids [T]] of training documents; forms: {category: [marker id sequences]}.
    Positions follow `ablation.marker_positions` (the "predict" row of each occurrence,
    stored positions only); only stored positions contribute latent activity.
    """
    m = roles.index(target)
    device = next(models[0].parameters()).device
    categories = list(categories)
    per_doc = {c: [] for c in categories}
    counts = {c: [] for c in categories}
    w_dec = xcoder.W_dec[:, m]  # [h, d] raw
    bar = tqdm(total=len(docs), desc="attribution", unit="doc", leave=False)
    for lo in range(0, len(docs), batch_size):
        chunk = docs[lo : lo + batch_size]
        ids, mask = pad_documents(chunk, pad_id, device)
        replays = [site.SiteReplay.record(model, xcoder.layer, ids, mask) for model in models]
        x = torch.stack([r.hidden.float() for r in replays], 2)  # [b, s, m, d] raw
        kept = intervention.stored_positions(ids, exclusion, mask)
        b, s = ids.shape
        with torch.no_grad():
            f = xcoder.encode_t(x.reshape(b * s, *x.shape[2:])).T.reshape(b, s, -1)
            f = f * kept[..., None]
        for cat in categories:
            where = marker_positions(chunk, forms[cat], exclusion)
            n = np.bincount([d for d, _, _ in where], minlength=b)
            if not where:
                per_doc[cat].append(np.zeros((b, xcoder.n_latents)))
                counts[cat].append(n)
                continue
            d, p, t = (torch.tensor([w[i] for w in where]) for i in range(3))
            hidden = replays[m].hidden.detach().float().requires_grad_(True)
            with torch.enable_grad():
                logp = torch.log_softmax(replays[m].forward(hidden, d, p).float(), -1)
                (grad,) = torch.autograd.grad(logp[torch.arange(len(t)), t].sum(), hidden)
            with torch.no_grad():
                proj = grad.float() @ w_dec.T  # [b, s, h]: d log p / d f_i at each position
                per_doc[cat].append((f * proj).sum(1).double().cpu().numpy())
            counts[cat].append(n)
        bar.update(len(chunk))
    bar.close()
    score, se, n_occ, n_docs = [], [], [], []
    for cat in categories:
        a = np.concatenate(per_doc[cat]) if per_doc[cat] else np.zeros((0, xcoder.n_latents))
        n = np.concatenate(counts[cat]) if counts[cat] else np.zeros(0)
        has = n > 0  # documents without an occurrence add nothing to either sum
        r, e = _ratio(a[has], n[has].astype(np.float64))
        score.append(r)
        se.append(e)
        n_occ.append(int(n.sum()))
        n_docs.append(int(has.sum()))
    return Attribution(
        categories=categories,
        score=np.stack(score),
        se=np.stack(se),
        n_occurrences=np.array(n_occ),
        n_documents=np.array(n_docs),
        model=target,
    )
