"""Reasoning categories: marker positions in the store, the latents that fire on them, their NRN.

Markers come from `xcoder_jax.lexicon` as token-id sequences. A marker occurrence is read at
the lexicon's "read" anchor (`ANCHOR`, see `lexicon.marker_read_rows`): its LAST token, where
the whole marker has been read (for single-token markers, the marker token itself). The
analysis describes what the models represent on a marker, so it reads latents once the marker
is complete; steering and ablation read them where the marker is predicted instead (see
`xcoder_jax.selection`). Following the paper, a latent "fires on" a category when the number
of the category's occurrences on which it is active exceeds `firing_share` (10%) of the
largest such count over all latents.

The category's NRN is compared with that of the ALIVE latents, those active on at least one
row of the store (the rows the marker counts come from). A dead latent's decoder row is
whatever initialisation and the sparsity penalty left, so its NRN says nothing about either
model; dead latents would pull the baseline towards their arbitrary values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xcoder_jax import stats
from xcoder_jax.analysis.norms import CLASSES, histogram
from xcoder_jax.lexicon import CATEGORY_NAMES, marker_read_rows
from xcoder_jax.marker_tokens import MarkerGroups, marker_groups

if TYPE_CHECKING:
    from xcoder_jax.analysis.facts import LatentFacts
    from xcoder_jax.analysis.stream import ScanResult

__all__ = ["ANCHOR", "MarkerGroups", "category_stats", "firing_latents", "marker_groups",
           "marker_rows"]  # fmt: skip

# The analysis describes a marker that has just been read.
ANCHOR = "read"


def marker_rows(
    tokens: np.ndarray, docs: np.ndarray, seqs: Sequence[tuple[int, ...]], carry: int
) -> np.ndarray:
    """Rows of the shard at which one of `seqs` is read (`ANCHOR`: where it ends).

    tokens, docs: [carry + rows] a shard's tokens and documents preceded by the last `carry`
    rows of the previous shard, so that a marker split across two shards is still found.
    Returns indices into the shard (carry excluded), ascending and unique.
    """
    return marker_read_rows(tokens, docs, seqs, ANCHOR, carry)


def firing_latents(counts: np.ndarray, share: float) -> np.ndarray:
    """Latents whose count exceeds `share` of the largest count [n_latents] -> ids ascending.

    No latent fires on a category whose markers never occur (all counts zero).
    """
    top = counts.max(initial=0)
    if top <= 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(counts > share * top)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def category_stats(
    groups: MarkerGroups, scan: ScanResult, facts: LatentFacts, ac
) -> tuple[dict, dict[int, list[str]]]:
    """Per-category summary and each latent's category tags.

    scan: `stream.scan_store` with `groups.groups` (group_rows [G], group_fire [G, h],
    group_act [G, h], fire_count [h]: firing rows over the whole store, 0: dead); facts: the
    latents' NRN and classes; ac: the `analysis` config section (firing_share, top_latents,
    nrn_bins). Top latents are the firing latents ranked by the share of their firings that
    land on the category's markers (how specific they are), then by activation on the markers.

    Per category, against the alive latents: "mean_nrn_alive" (the baseline, same for every
    category), "nrn_minus_alive" (mean NRN of the firing latents minus that of the alive
    latents outside the firing set, Welch-t 95% CI) and "top_distilled_only" (distilled-only
    latents among the top latents against their share of the alive latents, Wilson 95% CI).
    """
    nrn, classes = facts.nrn, facts.classes
    alive = scan.fire_count > 0
    # Share of distilled-only latents among the alive ones: the rate a category's top list
    # would show if category membership said nothing about the class.
    baseline = {
        "mean_nrn_alive": _mean(nrn[alive]),
        "alive_share": float((classes[alive] == 2).mean()) if alive.any() else None,
    }
    tags: dict[int, list[str]] = {}
    out = {}
    for c, cat in enumerate(CATEGORY_NAMES):
        out[cat] = _category(groups, c, scan, facts, ac=ac, baseline=baseline)
        for i in out[cat]["firing_latents"]:
            tags.setdefault(int(i), []).append(cat)
    return out, tags


def _category(groups: MarkerGroups, c: int, scan, facts, *, ac, baseline: dict) -> dict:
    """The summary of category c (see `category_stats`)."""
    nrn, classes, fire_count = facts.nrn, facts.classes, scan.fire_count
    cat = CATEGORY_NAMES[c]
    occ = int(scan.group_rows[c])
    fire = scan.group_fire[c]
    ids = firing_latents(fire, ac.firing_share)
    markers = {}
    for j, (ids_j, text) in enumerate(zip(groups.forms[cat], groups.texts[cat])):
        g = groups.form_group(cat, j)
        f_ids = firing_latents(scan.group_fire[g], ac.firing_share)
        markers[text] = {
            "token_ids": list(ids_j),
            "occurrences": int(scan.group_rows[g]),
            "n_firing_latents": len(f_ids),
            "mean_nrn": _mean(nrn[f_ids]),
        }
    with np.errstate(invalid="ignore", divide="ignore"):
        share_on = np.where(fire_count > 0, fire / np.maximum(fire_count, 1), 0.0)
    order = sorted(ids.tolist(), key=lambda i: (-share_on[i], -scan.group_act[c, i]))
    top = [
        {
            "id": int(i),
            "nrn": round(float(nrn[i]), 4),
            "class": CLASSES[classes[i]],
            "fire_rate": round(float(fire[i] / max(occ, 1)), 4),
            "marker_share": round(float(share_on[i]), 4),
            "mean_act": round(float(scan.group_act[c, i] / max(occ, 1)), 4),
        }
        for i in order[: ac.top_latents]
    ]
    others = fire_count > 0
    others[ids] = False  # Welch compares disjoint groups: the firing set vs the rest
    n_top_d = sum(t["class"] == "distilled_only" for t in top)
    alive_share = baseline["alive_share"]
    return {
        "markers": markers,
        "occurrences": occ,
        "max_count": int(fire.max(initial=0)),
        "threshold_count": float(ac.firing_share * fire.max(initial=0)),
        "n_firing_latents": len(ids),
        "firing_latents": ids.tolist(),
        "firing_nrn": [round(float(v), 4) for v in nrn[ids]],
        "mean_nrn": _mean(nrn[ids]),
        "mean_nrn_alive": baseline["mean_nrn_alive"],
        "nrn_minus_alive": stats.welch_ci(nrn[ids], nrn[others]),
        "top_distilled_only": {
            "count": n_top_d,
            "n_top": len(top),
            "alive_share": alive_share,
            "excess": stats.proportion_ci(n_top_d, len(top), baseline=alive_share or 0.0),
        },
        "class_counts": {name: int((classes[ids] == k).sum()) for k, name in enumerate(CLASSES)},
        "nrn_hist": histogram(nrn[ids], ac.nrn_bins),
        "top_latents": top,
    }
