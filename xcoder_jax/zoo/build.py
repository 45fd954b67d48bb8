"""Build the zoo: corpus, tokenizer, a base/distilled Qwen2 pair per size, and their evaluation.

    build_zoo(config, workdir)  # writes <workdir>/models/..., returns the zoo.json report

The documents come from `texts.make_texts`; `load.load_pair` reads a built pair back.

Base models learn concise solutions, relation sentences and everyday sentences (marker words
in their ordinary sense, never in a solution);
distilled models start from their base and learn the teacher's traces. Everything is seeded
by `config.seed`, so the same config gives the same corpus and, on the same machine, the same
weights. A build whose zoo.json records the same config is skipped; models are written to a
temporary directory and renamed, and zoo.json is written last, so an interrupted build never
looks complete (finished model dirs carry a stamp and are reused by the next attempt).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from xcoder_jax import workdir as wd
from xcoder_jax.activations import manifest as mf
from xcoder_jax.errors import ConfigError
from xcoder_jax.zoo import corpus
from xcoder_jax.zoo.texts import TEACHERS, make_texts
from xcoder_jax.zoo.tokenizer import build_tokenizer, single_token_report
from xcoder_jax.zoo.training import evaluate_answers, model_config, train_causal_lm

ZOO_FORMAT = 4  # bump when the corpus or training changes, to invalidate old builds
_STAMP = "zoo_stamp.json"  # inside each finished model dir: the config hash it was built for
_EVAL_ONLY = ("max_new_tokens", "eval_batch_size", "num_threads")  # do not change weights
_DRY_RUN = ("intermediate_size", "model_vocab_size", "random_pair")
_DATA_FILES = ("train_base.jsonl", "train_distill.jsonl", "extract.jsonl", "heldout.jsonl")


def check_config(zc) -> None:
    """Raise a one-line ConfigError (a ValueError) for a zoo config that cannot build."""
    sizes = tuple(zc.sizes)
    if not sizes or len(set(sizes)) != len(sizes):
        raise ConfigError(f"zoo.sizes must be distinct hidden sizes, got {sizes}")
    if zc.main_size not in sizes:
        raise ConfigError(f"zoo.main_size={zc.main_size} is not one of zoo.sizes={sizes}")
    if zc.n_heads % zc.n_kv_heads:
        raise ConfigError(f"zoo.n_heads={zc.n_heads} is not a multiple of n_kv_heads")
    for h in sizes:
        if h % zc.n_heads or (h // zc.n_heads) % 2:
            raise ConfigError(f"hidden size {h} must split into {zc.n_heads} even-sized heads")
    mix = zc.extract_mix
    if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
        raise ConfigError(f"zoo.extract_mix must be 3 fractions summing to 1, got {tuple(mix)}")
    if min(zc.n_layers, zc.n_train_problems, zc.n_heldout_problems, zc.batch_size) < 1:
        raise ConfigError("zoo.n_layers, n_*_problems and batch_size must be positive")
    if zc.teacher not in TEACHERS:
        raise ConfigError(f"zoo.teacher must be one of {sorted(TEACHERS)}, got {zc.teacher!r}")


def config_hash(config, weights_only: bool = False) -> str:
    """What a build depends on: the zoo section, the seed and the zoo format.

    `weights_only` leaves out the fields that only change the evaluation, so a finished model
    is reused when only those change.
    """
    # The dry-run fields enter the hash only when set, the teacher only when not the first
    # one: existing zoos keep their hashes.
    zoo = {
        k: v
        for k, v in config.zoo.to_dict().items()
        if not (k in _DRY_RUN and not v) and not (k == "teacher" and v == "no_loop")
    }
    if weights_only:
        zoo = {k: v for k, v in zoo.items() if k not in _EVAL_ONLY}
    blob = json.dumps([ZOO_FORMAT, config.seed, zoo], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dirs(workdir: str, zc, size: int) -> dict[str, str]:
    """Model dir per role for one size (the main size lives at models/{role})."""
    key = None if size == zc.main_size else size
    return {role: wd.model_dir(workdir, role, key) for role in wd.ROLES}


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


def _tmp(path: str) -> str:
    """A temporary sibling of `path`, unique per process so concurrent builds never share one."""
    return f"{path}.tmp{os.getpid()}"


def _write_jsonl(path: str, rows: list) -> None:
    lines = (json.dumps(r if isinstance(r, dict) else {"text": r}, allow_nan=False) for r in rows)
    data = "".join(line + "\n" for line in lines).encode()
    mf.atomic_write_bytes(path, lambda f: f.write(data))


# --- Models ---------------------------------------------------------------------------


def _save_atomic(model, tokenizer, path: str, stamp: dict) -> None:
    """Write a model dir under a temporary name, then swap it in: a dir at `path` is always
    complete."""
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, _STAMP), "w") as f:
        json.dump(stamp, f, allow_nan=False)
    if os.path.exists(path):  # a directory cannot be renamed onto a non-empty one
        old = _tmp(path) + "old"
        os.replace(path, old)
        shutil.rmtree(old)
    os.replace(tmp, path)


def _is_stamped(path: str, stamp: dict) -> bool:
    try:
        with open(os.path.join(path, _STAMP)) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def _load_stamped(path: str, stamp: dict):
    return AutoModelForCausalLM.from_pretrained(path).eval() if _is_stamped(path, stamp) else None


def _build_size(config, workdir, size, tokenizer, docs, heldout) -> dict:
    """Train (or reuse stamped) base and distilled models of one size, then evaluate both."""
    zc, t0 = config.zoo, time.time()
    dirs = _dirs(workdir, zc, size)
    stamp = {"weights_hash": config_hash(config, weights_only=True), "size": size}
    seed = config.seed * 1000 + size  # sizes differ in init and data order
    train = dict(
        batch_size=zc.batch_size,
        seq_len=zc.max_len,
        weight_decay=zc.weight_decay,
        warmup_frac=zc.warmup_frac,
    )
    losses = {}
    if zc.get("random_pair", False):
        # A dry run of shapes: two random draws stand in for the pair (a copy of the base
        # would make every crosscoder latent shared); one model in memory at a time.
        for role, offset in (("base", 0), ("distilled", 1)):
            if not _is_stamped(dirs[role], stamp):
                torch.manual_seed(seed + offset)
                model = Qwen2ForCausalLM(model_config(zc, size, tokenizer))
                _save_atomic(model, tokenizer, dirs[role], stamp)
                del model
    base = _load_stamped(dirs["base"], stamp)
    if base is None:
        torch.manual_seed(seed)
        base = Qwen2ForCausalLM(model_config(zc, size, tokenizer))
        losses["base"] = train_causal_lm(
            base, docs["train_base"], steps=zc.pretrain_steps, lr=zc.lr, seed=seed,
            desc=f"h{size} pretrain", **train,
        )  # fmt: skip
        _save_atomic(base, tokenizer, dirs["base"], stamp)
    distilled = _load_stamped(dirs["distilled"], stamp)
    if distilled is None:
        distilled = copy.deepcopy(base)
        losses["distilled"] = train_causal_lm(
            distilled, docs["train_distill"], steps=zc.distill_steps, lr=zc.distill_lr,
            seed=seed + 1, desc=f"h{size} distill", **train,
        )  # fmt: skip
        _save_atomic(distilled, tokenizer, dirs["distilled"], stamp)
    out = {
        "dirs": {r: os.path.relpath(d, workdir) for r, d in dirs.items()},
        "n_params": base.num_parameters(),
        "train_losses": losses,
    }
    for role, model in (("base", base), ("distilled", distilled)):
        out[role] = evaluate_answers(
            model, tokenizer, heldout, zc.max_new_tokens, zc.eval_batch_size
        )
    out["build_seconds"] = round(time.time() - t0, 1)
    return out


def build_zoo(config, workdir: str) -> dict:
    """Build (or find complete) the zoo in `workdir`; returns the zoo.json report.

    Per size: n_params, build_seconds and, for base and distilled, marker_rate (fraction of
    greedy held-out answers containing a reasoning marker) and accuracy.
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
    for name in ("train_base", "train_distill", "extract", "heldout"):
        _write_jsonl(os.path.join(data_dir, f"{name}.jsonl"), texts[name])
    relations = json.dumps(corpus.RELATIONS, indent=1, allow_nan=False).encode()
    mf.atomic_write_bytes(os.path.join(data_dir, "relations.json"), lambda f: f.write(relations))
    sample = texts["train_base"][:200] + texts["train_distill"][:200] + texts["extract"][:200]
    tokenizer = build_tokenizer(
        texts["train_base"] + texts["train_distill"],
        zc.vocab_size,
        wd.tokenizer_dir(workdir),
        sample,
    )
    docs = {
        k: [np.asarray(ids, np.int64) for ids in tokenizer(texts[k])["input_ids"]]
        for k in ("train_base", "train_distill")
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
        "data": {k: len(texts[k]) for k in ("train_base", "train_distill", "extract", "heldout")},
        "teacher": texts["teacher"],
        "sizes": sizes,
        "total_seconds": round(time.time() - t0, 1),
    }
    data = json.dumps(report, indent=1, allow_nan=False).encode()
    mf.atomic_write_bytes(wd.zoo_report_path(workdir), lambda f: f.write(data))
    return report
