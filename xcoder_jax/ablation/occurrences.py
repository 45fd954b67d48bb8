"""The marker occurrences the ablation measures at, in the held-out documents.

Every category's occurrences are read at the position that predicts the marker's first token
(`probe.marker_positions`), in the documents that hold at least one (the probe's batch rows),
so that one probe serves every category and every latent set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcoder_jax.ablation.probe import marker_positions
from xcoder_jax.activations.exclude import Exclusion


@dataclass(frozen=True)
class Occurrences:
    """where: [(probe row, position, marker's first token id)] of every occurrence, categories
    in order; category: [n] category index of each; documents: [n] its document id (the
    bootstrap's cluster); probe_docs: indices into the measured documents of the probe's rows
    (those holding a marker); marker_ids: [M] every category's marker first tokens, sorted;
    columns: {category: indices into marker_ids of its markers}."""

    where: list[tuple[int, int, int]]
    category: np.ndarray
    documents: np.ndarray
    probe_docs: list[int]
    marker_ids: list[int]
    columns: dict[str, list[int]]

    def of(self, c: int) -> np.ndarray:
        """Indices into `where` of category c's occurrences."""
        return np.flatnonzero(self.category == c)


def locate(
    docs: list[np.ndarray], doc_ids: list[int], *, forms: dict, categories, exclusion: Exclusion
) -> Occurrences:
    """The occurrences of `categories`' markers (`forms`: {category: [id sequences]}) in
    `docs` (token ids, document `doc_ids[i]`), at the positions the store keeps."""
    per_cat = {cat: marker_positions(docs, forms[cat], exclusion) for cat in categories}
    held = sorted({d for w in per_cat.values() for d, _, _ in w})  # documents holding a marker
    probe_row = {d: i for i, d in enumerate(held)}
    where, cat_of = [], []
    for c, cat in enumerate(categories):
        where += [(probe_row[d], p, t) for d, p, t in per_cat[cat]]
        cat_of += [c] * len(per_cat[cat])
    marker_ids = sorted({int(f[0]) for cat in categories for f in forms[cat]})
    columns = {cat: [marker_ids.index(int(f[0])) for f in forms[cat]] for cat in categories}
    return Occurrences(
        where=where,
        category=np.asarray(cat_of, np.int64),
        documents=np.array([doc_ids[held[d]] for d, _, _ in where], np.int64),
        probe_docs=held,
        marker_ids=marker_ids,
        columns=columns,
    )
