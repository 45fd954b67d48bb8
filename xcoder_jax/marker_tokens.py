"""The lexicon's markers as token ids of one tokenizer, grouped as the stages count them.

`lexicon.marker_token_ids` gives every category's marker forms as token-id sequences;
`MarkerGroups` adds their texts and the order in which the analysis counts them while
streaming (one group per category, then one per marker form). Steering and the ablation
read only the forms (`marker_groups(tokenizer).forms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from xcoder_jax.lexicon import CATEGORY_NAMES, marker_token_ids


@dataclass(frozen=True)
class MarkerGroups:
    """The groups counted while streaming: one per category, then one per marker form.

    forms: {category: [token-id sequence of each marker form]}; texts: {category: [text of
    each form]}; groups: the id sequences of every group, categories first.
    """

    forms: dict[str, list[tuple[int, ...]]]
    texts: dict[str, list[str]]

    @property
    def groups(self) -> list[list[tuple[int, ...]]]:
        cats = [list(self.forms[c]) for c in CATEGORY_NAMES]
        per_form = [[ids] for c in CATEGORY_NAMES for ids in self.forms[c]]
        return cats + per_form

    def form_group(self, category: str, j: int) -> int:
        """Group index of form j of `category`."""
        before = sum(len(self.forms[c]) for c in CATEGORY_NAMES[: CATEGORY_NAMES.index(category)])
        return len(CATEGORY_NAMES) + before + j


def marker_groups(tokenizer, bare: bool = False) -> MarkerGroups:
    """The markers of every category as `tokenizer`'s ids (with the bare, line-initial forms
    where `bare`: `analysis.bare_markers`) and their texts."""
    forms = marker_token_ids(tokenizer, bare=bare)
    texts = {c: [tokenizer.decode(list(ids)) for ids in seqs] for c, seqs in forms.items()}
    return MarkerGroups(forms=forms, texts=texts)
