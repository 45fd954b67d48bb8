"""The paper's 1.5B shapes end to end without the hub (`configs/paper.py:1.5b,dryrun`), at a
reduced depth: the random pair has Qwen2.5-Math-1.5B's width, heads, MLP and vocabulary, and
the crosscoder the paper's 32,768 latents on d = 2 x 1536."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from configs import paper
from xcoder_jax import pipeline
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore

LAYERS = 2  # of the real 28: the same code path, a fraction of the weights


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    c = paper.get_config("1.5b,dryrun")
    c.zoo.n_layers, c.extract.layer = LAYERS, LAYERS // 2
    c.train.steps = 2
    c.data.max_docs = 6  # two shards of rows: one to train on, one held out
    workdir = str(tmp_path_factory.mktemp("dryrun"))
    stages = [s for s in pipeline.STAGES if s[0] in ("zoo", "extract", "train")]
    original, pipeline.STAGES = pipeline.STAGES, stages
    try:
        pipeline.run(c, workdir)
    finally:
        pipeline.STAGES = original
    return c, workdir


def test_dry_run_pair_has_the_paper_architecture(dry):
    _, workdir = dry
    for role in ("base", "distilled"):
        with open(os.path.join(wd.model_dir(workdir, role), "config.json")) as f:
            arch = json.load(f)
        assert arch["hidden_size"] == 1536 and arch["intermediate_size"] == 8960
        assert arch["num_attention_heads"] == 12 and arch["num_key_value_heads"] == 2
        assert arch["vocab_size"] == 151_936 and arch["num_hidden_layers"] == LAYERS
    name = "model.layers.0.mlp.up_proj.weight"
    base, distilled = (
        safe_open(os.path.join(wd.model_dir(workdir, r), "model.safetensors"), "np").get_tensor(
            name
        )
        for r in ("base", "distilled")
    )
    assert base.shape == (8960, 1536)
    assert not np.array_equal(base, distilled)  # two random draws, not a copy


def test_dry_run_trains_the_paper_crosscoder_shape(dry):
    c, workdir = dry
    store = ActivationStore(wd.activations_dir(workdir))
    assert store.d_model == 1536 and store.layer == LAYERS // 2 and store.n_models == 2
    tensors = load_file(os.path.join(wd.export_dir(workdir), "crosscoder.safetensors"))
    assert tensors["W_enc"].shape == (2, 1536, 32_768)
    assert tensors["W_dec"].shape == (32_768, 2, 1536)
    assert all(np.isfinite(t).all() for t in tensors.values())
    with open(os.path.join(wd.export_dir(workdir), "config.json")) as f:
        exported = json.load(f)
    assert exported["tokens_trained"] == c.train.steps * c.train.batch_size == 512
    assert exported["n_latents"] == 32_768 and exported["d_model"] == 1536
