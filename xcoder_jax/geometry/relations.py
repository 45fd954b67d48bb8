"""Relation pair sets, the single-token filter, and the block-L vector of every word.

Sets come from the zoo corpus (`zoo.RELATIONS`) or from files in the format of Todd et al.
(2023), function vectors: a JSON list of `{"input": word, "output": word}`. A word is read in
a prompt template (default " {word}": the word alone, after the tokenizer's own prefix), and a
pair is kept only when both of its words are one token there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

import numpy as np
import torch

from xcoder_jax import site
from xcoder_jax.errors import ConfigError, XcoderError

Pair = tuple[str, str]
_FIELDS = ("input", "output")  # of one entry of a Todd et al. file


def load_pair_file(path: str) -> list[Pair]:
    """Word pairs of a Todd et al. function-vector file (a JSON list of
    `{"input": str, "output": str}`). Raises ValueError on anything else or < 2 pairs."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise ConfigError(f'{path}: expected a JSON list of {{"input", "output"}} objects')
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in _FIELDS):
            raise ConfigError(f'{path}: entry {i} is not {{"input": str, "output": str}}: {r!r}')
    pairs = [(r["input"].strip(), r["output"].strip()) for r in rows]
    if len(pairs) < 2:
        raise ConfigError(f"{path}: {len(pairs)} pair(s); the loss compares two pairs at least")
    return pairs


def relation_sets(gc) -> dict[str, list[Pair]]:
    """{relation name: pairs}: the zoo's RELATIONS (if `gc.zoo_relations`), then every file
    of `gc.relation_files`, named by its file stem."""
    from xcoder_jax.zoo import RELATIONS

    sets = {k: list(v) for k, v in RELATIONS.items()} if gc.zoo_relations else {}
    for path in gc.relation_files:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in sets:
            raise ConfigError(f"two relation sets are named {name!r} ({path})")
        sets[name] = load_pair_file(path)
    if not sets:
        raise ConfigError("no relations: set geometry.zoo_relations or geometry.relation_files")
    return sets


def split_template(template: str) -> tuple[str, str]:
    """(text before, text after) the one `{word}` of a prompt template."""
    if template.count("{word}") != 1:
        raise ConfigError(f"geometry.template must contain {{word}} once, got {template!r}")
    pre, post = template.split("{word}")
    return pre, post


def word_prompt(tokenizer, word: str, template: str, add_special_tokens: bool) -> list[int] | None:
    """Token ids of `template` with `word` filled in, cut right after the word's token; None
    when the word is not exactly one token there.

    A space right before `{word}` goes with the word: byte-level BPE makes " seven" one
    token; a tokenizer that splits numbers into digits (Qwen2's, the zoo's) reads " 7" as
    " " then "7", and the space token then counts as context. What follows the word is
    dropped: a causal model's state at the word does not depend on it. With
    `add_special_tokens` the tokenizer's own prefix (the zoo's EOS, a BOS) comes first.
    """
    pre, post = split_template(template)
    piece = word
    if pre.endswith(" "):
        pre, piece = pre[:-1], " " + word
    span = tokenizer(piece, add_special_tokens=False)["input_ids"]
    if len(span) == 2 and piece.startswith(" ") and not tokenizer.decode(span[:1]).strip():
        pass  # a lone space token, then the word's one token
    elif len(span) != 1:
        return None
    pre_ids = tokenizer(pre, add_special_tokens=False)["input_ids"] if pre else []
    enc = tokenizer(
        pre + piece + post, add_special_tokens=add_special_tokens, return_special_tokens_mask=True
    )
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    lead = next((i for i, s in enumerate(special) if not s), len(ids))
    pos = lead + len(pre_ids)
    if ids[lead:pos] != pre_ids or ids[pos : pos + len(span)] != span:
        return None  # the word merged with its context into other tokens
    return ids[: pos + len(span)]


class RelationError(XcoderError, ValueError):
    """A relation keeps fewer than 2 pairs for a tokenizer; `kept` and `total` say how many."""

    def __init__(self, message: str, kept: int, total: int):
        super().__init__(message)
        self.kept, self.total = kept, total


@dataclasses.dataclass
class Relation:
    """The pairs of one relation kept for one tokenizer, with the prompt of every word."""

    name: str
    pairs: list[Pair]  # used: single-token pairs, at most max_pairs of them
    kept: int  # pairs whose both words are single tokens in the template
    total: int  # distinct pairs in the set
    prompts: dict[str, list[int]]  # word -> token ids ending at the word's token


def filter_relation(name: str, pairs: list[Pair], tokenizer, gc, seed: int = 0) -> Relation:
    """Keeps the distinct pairs whose both words are single tokens in `gc.template`; at most
    `gc.max_pairs` of them (a seeded subsample; -1: all).

    Raises RelationError (a ValueError) when fewer than 2 pairs remain (the loss compares
    two pairs).
    """
    pairs = list(dict.fromkeys((a, b) for a, b in pairs))
    prompts = {}
    for w in sorted({w for p in pairs for w in p}):
        ids = word_prompt(tokenizer, w, gc.template, gc.add_special_tokens)
        if ids is not None:
            prompts[w] = ids
    kept = [(a, b) for a, b in pairs if a in prompts and b in prompts]
    if not kept:
        raise RelationError(
            f"relation {name!r}: none of its {len(pairs)} pairs has both words as single "
            f"tokens in the template {gc.template!r}",
            0,
            len(pairs),
        )
    if len(kept) < 2:
        raise RelationError(
            f"relation {name!r}: only {len(kept)} of {len(pairs)} pairs has both words as "
            "single tokens; the loss compares two pairs at least",
            len(kept),
            len(pairs),
        )
    use = kept
    if 0 < gc.max_pairs < len(kept):  # the comparisons grow as n^2
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        use = [kept[i] for i in sorted(rng.choice(len(kept), gc.max_pairs, replace=False))]
    words = {w for p in use for w in p}
    prompts = {w: p for w, p in prompts.items() if w in words}
    return Relation(name, use, len(kept), len(pairs), prompts)


def word_vectors(model, prompts: list[list[int]], layer: int, batch_size: int) -> np.ndarray:
    """`[n_words, d_model]` float64: the input of block `layer` at the last token of each
    prompt, raw units. Prompts of equal length run together, so no padding is needed."""
    device = next(model.parameters()).device
    rows: list[np.ndarray] = [np.empty(0)] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            hidden = site.forward_to_site(model, layer, ids)[:, -1]  # [b, d]
            for i, h in zip(chunk, hidden.float().cpu().numpy()):
                rows[i] = h
    return np.stack(rows).astype(np.float64)
