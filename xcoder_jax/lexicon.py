"""The reasoning lexicon: categories and their marker strings, in one place.

The zoo's teacher writes these markers, the analysis maps them to token ids, and steering
counts them in generations. Markers are written as they appear inside text, with the
leading space that makes them one BPE token (" Wait"); counting in free text also accepts a
marker at the very start of the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

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
