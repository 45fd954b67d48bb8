"""configs/paper.py takes the model size as its argument; `runlocal` shrinks any config."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from xcoder_jax import config_util
from xcoder_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1.5b": (1536, 14), "7b": (3584, 14), "14b": (5120, 24)}


def load(name: str):
    """A config file loaded by path, as --config=configs/<name> loads it."""
    path = ROOT / "configs" / name
    spec = importlib.util.spec_from_file_location(f"test_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_paper_1p5b_has_the_paper_numbers():
    c = load("paper.py").get_config("1.5b")
    assert c.models.base == "Qwen/Qwen2.5-Math-1.5B"
    assert c.models.distilled == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert c.extract.layer == 14
    assert c.crosscoder.d_model == 1536
    assert c.crosscoder.n_latents == 32768
    assert c.crosscoder.loss == "l1" and c.crosscoder.l1_coeff == 2.0
    assert c.train.lr == 5e-5
    assert c.train.batch_size == 1024
    assert c.train.steps * c.train.batch_size == 400_000_000 // 1024 * 1024
    assert c.data.min_tokens == c.data.max_tokens == 2048


@pytest.mark.parametrize("size", sorted(SIZES))
def test_each_size_loads(size):
    c = load("paper.py").get_config(size)
    d_model, layer = SIZES[size]
    assert (c.crosscoder.d_model, c.extract.layer) == (d_model, layer)
    assert c.models.base.startswith("Qwen/") and size in c.models.distilled.lower()
    # Fields the paper does not set keep configs/tiny.py's defaults.
    assert c.analysis.to_dict() == load("tiny.py").get_config().analysis.to_dict()


@pytest.mark.parametrize("arg", [None, "", "13b", "1.5b,7b", "runlocal", "7b,fast"])
def test_paper_rejects_a_bad_argument(arg):
    with pytest.raises(ConfigError, match=r"configs/paper.py needs one of 1\.5b, 7b, 14b"):
        load("paper.py").get_config(arg)


def test_tiny_takes_only_runlocal():
    tiny = load("tiny.py")
    assert tiny.get_config(None).to_dict() == tiny.get_config("").to_dict()
    with pytest.raises(ConfigError, match="configs/tiny.py takes no argument but 'runlocal'"):
        tiny.get_config("7b")


def test_configs_do_not_touch_sys_path():
    before = list(sys.path)
    load("paper.py").get_config("7b")
    assert sys.path == before
    for path in (ROOT / "configs").glob("*.py"):
        assert "sys.path" not in path.read_text(), path


@pytest.mark.parametrize(
    "name, arg", [("tiny.py", ""), ("paper.py", "1.5b"), ("paper.py", "14b"), ("pair.py", "")]
)
def test_runlocal_shrinks_and_keeps_the_rest(name, arg):
    module = load(name)
    full = flat(module.get_config(arg).to_dict())
    local = flat(module.get_config(",".join(filter(None, [arg, "runlocal"]))).to_dict())
    assert full.keys() == local.keys()
    for key, cap in config_util.RUNLOCAL_CAPS.items():
        assert local[key] == (cap if full[key] < 0 else min(full[key], cap)), key
    changed = {k for k in full if full[k] != local[k]}
    assert changed <= set(config_util.RUNLOCAL_CAPS) | {"crosscoder.aux_k"}
    assert local["crosscoder.aux_k"] <= local["crosscoder.n_latents"]
    # What a smoke run exercises is kept: the models, the layer, the loss, the optimiser.
    for key in ("models.base", "extract.layer", "crosscoder.d_model", "crosscoder.loss"):
        assert local[key] == full[key]
    assert (local["train.lr"], local["crosscoder.l1_coeff"]) == (full["train.lr"], 2.0)
    # Small enough for a minute on CPU.
    assert local["train.steps"] <= 40 and local["train.batch_size"] <= 64
    assert local["crosscoder.n_latents"] <= 256 and local["data.max_docs"] <= 64
    assert local["steering.n_prompts"] <= 4 and local["zoo.pretrain_steps"] <= 20


def test_runlocal_config_passes_the_stages_checks():
    from xcoder_jax.geometry.study import check_config as check_geometry
    from xcoder_jax.zoo import check_config as check_zoo

    c = load("tiny.py").get_config("runlocal")
    check_zoo(c.zoo)
    check_geometry(c.geometry)
    assert c.train.eval_every % c.train.log_every == 0  # evaluations happen at log steps
    assert c.ablation.n_random >= 2  # the ablation's confidence intervals need two draws


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ml_collections loads by load_module
def test_config_flag_passes_the_argument():
    """--config=configs/paper.py:7b,runlocal, parsed by ml_collections as a launch script does."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv)
    fv(["prog", f"--config={ROOT}/configs/paper.py:7b,runlocal"])
    assert fv.config.crosscoder.d_model == 3584
    assert fv.config.crosscoder.n_latents == 256 and fv.config.train.steps == 40


@pytest.mark.parametrize("arg", ["1.5b,batchtopk", "batchtopk,1.5b"])
def test_batchtopk_variant_changes_only_the_loss(arg):
    l1 = flat(load("paper.py").get_config("1.5b").to_dict())
    topk = flat(load("paper.py").get_config(arg).to_dict())
    changed = {k for k in l1 if l1[k] != topk[k]}
    assert changed == {
        "crosscoder.loss",
        "crosscoder.k",
        "crosscoder.aux_k",
        "crosscoder.b_dec_init",
    }
    assert (topk["crosscoder.loss"], topk["crosscoder.k"], topk["crosscoder.aux_k"]) == (
        "batchtopk",
        100,
        768,
    )
    tiny = load("tiny.py")
    base, variant = flat(tiny.get_config().to_dict()), flat(tiny.get_config("batchtopk").to_dict())
    assert {k for k in base if base[k] != variant[k]} == {
        "crosscoder.loss",
        "crosscoder.b_dec_init",
    }
    with pytest.raises(ConfigError, match="needs one of"):
        load("paper.py").get_config("batchtopk")
