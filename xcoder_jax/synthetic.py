"""Made-up inputs for tests and benchmarks: a micro tokenizer and Qwen2 model, a small
arithmetic corpus, activation stores of synthetic rows, and configs shrunk to fit them.

    tok = make_tokenizer(CORPUS)
    base = make_model(f"{root}/base", tok, seed=0)           # a save_pretrained directory
    manifest = synthetic_store(f"{root}/activations", n_rows=4096)
    config = train_config(tiny.get_config(), steps=40)       # configs/tiny.py, shrunk

Nothing here needs the test suite; torch, tokenizers and transformers are imported by the
functions that use them.
"""

from __future__ import annotations

import numpy as np

CORPUS = [
    f"Question: Tom has {a} apples and buys {b} more. How many now?\nAnswer: {a} + {b} = {a + b}."
    f" Wait, let me check. Therefore the answer is {a + b}."
    for a in range(1, 9)
    for b in range(1, 5)
]


def make_tokenizer(texts, vocab_size=300):
    """A byte-level BPE trained on `texts` (eos and pad: <|endoftext|>)."""
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
    """A Qwen2 model with random weights (seeded) saved with `tokenizer` at `path`."""
    import torch
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


def micro_config(config, pair, **extract):
    """`config` (configs/tiny.py's) pointed at a micro pair ({"base", "distilled": model
    directories, "corpus": a JSONL file}), on CPU, with small extraction batches and
    shards; `extract` overrides fields of `config.extract`."""
    c = config
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


def train_config(config, **train):
    """`config` (configs/tiny.py's) shrunk for a synthetic store of d = 32: 128 latents,
    40 steps of 64 rows; `train` overrides fields of `config.train`."""
    c = config
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
