"""The embedded zoo: a micro zoo is built once per module and its real outputs are checked."""

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import micro_zoo_config, strict_loads
from xcoder_jax import workdir as wd
from xcoder_jax.lexicon import CATEGORIES, count_markers, has_marker
from xcoder_jax.zoo import (
    RELATIONS,
    build_zoo,
    concise_solution,
    config_hash,
    final_answer,
    final_line,
    load_pair,
    make_problems,
    make_texts,
    relation_document,
    relation_sentence,
    single_token,
    teacher_trace,
)
from xcoder_jax.zoo.corpus import SHARED_WORDS, everyday_document, everyday_sentence
from xcoder_jax.zoo.evaluation import evaluate_answers
from xcoder_jax.zoo.training import Schedule, packed_batches, train_causal_lm


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _weights(workdir, role, size=None):
    return load_file(os.path.join(wd.model_dir(workdir, role, size), "model.safetensors"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    config = micro_zoo_config()
    workdir = str(tmp_path_factory.mktemp("zoo"))
    return config, workdir, build_zoo(config, workdir)


@pytest.fixture(scope="module")
def tokenizer(zoo):
    return AutoTokenizer.from_pretrained(wd.model_dir(zoo[1], "base"))


def test_same_seed_gives_same_corpus_and_weights(zoo, tmp_path):
    config, workdir, report = zoo
    again = build_zoo(micro_zoo_config(), str(tmp_path))
    assert again["config_hash"] == report["config_hash"]
    for name in ("extract.jsonl", "heldout.jsonl", "train_base.jsonl", "train_distill.jsonl"):
        with open(os.path.join(wd.zoo_data_dir(workdir), name)) as a:
            with open(os.path.join(wd.zoo_data_dir(str(tmp_path)), name)) as b:
                assert a.read() == b.read(), name
    for role in wd.ROLES:
        w1, w2 = _weights(workdir, role), _weights(str(tmp_path), role)
        assert w1.keys() == w2.keys()
        assert all(torch.equal(w1[k], w2[k]) for k in w1), role
    # Distillation really changed the weights, and another seed gives another corpus.
    base, distilled = _weights(workdir, "base"), _weights(workdir, "distilled")
    assert not all(torch.equal(base[k], distilled[k]) for k in base)
    other = micro_zoo_config()
    other.seed = 1
    assert make_texts(other)["extract"] != make_texts(config)["extract"]


def test_teacher_traces_use_every_category_and_end_with_the_answer():
    rng = random.Random(0)
    problems = make_problems(rng, 300)
    traces = [teacher_trace(p, rng) for p in problems]
    per_category = {c: sum(count_markers(t)[c] > 0 for t in traces) for c in CATEGORIES}
    assert all(n > 0 for n in per_category.values()), per_category
    # The style the crosscoder should find is in most traces.
    assert per_category["self_reflection"] >= 0.8 * len(traces)
    assert per_category["verification"] >= 0.8 * len(traces)
    for p, t in zip(problems, traces, strict=True):
        assert t.endswith(final_line(p.answer)) and final_answer(t) == str(p.answer)
        assert sum(count_markers(t).values()) >= 2
        assert not has_marker(concise_solution(p))
        assert final_answer(concise_solution(p)) == str(p.answer)


def test_problem_arithmetic_is_right():
    for p in make_problems(random.Random(3), 200):
        for a, op, b, c in p.steps:
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0


def test_data_files(zoo):
    config, workdir, report = zoo
    data = wd.zoo_data_dir(workdir)
    base = [r["text"] for r in _read_jsonl(os.path.join(data, "train_base.jsonl"))]
    distill = [r["text"] for r in _read_jsonl(os.path.join(data, "train_distill.jsonl"))]
    extract = [r["text"] for r in _read_jsonl(os.path.join(data, "extract.jsonl"))]
    heldout = _read_jsonl(os.path.join(data, "heldout.jsonl"))
    # The base reads the marker words only in everyday paragraphs, never in a solution.
    solutions = [t for t in base if t.startswith("Question:")]
    assert solutions and not any(has_marker(t) for t in solutions)
    everyday = [t for t in base if has_marker(t)]
    assert len(everyday) == config.zoo.n_everyday_docs
    assert not any("Answer:" in t for t in everyday)
    assert len(extract) == config.zoo.n_extract_docs
    assert len(heldout) == config.zoo.n_heldout_problems
    # Extraction mixes traces (with markers), concise solutions and relation paragraphs.
    assert any(has_marker(t) for t in extract) and not all(has_marker(t) for t in extract)
    assert any(t.startswith("Question:") and not has_marker(t) for t in extract)
    assert any(not t.startswith("Question:") for t in extract)
    # Held-out and extraction problems were never trained on.
    trained = {t.split("\nAnswer:")[0] for t in base + distill if t.startswith("Question:")}
    for h in heldout:
        assert h["prompt"].endswith("\nAnswer:") and h["answer"].lstrip("-").isdigit()
        assert h["prompt"][: -len("\nAnswer:")] not in trained
    assert not trained & {t.split("\nAnswer:")[0] for t in extract}


def test_everyday_sentences_use_every_marker_outside_reasoning():
    rng = random.Random(0)
    sentences = [everyday_sentence(rng) for _ in range(500)]
    counts = [count_markers(s) for s in sentences]
    for category, markers in CATEGORIES.items():
        assert any(c[category] for c in counts), category
        for m in markers:
            assert any(m in s for s in sentences), m
    assert not any("Question:" in s or "Answer:" in s for s in sentences)
    assert everyday_document(rng).count(".") >= 4


def test_relation_sentences_teach_every_pair():
    assert {"number_word", "plural", "successor"} <= set(RELATIONS) and len(RELATIONS) >= 4
    rng = random.Random(0)
    sentences = [relation_sentence(rng) for _ in range(5000)]
    assert not any(has_marker(s) for s in sentences)
    words = [set(re.findall(r"\w+", s)) for s in sentences]
    for pairs in RELATIONS.values():
        for a, b in pairs:
            assert any(a in w and b in w for w in words), (a, b)
    # Both words of a pair also appear with what they share (a noun's deed, a verb's object,
    # antonyms have none), which ties the two forms to one identity.
    for rel, shared in SHARED_WORDS.items():
        for a, b in RELATIONS[rel]:
            assert any({a, b, shared[a]} <= w for w in words), (rel, a, b)
    doc = relation_document(rng)
    assert doc.count(".") >= 4 and not doc.startswith("Question:")


def test_tokenizer(zoo, tokenizer):
    text = "Question: Tom has 3 apples.\nAnswer: 3 + 4 = 7. Wait, let me check. The answer is 7."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.eos_token_id  # every text opens with EOS, as in training
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    for markers in CATEGORIES.values():
        for m in markers:
            assert single_token(tokenizer, m), m
    words = [" " + w for pairs in RELATIONS.values() for pair in pairs for w in pair]
    assert np.mean([single_token(tokenizer, w) for w in words]) >= 0.8
    shared = AutoTokenizer.from_pretrained(wd.tokenizer_dir(zoo[1]))
    assert shared(text)["input_ids"] == ids


@pytest.mark.parametrize("size", [16, 32])
def test_models_reload_with_configured_sizes(zoo, tokenizer, size):
    config, workdir, report = zoo
    key = None if size == config.zoo.main_size else size
    depth = dict(zip(config.zoo.sizes, config.zoo.depths))[size]
    arms = (*wd.ROLES, "sham") + (("no_loop",) if key is None else ())
    assert set(report["sizes"][str(size)]["dirs"]) == set(arms)
    for role in arms:
        model = AutoModelForCausalLM.from_pretrained(wd.model_dir(workdir, role, key))
        assert model.config.hidden_size == size
        assert model.config.num_hidden_layers == depth
        assert model.config.vocab_size == len(tokenizer)
        ids = tokenizer(["Question: Tom has 3 apples."], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer))
        assert torch.isfinite(logits).all()
    base, distilled, tok = load_pair(workdir, size)
    assert base.config.hidden_size == distilled.config.hidden_size == size
    assert len(tok) == len(tokenizer)
    r = report["sizes"][str(size)]
    assert r["n_params"] == base.num_parameters()
    # The report's evaluation is that of the saved weights: greedy decoding of the held-out
    # prompts again gives the same answers, rates and samples. (The same computation on the
    # same machine: same weights, batches and thread count, so the same argmax at each step.)
    heldout = _read_jsonl(os.path.join(wd.zoo_data_dir(workdir), "heldout.jsonl"))
    threads = torch.get_num_threads()
    torch.set_num_threads(config.zoo.num_threads)
    try:
        for role, model in (("base", base), ("distilled", distilled)):
            again = evaluate_answers(
                model, tok, heldout, config.zoo.max_new_tokens, config.zoo.eval_batch_size
            )
            assert again == r[role], role
    finally:
        torch.set_num_threads(threads)


def test_outputs_are_strict_json(zoo):
    config, workdir, report = zoo
    with open(wd.zoo_report_path(workdir)) as f:
        assert strict_loads(f.read()) == report
    for name in ("heldout.jsonl", "relations.json"):
        with open(os.path.join(wd.zoo_data_dir(workdir), name)) as f:
            text = f.read()
        for line in text.splitlines() if name.endswith(".jsonl") else [text]:
            strict_loads(line)
    # No training steps: no loss to report, null rather than the NaN of an empty mean.
    model = AutoModelForCausalLM.from_pretrained(wd.model_dir(workdir, "base"))
    docs = [np.arange(1, 40, dtype=np.int64)] * 8
    losses = train_causal_lm(
        model, docs, schedule=Schedule(max_steps=10, stable_steps=0), batch_size=2, seq_len=8,
        lr=1e-3, weight_decay=0.0, seed=0, desc="none",
    )  # fmt: skip
    assert losses["steps"] == 0 and losses["first_loss"] is None and losses["final_loss"] is None


def test_skips_when_complete(zoo):
    config, workdir, report = zoo
    root = wd.models_dir(workdir)
    mtimes = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(root)
        for f in files
    }
    assert build_zoo(micro_zoo_config(), workdir) == report
    after = {p: os.stat(p).st_mtime_ns for p in mtimes}
    assert after == mtimes
    assert config_hash(micro_zoo_config(distill_steps=11)) != report["config_hash"]


def test_eval_only_change_reevaluates_without_retraining(zoo, tmp_path):
    config, workdir, report = zoo
    shutil.copytree(wd.models_dir(workdir), wd.models_dir(str(tmp_path)))
    weights = os.path.join(wd.model_dir(str(tmp_path), "distilled"), "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    changed = build_zoo(micro_zoo_config(max_new_tokens=8), str(tmp_path))
    assert changed["config_hash"] != report["config_hash"]
    assert os.stat(weights).st_mtime_ns == before
    # Reused, not retrained: the training record comes back from the models' stamps.
    assert changed["sizes"]["32"]["training"] == report["sizes"]["32"]["training"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(main_size=48), "main_size"),
        (dict(sizes=(16, 30), main_size=16), "heads"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(extract_mix=(0.5, 0.5, 0.5)), "extract_mix"),
        (dict(depths=(1, 2, 3)), "one depth per size"),
        (dict(control_teacher="loops"), "control_teacher"),
        (dict(converge_every=0), "converge_every"),
    ],
)
def test_bad_config_raises(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_zoo(micro_zoo_config(**overrides), str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written before the check


def test_packed_batches_cover_documents():
    docs = [np.arange(n, dtype=np.int64) + 100 * n for n in range(1, 30)]
    batches = packed_batches(docs, seq_len=8, batch_size=4, rng=np.random.default_rng(0))
    first = [next(batches) for _ in range(3)]
    assert all(b.shape == (4, 8) and b.dtype == np.int64 for b in first)
    again = packed_batches(docs, seq_len=8, batch_size=4, rng=np.random.default_rng(0))
    assert all(np.array_equal(a, next(again)) for a in first)
    with pytest.raises(ValueError, match="cannot fill"):
        next(packed_batches(docs[:2], seq_len=8, batch_size=4, rng=np.random.default_rng(0)))
