"""The embedded model zoo: a tiny Qwen2 base model and its distilled reasoning variant.

No hub is reachable on the machines this runs on, so the project builds its own pair: a toy
corpus of arithmetic word problems with concise solutions (plus relation sentences for the
geometry study and everyday sentences using the marker words outside reasoning), a
rule-based teacher writing reasoning traces for the same problems, a byte-level BPE
tokenizer, a base model pretrained on the concise corpus and a distilled model fine-tuned
from it on the traces, at several hidden sizes.
"""

from xcoder_jax.zoo.build import build_zoo
from xcoder_jax.zoo.build_config import check_config, config_hash
from xcoder_jax.zoo.corpus import (
    RELATIONS,
    Problem,
    concise_solution,
    final_line,
    make_problems,
    prompt_of,
    relation_document,
    relation_sentence,
)
from xcoder_jax.zoo.evaluation import (
    evaluate_answers,
    final_answer,
    greedy_answers,
    summarize_zoo,
)
from xcoder_jax.zoo.load import load_pair
from xcoder_jax.zoo.teacher import teacher_trace
from xcoder_jax.zoo.texts import make_texts
from xcoder_jax.zoo.tokenizer import EOS, PAD, single_token, train_tokenizer, word_tokens
from xcoder_jax.zoo.training import train_causal_lm

__all__ = [
    "EOS",
    "PAD",
    "RELATIONS",
    "Problem",
    "build_zoo",
    "check_config",
    "concise_solution",
    "config_hash",
    "evaluate_answers",
    "final_answer",
    "final_line",
    "greedy_answers",
    "load_pair",
    "make_problems",
    "make_texts",
    "prompt_of",
    "relation_document",
    "relation_sentence",
    "single_token",
    "summarize_zoo",
    "teacher_trace",
    "train_causal_lm",
    "train_tokenizer",
    "word_tokens",
]
