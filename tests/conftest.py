"""Shared fixtures: a micro model pair (random Qwen2 weights) and a small corpus."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

CORPUS = [
    f"Question: Tom has {a} apples and buys {b} more. How many now?\nAnswer: {a} + {b} = {a + b}."
    f" Wait, let me check. Therefore the answer is {a + b}."
    for a in range(1, 9)
    for b in range(1, 5)
]


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (strict JSON)."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def make_tokenizer(texts, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_model(path, tokenizer, seed, hidden=16, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def micro_pair(tmp_path_factory):
    """Paths of a micro base/distilled pair (different random weights, same tokenizer),
    a second tokenizer that differs, and a JSONL corpus."""
    root = tmp_path_factory.mktemp("micro_pair")
    tok = make_tokenizer(CORPUS)
    base = make_model(str(root / "base"), tok, seed=0)
    distilled = make_model(str(root / "distilled"), tok, seed=1)
    other_tok = make_tokenizer([t.upper() for t in CORPUS])
    other = make_model(str(root / "other"), other_tok, seed=2)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return {
        "base": base,
        "distilled": distilled,
        "other": other,
        "corpus": str(corpus),
        "root": root,
    }


def micro_config(pair, **extract):
    """configs/tiny.py pointed at the micro pair and its corpus."""
    from configs import tiny

    c = tiny.get_config()
    c.models.base = pair["base"]
    c.models.distilled = pair["distilled"]
    c.models.device = "cpu"
    c.data.sources[0].kind = "jsonl"
    c.data.sources[0].path = pair["corpus"]
    c.extract.batch_size = 5
    c.extract.shard_rows = 64
    for k, v in extract.items():
        c.extract[k] = v
    return c


def store_writer(
    directory,
    fingerprint,
    *,
    n_models=2,
    d=32,
    shard_rows=512,
    dtype="bfloat16",
    tokenizer_sha256="synthetic",
):
    """A StoreWriter for rows made up by a test or benchmark (no models behind them)."""
    from xcoder_jax.activations.writer import StoreWriter

    return StoreWriter(
        directory,
        n_models=n_models,
        d_model=d,
        dtype=dtype,
        shard_rows=shard_rows,
        fingerprint=fingerprint,
        meta={
            "layer": 1,
            "n_layers": 2,
            "first_position": 1,
            "tokenizer_sha256": tokenizer_sha256,
            "models": [{"role": "base"}, {"role": "distilled"}][:n_models],
        },
    )


def synthetic_store(
    directory, n_rows=4096, d=32, n_models=2, n_atoms=64, shard_rows=512, seed=0, nan_rows=()
):
    """A store of sparse combinations of random atoms (a crosscoder can fit it well).

    `nan_rows` are global row ids whose activations are set to NaN.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, n_models, d)).astype(np.float32)
    writer = store_writer(
        directory, {"synthetic": seed}, n_models=n_models, d=d, shard_rows=shard_rows
    )
    doc_rows = 64
    for doc, start in enumerate(range(0, n_rows, doc_rows)):
        codes = rng.random((doc_rows, n_atoms)) * (rng.random((doc_rows, n_atoms)) < 0.05)
        x = np.einsum("ba,amd->bmd", codes, atoms) * 3 + 0.05 * rng.normal(
            size=(doc_rows, n_models, d)
        )
        for r in nan_rows:
            if start <= r < start + doc_rows:
                x[r - start] = np.nan
        writer.add(
            x.astype(np.float32), np.zeros(doc_rows, np.int32), doc, np.arange(1, doc_rows + 1)
        )
    return writer.close()


def train_config(**train):
    """configs/tiny.py shrunk for the synthetic store."""
    from configs import tiny

    c = tiny.get_config()
    c.crosscoder.d_model = 32
    c.crosscoder.n_latents = 128
    c.train.steps = 40
    c.train.batch_size = 64
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.lr = 1e-2
    for k, v in train.items():
        c.train[k] = v
    return c


def micro_zoo_config(**zoo_overrides):
    """configs/tiny.py shrunk to a zoo that builds in seconds (2 sizes, 1 and 2 layers)."""
    from configs import tiny

    c = tiny.get_config()
    z = c.zoo
    z.sizes, z.depths, z.main_size = (16, 32), (1, 2), 32
    z.n_layers, z.n_heads, z.n_kv_heads = 2, 2, 1
    z.n_train_problems, z.n_relation_docs, z.n_everyday_docs = 200, 40, 15
    z.n_heldout_problems, z.n_extract_docs, z.n_val_problems = 8, 30, 8
    z.converge_every = 5
    # The micro pair learns the short no-loop traces in its few steps (the reflective ones
    # need far more); the no-loop pair is then distilled on the reflective teacher.
    z.teacher, z.control_teacher = "no_loop", "rounds"
    z.pretrain_steps, z.distill_steps = 15, 10
    z.batch_size, z.max_len, z.max_new_tokens = 4, 64, 16
    for k, v in zoo_overrides.items():
        setattr(z, k, v)
    c.models.device = "cpu"
    return c


def micro_pipeline_config():
    """The micro zoo with a store of small shards and a short crosscoder run: every stage
    of the pipeline in well under a minute."""
    c = micro_zoo_config()
    c.extract.shard_rows = 256
    c.crosscoder.n_latents = 64
    c.train.steps, c.train.batch_size = 30, 64
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 10
    c.train.lr = 1e-2
    # Steering: the micro models rarely end a trace, so the cap (4 x the clean length) and
    # the controls (3 generations per alpha) would make this stage the slowest.
    c.steering.samples, c.steering.max_new_tokens = 2, 24
    return c


def random_export(path, d: int, h: int, layer: int, scale: float, b_enc: float = 0.0):
    """An export of a random 2-model crosscoder (seeded, raw scales 1), loaded back as an
    `ExportedCrosscoder`: for tests of interventions that need no trained dictionary."""
    import numpy as np

    from xcoder_jax import checkpoint as ckpt
    from xcoder_jax.exported import ExportedCrosscoder

    rng = np.random.default_rng(0)
    weights = {
        "W_enc": rng.normal(size=(2, d, h)).astype(np.float32) * scale,
        "b_enc": np.full(h, b_enc, np.float32),
        "W_dec": rng.normal(size=(h, 2, d)).astype(np.float32) * scale,
        "b_dec": np.zeros((2, d), np.float32),
    }
    meta = {"layer": layer, "d_model": d, "n_latents": h, "models": []}
    ckpt.export(str(path), weights, np.array([1.0, 1.0]), meta)
    return ExportedCrosscoder.load(str(path))
