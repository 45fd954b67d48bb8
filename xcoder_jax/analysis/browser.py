"""analysis/browser.html: every latent in one offline page (data and script inline).

The page (`browser_page.render`) lists every latent of latents.jsonl (NRN, class, decoder
cosine, firing frequency, latent-scaling ratios, category tags, label), sortable and
filterable, and for the detailed latents (the alive ones, most exclusive first, at most
`analysis.browser_latents`) it keeps what a click shows:

- max-activating contexts with every token's activation. The crosscoder has ONE f_i per
  position, computed from both models' activations together; what differs per model is how
  much of it lands in that model: the contribution f_i(t) * ||W_dec[i, m]|| (raw units, the
  norm of the vector latent i adds to model m's reconstruction at token t, the vector that
  ablation subtracts). Both sides are shaded on one scale per latent, so a distilled-only
  latent is pale on the base side, and the ratio of the two sides is the latent's raw
  decoder-norm ratio at every token;
- its top promoted tokens per model: the decoder row W_dec[i, m] (raw) through model m's final
  RMSNorm gain and unembedding, `W_U_m (gamma_m * W_dec[i, m])`; the norm's 1/rms factor is
  left out because it scales every logit alike and leaves the ranking unchanged (a direction
  read alone, without the rest of the residual stream: a logit-lens view, not an effect);
- the histogram of its nonzero activations over every store row (`ActivationHistogram`).

`browser.html#latent=<id>` opens any latent, listed in the table or not (`browser_page`): the
links of the reports. Its class is the analysis' (`norms.classify`: dead when it never fired
on a held-out row).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from xcoder_jax.analysis import browser_page
from xcoder_jax.analysis import examples as ex
from xcoder_jax.analysis.histogram import ActivationHistogram
from xcoder_jax.analysis.norms import CLASSES
from xcoder_jax.fileio import atomic_write_bytes
from xcoder_jax.lexicon import CATEGORY_NAMES

BROWSER = "browser.html"
# Latents whose context rows are read from the store together (memory: their examples x
# window x n_models x d_model floats).
CONTEXT_BLOCK = 256


def _promoted(models, w_dec: torch.Tensor, ids: list[int], k: int, *, block: int = 256):
    """Per model m: [len(ids), k] (token ids, logits) of W_U_m (gamma_m * W_dec[i, m])."""
    out = []
    for m, model in enumerate(models):
        w_u = model.get_output_embeddings().weight.detach().float().cpu()  # [V, d]
        norm = getattr(model.base_model, "norm", None)
        gain = norm.weight.detach().float().cpu() if norm is not None else torch.ones(w_u.shape[1])
        tok, val = [], []
        for lo in range(0, len(ids), block):
            logits = (w_dec[ids[lo : lo + block], m] * gain) @ w_u.T
            v, t = torch.topk(logits, min(k, logits.shape[1]), dim=1)
            tok.append(t), val.append(v)
        out.append((torch.cat(tok).numpy(), torch.cat(val).numpy()))
    return out


def _contexts(store, encoder, latents: list[int], rows: list[np.ndarray], *, before, after):
    """Windows around each latent's example rows and its f at every token of them.

    latents: ids; rows: per latent, its example rows [n_i]. The rows of all windows are read
    from the store at once (reading shard by shard is what costs). Returns per latent
    (tokens [n_i, w] int (PAD outside the document), f [n_i, w] float32 (0 at PAD)).
    """
    flat = np.concatenate(rows)
    win = ex.gather_windows(store, flat, before, after)
    tokens = win["tokens"]
    valid = tokens != ex.PAD
    global_rows = flat[:, None] + np.arange(-before, after + 1)[None, :]
    unique, where = np.unique(global_rows[valid], return_inverse=True)
    x = store.rows(unique)  # [n_unique, m, d] raw
    slot = np.full(tokens.shape, -1, np.int64)
    slot[valid] = where
    out, lo = [], 0
    for latent, r in zip(latents, rows):
        t, s = tokens[lo : lo + len(r)], slot[lo : lo + len(r)]
        f = np.zeros(t.shape, np.float32)
        # Gathered in NumPy: torch's advanced indexing costs ~100x more per call here.
        f[s >= 0] = encoder.latent_acts(torch.from_numpy(x[s[s >= 0]]), [latent])[:, 0].numpy()
        out.append((t, f))
        lo += len(r)
    return out


class LatentDigest:
    """What the page keeps of each latents.jsonl line, collected while the lines are written
    (`add`, in id order): the line's table row, and the places (row, document, position,
    doc_start) of its first `n_examples` examples, whose contexts the page may show."""

    def __init__(self, n_examples: int):
        self.n_examples = n_examples
        self.table: list[dict] = []
        self.places: list[list[dict]] = []

    def add(self, line: dict) -> None:
        sc = line.get("scaling") or {}
        self.table.append({
            "id": line["id"], "nrn": line["nrn"], "class": line["class"],
            "cosine": line["cosine"], "freq": line["firing_freq"],
            "freq_store": line["firing_freq_store"], "ratio_error": sc.get("ratio_error"),
            "ratio_reconstruction": sc.get("ratio_reconstruction"),
            "categories": line["categories"], "label": line["label"],
            "top_tokens": sorted({e["token"] for e in line["top_examples"]}),
        })  # fmt: skip
        keys = ("row", "doc", "position", "doc_start")
        self.places.append(
            [{k: e[k] for k in keys} for e in line["top_examples"][: self.n_examples]]
        )


def detailed_latents(table: list[dict], limit: int) -> list[int]:
    """The latents whose contexts the page keeps: those with examples, most exclusive
    (|NRN - 0.5|) first, then the most frequent; at most `limit`. table: the rows of
    `LatentDigest`."""
    alive = [r for r in table if r["top_tokens"]]
    alive.sort(key=lambda r: (-abs(r["nrn"] - 0.5), -r["freq_store"], r["id"]))
    return sorted(r["id"] for r in alive[:limit])


def browser_data(
    digest: LatentDigest, *, store, encoder, models, tokenizer, hist: ActivationHistogram, ac
) -> dict:
    """Everything the page shows, JSON-ready. digest: latents.jsonl's lines as the page keeps
    them; models: the HF pair in crosscoder order (empty: no promoted tokens); encoder: the
    `ExportedCrosscoder` (raw units, with its roles)."""
    detail_ids = detailed_latents(digest.table, int(ac.browser_latents))
    used: set[int] = set()
    details = _details(digest, detail_ids, store=store, encoder=encoder, models=models,
                       hist=hist, ac=ac, used=used)  # fmt: skip
    vocab_ids = sorted(used)
    texts = ex.decode_pieces(tokenizer, [[t] for t in vocab_ids])
    return {
        "roles": list(encoder.roles),
        "classes": list(CLASSES),
        "categories": list(CATEGORY_NAMES),
        "store_rows": int(store.n_rows),
        "first_position": int(store.manifest.get("first_position", 1)),
        "hist_edges": [float(f"{v:.4g}") for v in hist.edges],
        "vocab": {str(t): s for t, s in zip(vocab_ids, texts)},
        "latents": digest.table,
        "details": details,
        "limits": {"browser_latents": int(ac.browser_latents), "examples": digest.n_examples},
    }


def _details(digest, detail_ids, *, store, encoder, models, hist, ac, used: set) -> dict:
    """{id: what a click shows} of the detailed latents; `used` collects the token ids shown."""
    before, after = int(ac.context_before), int(ac.context_after)
    dec_norm = torch.linalg.vector_norm(encoder.W_dec, dim=-1).numpy()  # [h, m] raw
    k = int(ac.browser_promoted)
    promoted = _promoted(models, encoder.W_dec, detail_ids, k) if models and k > 0 else None
    counts = hist.counts
    details = {}
    contexts = {}
    for lo in range(0, len(detail_ids), CONTEXT_BLOCK):
        ids = detail_ids[lo : lo + CONTEXT_BLOCK]
        rows = [np.array([e["row"] for e in digest.places[i]]) for i in ids]
        contexts.update(zip(ids, _contexts(store, encoder, ids, rows, before=before, after=after)))
    for j, i in enumerate(detail_ids):
        tokens, f = contexts.pop(i)
        exs = []
        for e, t, fv in zip(digest.places[i], tokens, f):
            keep = t != ex.PAD
            used.update(t[keep].tolist())
            exs.append({
                "tokens": t[keep].tolist(),
                "centre": int(keep[:before].sum()),
                "f": [float(f"{v:.5g}") for v in fv[keep]],
                "doc": e["doc"], "position": e["position"], "doc_start": e["doc_start"],
            })  # fmt: skip
        nz = np.flatnonzero(counts[i])
        d = {
            "dec_norm": [float(f"{v:.6g}") for v in dec_norm[i]],
            "examples": exs,
            "hist": {"first": int(nz[0]), "counts": counts[i, nz[0] : nz[-1] + 1].tolist()}
            if len(nz) else None,
        }  # fmt: skip
        if promoted is not None:
            d["promoted"] = [
                [[int(t), round(float(v), 4)] for t, v in zip(tok[j], val[j])]
                for tok, val in promoted
            ]
            used.update(int(t) for tok, _ in promoted for t in tok[j])
        details[str(i)] = d
    return details


def write_browser(path: str, data: dict) -> None:
    """Writes the page atomically; the data goes in as JSON inside a non-executed script
    element, '</' escaped so no string in it can close the element."""
    blob = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    page = browser_page.render(blob)
    atomic_write_bytes(path, lambda f: f.write(page.encode("utf-8")))
