"""What a latent is, in a word or two: a label from the tokens its top examples fire on.

No language model reads the examples: each firing token is put in a group by what it is (a
marker of the lexicon, a digit, a punctuation mark, whitespace, a word), and the label names
the group that holds enough of them. A reader sees at once that a latent is a "digit" or a
"full stop" feature, or that it fires on the marker " Wait".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from xcoder_jax.lexicon import CATEGORIES

# Names of the punctuation marks and symbols a label spells out (a token made of one of them,
# spaces aside); any other token without a letter or digit is a "symbol".
PUNCTUATION = {
    ".": "full stop", ",": "comma", "?": "question mark", "!": "exclamation mark",
    ":": "colon", ";": "semicolon", "+": "plus sign", "-": "minus sign", "*": "times sign",
    "/": "slash", "=": "equals sign", "(": "opening bracket", ")": "closing bracket",
    '"': "quotation mark", "'": "apostrophe", "$": "dollar sign", "%": "percent sign",
}  # fmt: skip
# The lexicon's marker words as a bare token reads them (" Wait" and "Wait" alike).
_MARKER_WORDS = {m.strip(): cat for cat, markers in CATEGORIES.items() for m in markers}

NEVER_FIRES = "never fires"
MIXED = "mixed"


def token_group(token: str, marker: str | None = None) -> str:
    """The group of one firing token (the text of the token, as decoded).

    "marker '<token>'" when the token ends a marker of the lexicon (`marker`: the category
    the analysis found ending there, or the token itself is a marker word); "digit" for a
    token of digits; a name of `PUNCTUATION` ("full stop", "comma", ...); "space" or
    "newline" for whitespace; "symbol '<token>'" for any other token without a letter or
    digit; else "word '<token>'". Surrounding spaces are ignored except in the quoted token.
    """
    bare = token.strip()
    if marker or bare in _MARKER_WORDS:
        return f"marker {token!r}"
    if not bare:
        return "newline" if "\n" in token else "space"
    if bare.isdigit():
        return "digit"
    if bare in PUNCTUATION:
        return PUNCTUATION[bare]
    if not any(ch.isalnum() for ch in bare):
        return f"symbol {token!r}"
    return f"word {token!r}"


def latent_label(examples: Sequence[dict], min_share: float = 0.5) -> str:
    """A latent's label from its top examples (dicts with "token", optionally "marker").

    Each example falls in the group of its firing token (`token_group`). The label is the
    largest group when it holds at least `min_share` of the examples (ties: the group of the
    strongest example first): "digit" when >= min_share of them fire on a digit token, "full
    stop", "marker ' Wait'", "word ' apples'". Otherwise, when at least `min_share` fire on
    markers of one category, "<category> markers"; when at least `min_share` fire on words,
    "words" and the two most frequent; else "mixed". "never fires" without examples.
    """
    if not examples:
        return NEVER_FIRES
    need = min_share * len(examples)
    groups = [token_group(e["token"], e.get("marker")) for e in examples]
    group, n = Counter(groups).most_common(1)[0]
    if n >= need:
        return group
    cats = Counter(
        e.get("marker") or _MARKER_WORDS[e["token"].strip()]
        for e, g in zip(examples, groups)
        if g.startswith("marker ")
    )
    if cats and cats.most_common(1)[0][1] >= need:
        return f"{cats.most_common(1)[0][0]} markers"
    words = Counter(e["token"] for e, g in zip(examples, groups) if g.startswith("word "))
    if sum(words.values()) >= need:
        return "words " + ", ".join(repr(t) for t, _ in words.most_common(2))
    return MIXED
