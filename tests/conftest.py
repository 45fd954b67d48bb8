"""Shared fixtures: a micro model pair (random Qwen2 weights) and a small corpus.

The made-up inputs themselves (tokenizer, models, corpus, synthetic stores) are
`xcoder_jax.synthetic`'s, which the benchmarks use too; they are imported here under the
names the tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from xcoder_jax import synthetic
from xcoder_jax.synthetic import CORPUS as CORPUS
from xcoder_jax.synthetic import make_model as make_model
from xcoder_jax.synthetic import make_tokenizer as make_tokenizer
from xcoder_jax.synthetic import store_writer as store_writer
from xcoder_jax.synthetic import synthetic_store as synthetic_store

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (strict JSON)."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


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

    return synthetic.micro_config(tiny.get_config(), pair, **extract)


def train_config(**train):
    """configs/tiny.py shrunk for the synthetic store."""
    from configs import tiny

    return synthetic.train_config(tiny.get_config(), **train)


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
    # Behavioural KL on a few documents: its cost grows with them in every stage that reads it.
    c.analysis.kl_docs, c.ablation.kl_docs = 8, 4
    return c


def random_weights(d: int, h: int, seed: int = 1) -> dict:
    """Random 2-model crosscoder weights (normalised units, float32, seeded): W_enc
    [2, d, h], b_enc [h], W_dec [h, 2, d], b_dec [2, d]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(0, 0.3, (2, d, h)).astype(np.float32),
        "b_enc": rng.normal(0, 0.2, h).astype(np.float32),
        "W_dec": rng.normal(0, 0.2, (h, 2, d)).astype(np.float32),
        "b_dec": rng.normal(0, 0.1, (2, d)).astype(np.float32),
    }


def random_export(path, d: int, h: int, layer: int, scale: float, b_enc: float = 0.0):
    """An export of a random 2-model crosscoder (seeded, raw scales 1), loaded back as an
    `ExportedCrosscoder`: for tests of interventions that need no trained dictionary."""
    import numpy as np

    from xcoder_jax import export
    from xcoder_jax.exported import ExportedCrosscoder

    rng = np.random.default_rng(0)
    weights = {
        "W_enc": rng.normal(size=(2, d, h)).astype(np.float32) * scale,
        "b_enc": np.full(h, b_enc, np.float32),
        "W_dec": rng.normal(size=(h, 2, d)).astype(np.float32) * scale,
        "b_dec": np.zeros((2, d), np.float32),
    }
    meta = {"layer": layer, "d_model": d, "n_latents": h, "models": []}
    export.export(str(path), weights, np.array([1.0, 1.0]), meta)
    return ExportedCrosscoder.load(str(path))


def run_on_eight_devices(script: str) -> None:
    """Runs `script` (its `{root}` filled with the repository root) in a fresh process with
    8 simulated CPU devices; it must print "ok" last (its stderr is shown otherwise)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", script.format(root=root)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
