"""analysis/latents.jsonl: one JSON line per latent, written block by block.

A line holds the latent's NRN (ours: 0 base-only, 1 distilled-only, L1 norms by default) and
`dec_norm_diff` (the diffing toolkit's: 1 base-only, 0 distilled-only, L2 norms; see
`norms`) and class, decoder norms per model (normalised units), the
cosine of its two decoder rows, firing frequencies, its top examples with text context, its
category tags, an automatic label and, for the base-only and distilled-only latents given a
fit, the latent scaling (`scaling.report`: betas per target, error and reconstruction
ratios; None where the latent was not fitted). Strict JSON (no NaN). Lines
are rendered `block` latents at a time, so a 32768-latent export never has all its example
texts in memory; only the examples of the latents the report shows are kept.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from xcoder_jax import strict_json as strict
from xcoder_jax.activations.manifest import atomic_write_bytes
from xcoder_jax.analysis import examples as ex
from xcoder_jax.analysis.norms import CLASSES


@dataclass
class LatentTable:
    """Per-latent arrays, all of length n_latents (norms: [n_latents, n_models])."""

    nrn: np.ndarray
    classes: np.ndarray
    norms_l1: np.ndarray
    norms_l2: np.ndarray
    cosine: np.ndarray
    freq_heldout: np.ndarray  # share of held-out rows with f > 0
    freq_store: np.ndarray  # share of all store rows with f > 0
    tags: dict[int, list[str]]
    scaling: dict[int, dict]
    # The diffing toolkit's relative norm (`norms.dec_norm_diff`: 1 base-only, 0 distilled-only).
    dec_norm_diff: np.ndarray | None = None


def _round(values, nd: int = 5) -> list:
    return [round(float(v), nd) for v in values]


def _line(i: int, table: LatentTable, examples: list[dict], lab: dict) -> dict:
    return {
        "id": i,
        "nrn": round(float(table.nrn[i]), 5),
        "class": CLASSES[table.classes[i]],
        **(
            {}
            if table.dec_norm_diff is None
            else {"dec_norm_diff": round(float(table.dec_norm_diff[i]), 5)}
        ),
        "norms": {"l1": _round(table.norms_l1[i]), "l2": _round(table.norms_l2[i])},
        "cosine": round(float(table.cosine[i]), 5),
        "firing_freq": float(table.freq_heldout[i]),
        "firing_freq_store": float(table.freq_store[i]),
        "label": lab["label"],
        "label_detail": {k: v for k, v in lab.items() if k != "label"},
        "categories": table.tags.get(i, []),
        "scaling": table.scaling.get(i),
        "top_examples": examples,
    }


def write_latents(
    path: str,
    store,
    table: LatentTable,
    top_values: np.ndarray,
    top_rows: np.ndarray,
    forms: dict[str, list[tuple[int, ...]]],
    tokenizer,
    context_before: int,
    context_after: int,
    keep: Collection[int],
    label_min_share: float = 0.5,
    block: int = 1024,
) -> tuple[list[str], dict[int, dict]]:
    """Writes latents.jsonl atomically. Returns (label per latent, {id: line} for `keep`).

    top_values, top_rows: [n_latents, k] from the streaming top-k (row -1: no example).
    Context windows reach at least as far back as the longest marker, so an example's
    firing token can be checked for being the end of a marker.
    """
    longest = max([len(s) for seqs in forms.values() for s in seqs] + [1])
    before = max(context_before, longest - 1)
    n_latents = len(table.nrn)
    labels: list[str] = []
    kept: dict[int, dict] = {}
    keep = set(int(i) for i in keep)

    def write(f):
        for lo in range(0, n_latents, block):
            hi = min(lo + block, n_latents)
            rows = top_rows[lo:hi]
            valid = rows >= 0
            flat_rows = rows[valid]
            if len(flat_rows):
                windows = ex.gather_windows(store, flat_rows, before, context_after)
                cats = ex.marker_category_at(windows["tokens"], before, forms)
                rendered = ex.render(
                    windows, top_values[lo:hi][valid], flat_rows, before, tokenizer, cats
                )
            else:
                rendered = []
            counts = valid.sum(1)
            start = 0
            for i, n in zip(range(lo, hi), counts):
                examples = rendered[start : start + n]
                start += n
                lab = ex.label(examples, label_min_share)
                labels.append(lab["label"])
                line = _line(i, table, examples, lab)
                if i in keep:
                    kept[i] = line
                f.write((strict.dumps(line) + "\n").encode())

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_bytes(path, write)
    return labels, kept
