"""Where and how the ablation reads markers: the positions before each marker occurrence in
the measured documents, and `LogitProbe`, which reads both models' log-probabilities
there, clean and with latents ablated at block L.
"""

from __future__ import annotations

import numpy as np
import torch

from xcoder_jax import intervention, site
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.documents import pad_documents
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
    """Marker log-probabilities of both models on fixed documents, clean and under ablation.

    Each batch is run once per model (`site.SiteReplay`); an ablation then reruns only the
    blocks from L on, from the recorded block-L input less the ablated latents' contribution
    (`intervention`: the subtraction and the positions of `hooks.ablate`, where the store
    would hold a row; reconstruction error kept).
    """

    def __init__(self, models, xcoder, docs, *, batch_size: int, pad_id: int, exclusion: Exclusion):
        self.xcoder, self.n_models = xcoder, len(models)
        device = next(models[0].parameters()).device
        self.batches = []
        for lo in range(0, len(docs), batch_size):
            ids, mask = pad_documents(docs[lo : lo + batch_size], pad_id, device)
            replays = [site.SiteReplay.record(m, xcoder.layer, ids, mask) for m in models]
            x = torch.stack([r.hidden.float() for r in replays], 2)  # [b, s, m, d] raw
            # Ablated where the store has rows: the excluded positions keep their clean value.
            kept = intervention.stored_positions(ids, exclusion, mask)
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

    def _hidden(self, target, replays, x, kept, *, latents, direction):
        """Block-L input of model `target` with `latents` removed, or with `direction` [d]
        (unit) subtracted at each stored position with the length of what removing `latents`
        would subtract there (a norm-matched random-direction control)."""
        hidden = replays[target].hidden
        if not len(latents):
            return hidden
        delta = self.xcoder.ablation_delta(x, latents, target)  # [b, s, d] raw
        if direction is not None:
            delta = delta.norm(dim=-1, keepdim=True) * direction.to(delta)
        return intervention.subtract(hidden, delta, kept)

    @torch.no_grad()
    def log_probs(self, target: int, where, columns, masked, *, latents=(), direction=None):
        """Log-probabilities at `where` [(doc, position, token)] under an intervention.

        columns: [n, k] token ids read at each position; masked: token ids left out of the
        "best other token" (the reasoning markers). Returns (log p at `columns` [n, k],
        log p of the most likely token outside `masked` [n]), float64.
        """
        cols = torch.as_tensor(np.asarray(columns, np.int64))
        out = np.zeros(cols.shape)
        best = np.zeros(len(where))
        masked = torch.as_tensor(sorted(set(int(t) for t in masked)), dtype=torch.long)
        for replays, x, kept, sel, d, p, _ in self._in_batches(where):
            hidden = self._hidden(target, replays, x, kept, latents=latents, direction=direction)
            logp = torch.log_softmax(replays[target].logits(hidden, d, p).float(), -1)
            out[sel] = logp.gather(1, cols[sel].to(logp.device)).double().cpu().numpy()
            logp[:, masked.to(logp.device)] = -torch.inf
            best[sel] = logp.max(-1).values.double().cpu().numpy()
        return out, best

    def top_others(self, target: int, where, masked, k: int) -> np.ndarray:
        """[n, k] the clean model's k most likely tokens outside `masked` at `where`."""
        out = np.zeros((len(where), k), np.int64)
        masked = torch.as_tensor(sorted(set(int(t) for t in masked)), dtype=torch.long)
        with torch.no_grad():
            for replays, _, _, sel, d, p, _ in self._in_batches(where):
                logits = replays[target].logits(replays[target].hidden, d, p).float()
                logits[:, masked.to(logits.device)] = -torch.inf
                out[sel] = logits.topk(k, -1).indices.cpu().numpy()
        return out

    @torch.no_grad()
    def latent_acts(self, where) -> np.ndarray:
        """f [n, h] of every latent at `where` [(doc, position, token)] (clean inputs)."""
        out = np.zeros((len(where), self.xcoder.n_latents), np.float32)
        all_ids = list(range(self.xcoder.n_latents))
        for _, x, _, sel, d, p, _ in self._in_batches(where):
            out[sel] = self.xcoder.latent_acts(x[d, p], all_ids).cpu().numpy()
        return out
