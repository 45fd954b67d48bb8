"""Build the zoo: corpus, tokenizer, and per size every arm trained from a base (`workdir.ARMS`),
with their evaluation.

    build_zoo(config, workdir)  # writes <workdir>/models/..., returns the zoo.json report

The documents come from `texts.make_texts`; `load.load_pair` / `load.load_model` read models back.

Base models learn concise solutions, relation sentences and everyday sentences (marker words
in their ordinary sense, never in a solution). From each base: the distilled model learns the
teacher's traces, the sham the same problems' concise solutions on the distilled model's exact
schedule, and (main size) the no-loop model the control teacher's traces; each arm replays the
same relation and everyday paragraphs. Everything is seeded by `config.seed`: the same config
gives the same corpus and, with the same machine and thread count, the same weights (the
plateau a run stops at depends on its float sums). A build whose zoo.json records the same
config is skipped; models are written to a temporary directory and renamed, and zoo.json is
written last, so an interrupted build never looks complete (finished model dirs carry a stamp
and are reused by the next attempt).
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from xcoder_jax import workdir as wd
from xcoder_jax.fileio import atomic_write_bytes
from xcoder_jax.zoo import corpus
from xcoder_jax.zoo.build_config import ZOO_FORMAT, check_config, config_hash
from xcoder_jax.zoo.evaluation import distillation_criterion, evaluate_answers
from xcoder_jax.zoo.storage import is_stamped, read_stamp, save_model_atomic, write_jsonl
from xcoder_jax.zoo.texts import make_texts
from xcoder_jax.zoo.tokenizer import build_tokenizer, single_token_report
from xcoder_jax.zoo.training import Schedule, depth, model_config, train_causal_lm

_DATA_FILES = (
    "train_base.jsonl", "train_distill.jsonl", "train_sham.jsonl", "extract.jsonl",
    "heldout.jsonl",
)  # fmt: skip
_OPTIONAL_FILES = ("train_no_loop.jsonl",)  # with a control teacher


def _dirs(workdir: str, zc, size: int) -> dict[str, str]:
    """Model dir per arm built at one size (the main size lives at models/{role}); the
    no-loop arm only at the main size, and only with a control teacher."""
    key = None if size == zc.main_size else size
    arms = [a for a in wd.ARMS if a != "no_loop" or (key is None and zc.control_teacher)]
    if zc.get("random_pair", False):  # a dry run of shapes: the pair only
        arms = list(wd.ROLES)
    return {arm: wd.model_dir(workdir, arm, key) for arm in arms}


def _complete_report(workdir: str, config) -> dict | None:
    path = wd.zoo_report_path(workdir)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    if report.get("config_hash") != config_hash(config):
        return None
    data = wd.zoo_data_dir(workdir)
    dirs = [d for s in config.zoo.sizes for d in _dirs(workdir, config.zoo, s).values()]
    ok = all(os.path.exists(os.path.join(d, "config.json")) for d in dirs)
    ok = ok and all(os.path.exists(os.path.join(data, f)) for f in _DATA_FILES)
    return report if ok else None


def _schedule(zc, max_steps: int, stable_steps: int | None = None) -> Schedule:
    return Schedule(
        max_steps=max_steps,
        warmup_frac=zc.warmup_frac,
        decay_frac=zc.decay_frac,
        stable_steps=stable_steps,
        eval_every=zc.converge_every,
        patience=zc.converge_patience,
        tol=zc.converge_tol,
    )


# arm -> (corpus, what it starts from, lr field, step cap field)
_RECIPES = {
    "base": ("base", None, "lr", "pretrain_steps"),
    "distilled": ("distill", "base", "distill_lr", "distill_steps"),
    "no_loop": ("no_loop", "base", "distill_lr", "distill_steps"),
    # Step for step the distilled arm's schedule, on concise solutions and the same replay.
    "sham": ("sham", "base", "distill_lr", "distill_steps"),
}


def _build_size(config, workdir, size, tokenizer, docs, heldout) -> dict:
    """Train (or reuse stamped) every arm of one size, then evaluate each on the held-out
    prompts. The training report of a reused model comes from its stamp."""
    zc, t0 = config.zoo, time.time()
    dirs = _dirs(workdir, zc, size)
    weights = {"weights_hash": config_hash(config, weights_only=True), "size": size}
    seed = config.seed * 1000 + size  # sizes differ in init and data order
    train = dict(batch_size=zc.batch_size, seq_len=zc.max_len, weight_decay=zc.weight_decay)
    models, training = {}, {}
    if zc.get("random_pair", False):
        # A dry run of shapes: two random draws stand in for the pair (a copy of the base
        # would make every crosscoder latent shared); one model in memory at a time.
        for role, offset in (("base", 0), ("distilled", 1)):
            if not is_stamped(dirs[role], weights):
                torch.manual_seed(seed + offset)
                model = Qwen2ForCausalLM(model_config(zc, size, tokenizer))
                save_model_atomic(
                    model, tokenizer, dirs[role], {"weights": weights, "training": None}
                )
                del model
    for offset, arm in enumerate(a for a in _RECIPES if a in dirs):
        corpus_name, parent, lr_field, cap_field = _RECIPES[arm]
        stable = training["distilled"]["stable_steps"] if arm == "sham" else None
        # A sham is reusable only for the distilled schedule it repeated.
        arm_weights = weights if stable is None else weights | {"stable_steps": stable}
        if is_stamped(dirs[arm], arm_weights):
            models[arm] = AutoModelForCausalLM.from_pretrained(dirs[arm]).eval()
            training[arm] = read_stamp(dirs[arm])["training"]
            continue
        if parent is None:
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(model_config(zc, size, tokenizer))
        else:
            model = copy.deepcopy(models[parent])
        training[arm] = train_causal_lm(
            model, docs[f"train_{corpus_name}"], val_docs=docs[f"val_{corpus_name}"],
            schedule=_schedule(zc, zc[cap_field], stable), lr=zc[lr_field], seed=seed + offset,
            desc=f"h{size} {arm}", **train,
        )  # fmt: skip
        stamp = {"weights": arm_weights, "training": training[arm]}
        save_model_atomic(model, tokenizer, dirs[arm], stamp)
        models[arm] = model
    out = {
        "dirs": {r: os.path.relpath(d, workdir) for r, d in dirs.items()},
        "n_layers": depth(zc, size),
        "n_params": models["base"].num_parameters(),
        "training": training,
    }
    for arm, model in models.items():
        out[arm] = evaluate_answers(
            model, tokenizer, heldout, zc.max_new_tokens, zc.eval_batch_size
        )
    if "distilled" in training:
        out["criterion"] = distillation_criterion(out["distilled"], zc.criterion_min_rate)
    out["build_seconds"] = round(time.time() - t0, 1)
    return out


def build_zoo(config, workdir: str) -> dict:
    """Build (or find complete) the zoo in `workdir`; returns the zoo.json report.

    Per size: n_layers, n_params, the training of every arm (steps, whether its held-out
    loss converged, the curve), for every arm its greedy held-out answers' marker rate,
    trace-format rate, accuracy, reflection rounds and lengths (`evaluate_answers`), the
    distillation criterion and build_seconds. Plus the teacher's (and the control teacher's)
    trace statistics.
    """
    check_config(config.zoo)
    report = _complete_report(workdir, config)
    if report is not None:
        return report
    threads = torch.get_num_threads()
    torch.set_num_threads(config.zoo.num_threads)
    try:
        return _build(config, workdir)
    finally:
        torch.set_num_threads(threads)


def _build(config, workdir: str) -> dict:
    zc, t0 = config.zoo, time.time()
    texts = make_texts(config)
    data_dir = wd.zoo_data_dir(workdir)
    os.makedirs(data_dir, exist_ok=True)
    for name in _DATA_FILES + _OPTIONAL_FILES:
        if name.removesuffix(".jsonl") in texts:
            write_jsonl(os.path.join(data_dir, name), texts[name.removesuffix(".jsonl")])
    relations = json.dumps(corpus.RELATIONS, indent=1, allow_nan=False).encode()
    atomic_write_bytes(os.path.join(data_dir, "relations.json"), lambda f: f.write(relations))
    corpora = [k for k in texts if k.startswith(("train_", "val_"))]
    sample = texts["train_base"][:200] + texts["train_distill"][:200] + texts["extract"][:200]
    tokenizer = build_tokenizer(
        [t for k in corpora if k.startswith("train_") for t in texts[k]],
        zc.vocab_size,
        wd.tokenizer_dir(workdir),
        sample,
    )
    docs = {
        k: [np.asarray(ids, np.int64) for ids in tokenizer(texts[k])["input_ids"]] for k in corpora
    }
    sizes = {}
    for size in zc.sizes:
        sizes[str(size)] = _build_size(config, workdir, size, tokenizer, docs, texts["heldout"])
    report = {
        "format": ZOO_FORMAT,
        "config_hash": config_hash(config),
        "seed": config.seed,
        "main_size": zc.main_size,
        "prompt": corpus.prompt_of("{question}"),
        "tokenizer": {
            "dir": os.path.relpath(wd.tokenizer_dir(workdir), workdir),
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            **single_token_report(tokenizer, corpus.RELATIONS),
        },
        "data": {k: len(texts[k]) for k in (*corpora, "extract", "heldout")},
        "teacher": texts["teacher"],
        "control_teacher": texts.get("control_teacher"),
        "sizes": sizes,
        "total_seconds": round(time.time() - t0, 1),
    }
    data = json.dumps(report, indent=1, allow_nan=False).encode()
    atomic_write_bytes(wd.zoo_report_path(workdir), lambda f: f.write(data))
    return report
