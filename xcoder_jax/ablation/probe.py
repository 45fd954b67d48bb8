"""Where and how the ablation reads marker logits: the positions before each marker
occurrence in the measured documents, and `LogitProbe`, which reads both models' logits
there, clean and with latents ablated at block L.
"""

from __future__ import annotations

import numpy as np
import torch

from xcoder_jax import site
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.analysis import splice
from xcoder_jax.lexicon import marker_read_rows


def marker_positions(docs: list[np.ndarray], forms, exclusion: Exclusion):
    """[(doc, position, marker's first token id)] of every occurrence, read at its
    "predict" row (`lexicon.marker_read_rows`) where that row is a stored position (the
    crosscoder never saw the others: `exclusion`, the store's)."""
    out = []
    for d, ids in enumerate(docs):
        one_doc = np.zeros(len(ids), np.int64)
        kept = exclusion.keep(ids)
        for form in forms:
            for p in marker_read_rows(ids, one_doc, [form], "predict"):
                if kept[p]:
                    out.append((d, int(p), int(form[0])))
    return out


class LogitProbe:
    """Marker logits of both models on fixed documents, clean and under ablation.

    Each batch is run once per model (`site.SiteReplay`); an ablation then reruns only the
    blocks from L on, from the recorded block-L input less the ablated latents' contribution
    (the same intervention as `hooks.ablate`, reconstruction error kept).
    """

    def __init__(self, models, xcoder, docs, batch_size: int, pad_id: int, exclusion: Exclusion):
        self.xcoder, self.n_models = xcoder, len(models)
        device = next(models[0].parameters()).device
        self.batches = []
        for lo in range(0, len(docs), batch_size):
            ids, mask = splice.pad_documents(docs[lo : lo + batch_size], pad_id, device)
            replays = [site.SiteReplay.record(m, xcoder.layer, ids, mask) for m in models]
            x = torch.stack([r.hidden.float() for r in replays], 2)  # [b, s, m, d] raw
            # Ablated where the store has rows: the excluded positions keep their clean value.
            kept = exclusion.keep(ids) & mask.bool()
            self.batches.append((lo, len(ids), replays, x, kept))

    def _in_batches(self, where):
        """Per batch: (its replays, x, kept [b, s], indices into `where` [k], rows [k],
        positions [k], tokens [k]) of the occurrences it holds; batches holding none are
        left out."""
        for lo, n, replays, x, kept in self.batches:
            sel = [k for k, (d, _, _) in enumerate(where) if lo <= d < lo + n]
            if sel:
                d, p, t = (torch.tensor([where[k][i] for k in sel]) for i in range(3))
                yield replays, x, kept, sel, d - lo, p, t

    @torch.no_grad()
    def logits(self, target: int, latents, where) -> np.ndarray:
        """Logits [n] at `where` [(doc, position, token)] with `latents` ablated in `target`."""
        out = np.zeros(len(where))
        for replays, x, kept, sel, d, p, t in self._in_batches(where):
            hidden = replays[target].hidden
            if len(latents):
                delta = self.xcoder.ablation_delta(x, latents, target)
                hidden = hidden.clone()
                hidden -= torch.where(kept[..., None], delta, 0.0).to(hidden.dtype)
            logits = replays[target].logits(hidden, d, p)
            out[sel] = logits[torch.arange(len(sel)), t].float().cpu().numpy()
        return out

    @torch.no_grad()
    def latent_acts(self, where) -> np.ndarray:
        """f [n, h] of every latent at `where` [(doc, position, token)] (clean inputs)."""
        out = np.zeros((len(where), self.xcoder.n_latents), np.float32)
        all_ids = list(range(self.xcoder.n_latents))
        for _, x, _, sel, d, p, _ in self._in_batches(where):
            out[sel] = self.xcoder.latent_acts(x[d, p], all_ids).cpu().numpy()
        return out
