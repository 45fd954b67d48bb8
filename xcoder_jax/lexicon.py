"""The reasoning lexicon: categories and their marker strings, in one place.

The zoo's teacher writes these markers, the analysis maps them to token ids, and steering
counts them in generations. Markers are written as they appear inside text, with the
leading space that makes them one BPE token (" Wait"); counting in free text also accepts a
marker at the very start of the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

# Category -> marker strings. The first four are the paper's; verification is the paper's
# "computation verification" ("let me check").
CATEGORIES: Mapping[str, tuple[str, ...]] = {
    "self_reflection": (" Wait",),
    "deductive": (" Therefore", " Thus"),
    "alternative": (" Alternatively",),
    "contrastive": (" However", " But"),
    "verification": (" check", " verify"),
}

CATEGORY_NAMES: tuple[str, ...] = tuple(CATEGORIES)


def _marker_pattern(marker: str) -> re.Pattern:
    word = re.escape(marker.strip())
    # A marker is a whole word preceded by whitespace or the start of the text.
    return re.compile(rf"(?:(?<=\s)|^){word}(?![A-Za-z])")


_PATTERNS = {cat: [_marker_pattern(m) for m in ms] for cat, ms in CATEGORIES.items()}


def count_markers(text: str) -> dict[str, int]:
    """Marker occurrences per category in `text`."""
    return {cat: sum(len(p.findall(text)) for p in pats) for cat, pats in _PATTERNS.items()}


def has_marker(text: str) -> bool:
    """Whether `text` contains any reasoning marker of any category."""
    return any(p.search(text) for pats in _PATTERNS.values() for p in pats)


# --- Markers as token ids ----------------------------------------------------------------
# The analysis and steering work on token ids. A marker may be several tokens under some
# tokenizers (" Alternatively" is rarely one token outside Qwen2.5's vocabulary); an
# occurrence is then the whole id sequence, inside one document.


def marker_token_ids(tokenizer, bare: bool = False) -> dict[str, list[tuple[int, ...]]]:
    """Token-id sequences of every marker: {category: [ids of each marker form]}.

    Each marker is encoded as it appears inside text, with its leading space and without
    special tokens (" Wait" -> one id in byte-level BPEs). With `bare=True` a marker also
    contributes its form without the space, as byte-level BPEs tokenise it at the start of
    a line ("\\n\\nWait" in R1-style traces), when that form's ids differ. Forms are listed
    in lexicon order, the spaced form of each marker first.
    """
    out: dict[str, list[tuple[int, ...]]] = {}
    for category, markers in CATEGORIES.items():
        forms: list[tuple[int, ...]] = []
        for marker in markers:
            texts = (marker, marker.lstrip()) if bare else (marker,)
            for text in texts:
                ids = tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in forms:
                    forms.append(ids)
        out[category] = forms
    return out


def find_marker(
    tokens: np.ndarray, ids: Sequence[int], docs: np.ndarray | None = None
) -> np.ndarray:
    """Start indices where the id sequence `ids` occurs in `tokens` [T] (int array).

    `docs` [T] (optional): the document of each token; an occurrence must lie inside one
    document. Returns int64 [n_occurrences], ascending. A marker of n ids that starts at s
    ends (is fully read) at s + n - 1, the position the analysis attributes it to.
    """
    tokens = np.asarray(tokens)
    docs = None if docs is None else np.asarray(docs)
    n = len(ids)
    if n == 0 or len(tokens) < n:
        return np.zeros(0, np.int64)
    span = len(tokens) - n + 1
    hit = tokens[:span] == ids[0]
    for j in range(1, n):
        hit &= tokens[j : span + j] == ids[j]
        if docs is not None:
            hit &= docs[j : span + j] == docs[:span]
    return np.flatnonzero(hit).astype(np.int64)
