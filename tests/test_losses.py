"""The loss kinds' registry: each kind whole in its module, found by its name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import train_config
from xcoder_jax import losses
from xcoder_jax import train_step as ts
from xcoder_jax.crosscoder import Crosscoder
from xcoder_jax.errors import ConfigError


def test_every_kind_is_registered_under_its_name():
    assert list(losses.KINDS) == ["l1", "batchtopk", "matryoshka"]
    for name, module in losses.MODULES.items():
        assert module.NAME == name and losses.KINDS[name] is module.from_config
        assert losses.encoder(name) is module.encode
        c = train_config()
        c.crosscoder.loss, c.crosscoder.k = name, 4
        assert losses.from_config(c).name == name
    with pytest.raises(
        ConfigError, match=r"unknown crosscoder.loss 'topk' \(l1, batchtopk, matryoshka\)"
    ):
        losses.encoder("topk")


def test_each_kind_sets_its_decoder_init_norm():
    c = train_config()
    c.crosscoder.dec_init_norm, c.crosscoder.batchtopk_dec_init_norm = 0.08, 1.0

    def init_norm(kind):
        c.crosscoder.loss, c.crosscoder.k = kind, 4
        hp = ts.HParams.from_config(c, d_model=32, total_var=[1.0, 1.0])
        assert hp.dec_init_norm == losses.dec_init_norm(c)
        return hp.dec_init_norm

    assert init_norm("l1") == 0.08 and init_norm("batchtopk") == init_norm("matryoshka") == 1.0
    del c.crosscoder.batchtopk_dec_init_norm  # a config without it: the L1 loss's norm
    assert init_norm("batchtopk") == 0.08


def test_the_modules_encoder_is_the_loss_kinds():
    cc = Crosscoder(2, 8, 32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 2, 8))
    weighted = jax.nn.relu(cc.pre_acts(x)) * cc.decoder_norms().sum(-1)
    cc.threshold[...] = jnp.full(32, jnp.median(weighted[weighted > 0]))
    by_kind = {"l1": losses.L1(1.0, 0.1, 10), "batchtopk": losses.BatchTopK(4, 8, 0.1, 0.99)}
    by_kind["matryoshka"] = losses.Matryoshka(4, 8, 0.1, 0.99, (8, 24))
    for kind, loss in by_kind.items():
        np.testing.assert_array_equal(cc.encode(x, kind), loss.encode(cc, x))
    # Only BatchTopK's encoder reads the threshold: it turns some activations off.
    assert (cc.encode(x, "batchtopk") > 0).sum() < (cc.encode(x, "l1") > 0).sum()
