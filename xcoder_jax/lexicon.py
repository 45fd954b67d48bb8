"""The reasoning lexicon: categories and their marker strings, in one place.

The zoo's teacher writes these markers, the analysis maps them to token ids, and steering
counts them in generations where they are used as reasoning moves (`REASONING_FORMS`,
`count_reasoning_markers`: "Wait," opening a sentence, not "Wait for me"). Markers are
written as they appear inside text, with the leading space that makes them one BPE token
(" Wait"); counting bare words in free text also accepts a marker at the very start of it.

Where in a token stream a marker occurrence is read (`ANCHORS`, `marker_read_rows`) is also
defined here, once, for the analysis and for the latent selection of steering and ablation.
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


# --- Markers used as reasoning moves --------------------------------------------------------
# `count_markers` counts bare words: "Wait for me, said Tom." holds a " Wait". In generated
# text that matters, so generations are scored with the one rule below. A marker is a
# reasoning move when it opens a sentence (start of the text, or after . ! ? : followed by
# whitespace, or after a newline) and is followed by the clause boundary its form takes:
#
#   "Wait", "Therefore", "Thus", "Alternatively", "However": a comma ("Wait," "Thus,"); Wait
#       also takes the other boundaries of an interjection ("Wait:" "Wait;" "Wait..."
#       "Wait -"), never "Wait." / "Wait!" / "Wait for" (the everyday imperative);
#   "But": opens the clause itself, so a comma or the next word ("But the answer is not 8.");
#   verification (" check", " verify"): the speaker announces it, "let me check" / "I can
#       verify" (after "let me", "I can", "I will", "I'll", "I should", any case, an optional
#       "double-"), or a sentence-initial "To check" / "To verify".
#
# The teacher (`zoo.teacher`) writes every marker in such a form; the zoo's everyday
# sentences ("Wait here, said Ann.", "Therefore Ben went home.", "Cy will check the box.")
# mostly do not. Everyday occurrences are the bare words left over.

SENTENCE_START = r"(?:\A\s*|(?<=[.!?:])\s+|(?<=\n)[ \t]*)"
_AFTER = {  # what must follow a sentence-initial marker word (a lookahead)
    "Wait": r"(?=\s*(?:[,;:]|\.\.\.|\u2026)|\s+[-\u2013\u2014]\s)",
    "But": r"(?=,|\s+[A-Za-z0-9])",
}
_COMMA = r"(?=,)"
_ANNOUNCE = r"(?i:\b(?:let\s+me|I\s+can|I\s+will|I'll|I\s+should)\s+(?:double-)?)"


def _move_patterns(category: str) -> list[re.Pattern]:
    words = [m.strip() for m in CATEGORIES[category]]
    if category == "verification":
        # The marker word itself is the group "m": everyday counts subtract these spans.
        alt = "|".join(map(re.escape, words))
        return [
            re.compile(rf"{_ANNOUNCE}(?P<m>(?i:{alt}))\b"),
            re.compile(rf"{SENTENCE_START}To\s+(?P<m>{alt})\b"),
        ]
    return [
        re.compile(rf"{SENTENCE_START}(?P<m>{re.escape(w)}){_AFTER.get(w, _COMMA)}") for w in words
    ]


_MOVES = {cat: _move_patterns(cat) for cat in CATEGORIES}

REASONING_FORMS: Mapping[str, str] = {
    "self_reflection": "sentence-initial 'Wait' followed by a comma, colon, semicolon, "
    "ellipsis or dash",
    "deductive": "sentence-initial 'Therefore,' / 'Thus,' (with the comma)",
    "alternative": "sentence-initial 'Alternatively,' (with the comma)",
    "contrastive": "sentence-initial 'However,' (with the comma) or 'But' opening a clause",
    "verification": "'let me / I can / I will / I'll / I should (double-)check|verify' in any "
    "case, or a sentence-initial 'To check' / 'To verify'",
}


def _move_starts(text: str, category: str) -> set[int]:
    """Character offsets where a marker word of `category` is used as a reasoning move."""
    return {m.start("m") for p in _MOVES[category] for m in p.finditer(text)}


def reasoning_move_starts(text: str, category: str) -> list[int]:
    """Character offsets (ascending) of the marker words of `category` used as reasoning
    moves (`REASONING_FORMS`): where a trace's reflection rounds begin, for "self_reflection"."""
    return sorted(_move_starts(text, category))


def count_reasoning_markers(text: str) -> dict[str, int]:
    """Markers used as reasoning moves (`REASONING_FORMS`), per category."""
    return {cat: len(_move_starts(text, cat)) for cat in CATEGORIES}


def count_everyday_markers(text: str) -> dict[str, int]:
    """Bare marker words (as `count_markers` finds them) NOT used as reasoning moves."""
    out = {}
    for cat, pats in _PATTERNS.items():
        moves = _move_starts(text, cat)
        out[cat] = sum(1 for p in pats for m in p.finditer(text) if m.start() not in moves)
    return out


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
    ends (is fully read) at s + n - 1; `marker_read_rows` says where an occurrence is read.
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


# --- Where an occurrence is read -----------------------------------------------------------
# A latent "fires on" a marker occurrence when it is active at one row chosen relative to the
# occurrence. The analysis and the latent selection of steering/ablation choose different
# rows for a reason, so the choice is named and made here only.

ANCHORS: Mapping[str, str] = {
    "read": "the marker's last token: the whole marker has just been read",
    "first": "the marker's first token",
    "predict": "the token before the marker's first token: its output predicts the marker",
}


def anchor_lag(anchor: str | int, n: int) -> int:
    """How many rows before the last token of an n-token marker the `anchor` row lies (>= 0).

    anchor: a name in `ANCHORS`, or an int offset <= 0 from the marker's FIRST token (0 is
    "first", -1 is "predict"; the configs' `fire_offset` is such an offset). Offsets after
    the first token are refused: they would land inside a marker or after it, on a different
    token for each marker length.
    """
    if isinstance(anchor, str):
        if anchor not in ANCHORS:
            raise ValueError(f"unknown marker anchor {anchor!r}; one of {tuple(ANCHORS)}")
        return {"read": 0, "first": n - 1, "predict": n}[anchor]
    if isinstance(anchor, bool) or not isinstance(anchor, (int, np.integer)) or anchor > 0:
        raise ValueError(
            f"marker anchor must be one of {tuple(ANCHORS)} or an offset <= 0 from the "
            f"marker's first token (-1: 'predict'), got {anchor!r}"
        )
    return n - 1 - int(anchor)


def marker_carry(seqs: Sequence[Sequence[int]], anchor: str | int) -> int:
    """Rows of the previous shard that `marker_read_rows` needs before a shard.

    Enough for every occurrence of `seqs` ending in the shard to be found whole and for its
    `anchor` row to be inside the carry or the shard.
    """
    anchor_lag(anchor, 1)  # refuses a bad anchor even when there are no forms
    return max([max(len(ids) - 1, anchor_lag(anchor, len(ids))) for ids in seqs] + [0])


def stretches(index: np.ndarray) -> np.ndarray:
    """Stretch ids [T] of stored rows from their (document, position) pairs [T, 2].

    A stretch is a run of consecutive tokens of one document: a new one starts where the
    document changes or where positions skip (a token the store excluded). Passed to
    `marker_read_rows` as `docs`, it keeps a marker from spanning an excluded token and makes
    an anchor row the token really next to the marker, not the stored row before a gap.
    """
    index = np.asarray(index).reshape(-1, 2)
    new = np.ones(len(index), bool)
    new[1:] = (index[1:, 0] != index[:-1, 0]) | (index[1:, 1] != index[:-1, 1] + 1)
    return np.cumsum(new)


def marker_read_rows(
    tokens: np.ndarray,
    docs: np.ndarray,
    seqs: Sequence[Sequence[int]],
    anchor: str | int = "read",
    carry: int = 0,
) -> np.ndarray:
    """Rows at which the occurrences of the marker forms `seqs` are read: the one rule.

    tokens, docs: [carry + rows] int, a shard's token ids and document ids preceded by the
    last `carry` rows of the previous shard (`carry=0`: no previous shard, or a lone array).
    seqs: token-id sequences of the marker forms (e.g. `marker_token_ids(...)[category]`).
    anchor: where an occurrence is read, a name in `ANCHORS` or an offset <= 0 from its
    first token (`anchor_lag`):

    - "read", the marker's last token: the whole marker has just been read. The analysis
      uses it to describe the latents active on a marker.
    - "predict", the token before its first token: the position whose output predicts the
      marker, where steering and ablation measure the marker's logit. Their latent
      selection (`specificity.specificity_scores`, `selection.fire_offset = -1`) uses it.

    For a one-token marker "read" and "first" are the same row; for longer markers they are
    not, so the anchor has to be stated, not assumed.

    An occurrence is the whole id sequence inside one document (`find_marker`) and belongs to
    the shard that holds its LAST token: with consecutive shards and `carry >=
    marker_carry(seqs, anchor)`, each occurrence is found exactly once, including one split
    across a shard boundary (those ending inside the carry were found with the previous
    shard). It is read at its anchor row only when that row lies in `tokens` and in the
    occurrence's own document: the row before a marker that opens a document belongs to
    another text, whose output does not predict the marker.

    Returns int64 [n] ascending and unique, rows relative to the shard: row r is
    `tokens[carry + r]`, so r < 0 lies in the carry (possible for anchors before the last
    token). Forms read at the same row count once.
    """
    tokens, docs = np.asarray(tokens), np.asarray(docs)
    rows = [np.zeros(0, np.int64)]
    for ids in seqs:
        ends = find_marker(tokens, ids, docs) + len(ids) - 1
        ends = ends[ends >= carry]  # ended in the carry: counted with the previous shard
        at = ends - anchor_lag(anchor, len(ids))
        keep = at >= 0
        at, ends = at[keep], ends[keep]
        rows.append(at[docs[at] == docs[ends]] - carry)
    return np.unique(np.concatenate(rows))
