"""The zoo's tokenizer: a byte-level BPE trained on the zoo corpus, saved as an HF fast tokenizer.

It uses Qwen2's own normalizer and pre-tokenizer (numbers split into single digits, a space
before a number is its own token), because `AutoTokenizer` loads any directory whose model is
a Qwen2 as `Qwen2Tokenizer`, which rebuilds exactly that pipeline around the saved vocabulary
and merges: trained any other way, the models would be fed other token ids than they learned
on. It is small (a few hundred tokens) so the models stay tiny; the reasoning markers of the
lexicon and the relation words are frequent in the corpus, so BPE learns them as single tokens
(" Wait", " seven"); `single_token_report` says which.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from xcoder_jax.lexicon import CATEGORIES

# Ends every document (generation stops on it) and, GPT-2 style, also opens every encoded
# text: position 0 is then always this token (the attention sink extraction drops), and a
# prompt starts exactly like a document in the packed training stream.
EOS = "<|endoftext|>"
PAD = "<|pad|>"  # left padding in batched generation; never trained on


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with at most `vocab_size` entries (bytes + merges + EOS + PAD).

    Encoding with special tokens (the default) prepends EOS. Fewer entries than
    `vocab_size` when `texts` run out of pairs to merge. Deterministic for the same texts in
    the same order.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS
    )
    fast.model_max_length = 1 << 20  # no truncation warnings; callers bound their lengths
    return fast


def build_tokenizer(texts: Sequence[str], vocab_size: int, path: str, sample: Sequence[str]):
    """Train on `texts`, save to `path`, and return the tokenizer as `AutoTokenizer` loads it
    from a saved Qwen2 model dir; raise if that encodes `sample` differently."""
    trained = train_tokenizer(texts, vocab_size)
    trained.save_pretrained(path)
    # A Qwen2 config makes AutoTokenizer pick the class it picks for the saved models.
    loaded = AutoTokenizer.from_pretrained(path, config=Qwen2Config())
    if trained(list(sample))["input_ids"] != loaded(list(sample))["input_ids"]:
        raise RuntimeError(f"the tokenizer saved in {path} reloads with other token ids")
    return loaded


def word_tokens(tokenizer, word: str) -> list[int]:
    """The token ids of `word` as it appears inside text, after a space.

    Qwen2's pre-tokenizer gives a number's leading space a token of its own (" 7" is "Ġ" +
    "7"); that space token is not part of the word and is dropped.
    """
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    space = tokenizer.encode(" ", add_special_tokens=False)
    return ids[1:] if len(ids) > 1 and ids[:1] == space else ids


def single_token(tokenizer, word: str) -> bool:
    """Whether `word` (bare, e.g. "seven", "7" or "Wait") is one token inside text."""
    return len(word_tokens(tokenizer, word.strip())) == 1


def marker_strings() -> list[str]:
    """Every marker of the lexicon, with its leading space."""
    return [m for ms in CATEGORIES.values() for m in ms]


def single_token_report(tokenizer, relations: dict[str, list[tuple[str, str]]]) -> dict:
    """Which markers are single tokens, and per relation how many pairs have both words as
    single tokens."""
    rel = {
        name: sum(single_token(tokenizer, a) and single_token(tokenizer, b) for a, b in pairs)
        for name, pairs in relations.items()
    }
    return {
        "markers": {m: single_token(tokenizer, m) for m in marker_strings()},
        "relation_pairs_single_token": rel,
        "relation_pairs_total": {name: len(p) for name, p in relations.items()},
    }
