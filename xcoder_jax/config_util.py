"""Helpers for the config files in configs/: their argument, their shared defaults, runlocal.

A config file's `get_config(arg)` receives what follows the colon of `--config=path:arg`:
comma-separated words such as `1.5b,runlocal` (big_vision style). `runlocal` shrinks any
config to a CPU smoke run of every stage (`runlocal(config)`); every other field keeps its
value.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType

from xcoder_jax.errors import ConfigError

RUNLOCAL = "runlocal"

# Upper bounds `runlocal` puts on fields (a field already smaller, or absent, is kept; -1,
# "all", becomes the bound). Sized so the whole pipeline on configs/tiny.py (four zoo sizes
# and the no-loop pair included) runs in a few minutes on 2 CPU cores; the paper's configs
# still need their models and data.
RUNLOCAL_CAPS = {
    # The embedded zoo: fewer problems, documents and steps, the same architecture.
    "zoo.n_train_problems": 200,
    "zoo.n_relation_docs": 40,
    "zoo.n_everyday_docs": 15,
    "zoo.n_heldout_problems": 16,
    "zoo.n_val_problems": 16,
    "zoo.converge_every": 5,
    "zoo.converge_patience": 1,
    "zoo.max_len": 128,
    "zoo.n_extract_docs": 64,
    "zoo.pretrain_steps": 20,
    "zoo.distill_steps": 15,
    "zoo.batch_size": 8,
    "zoo.max_new_tokens": 48,
    # Extraction: a few short documents in small shards.
    "data.max_docs": 64,
    "data.max_tokens": 256,
    "extract.shard_rows": 512,
    # The crosscoder and its training.
    "crosscoder.n_latents": 256,
    "crosscoder.dead_window_tokens": 1000,
    "train.steps": 40,
    "train.batch_size": 64,
    "train.log_every": 10,
    "train.eval_every": 20,
    "train.checkpoint_every": 20,
    "train.group_shards": 2,
    "train.prefetch": 2,
    # Analysis, steering, ablation and geometry: fewer documents, prompts, draws, resamples.
    "analysis.splice_docs": 8,
    "analysis.kl_docs": 8,
    "analysis.kl_random_draws": 2,
    "analysis.scaling_max_latents": 64,
    "steering.n_prompts": 4,
    "steering.samples": 2,
    "steering.max_new_tokens": 32,
    "ablation.n_random": 2,
    "ablation.n_docs": 16,
    "ablation.kl_docs": 8,
    "selection.n_docs": 16,
    "geometry.max_pairs": 100,
    "geometry.n_shuffles": 2,
    "geometry.n_boot": 100,
}


def parse_arg(arg: str | None, where: str, choices: Sequence[str] = ()) -> tuple[str | None, bool]:
    """Splits a config argument into (choice, runlocal).

    `arg` is comma-separated words: with `choices`, exactly one of them must be given (the
    choice), else none; `runlocal` may be added in either case. Raises ConfigError otherwise;
    `where` (the config file) names the culprit in the message.
    """
    words = [w.strip() for w in (arg or "").split(",") if w.strip()]
    local = RUNLOCAL in words
    rest = [w for w in words if w != RUNLOCAL]
    if not choices:
        if rest:
            raise ConfigError(f"{where} takes no argument but {RUNLOCAL!r}, got {arg!r}")
        return None, local
    if len(rest) != 1 or rest[0] not in choices:
        got = repr(arg) if arg else "no argument"
        raise ConfigError(
            f"{where} needs one of {', '.join(choices)} after a colon, e.g. "
            f"--config={where}:{choices[0]} (or {choices[0]},{RUNLOCAL} for a CPU smoke run); "
            f"got {got}"
        )
    return rest[0], local


BATCHTOPK = "batchtopk"


def split_variant(arg: str | None, variant: str = BATCHTOPK) -> tuple[str | None, bool]:
    """(the config argument without the word `variant`, whether it was there): a loss
    variant combines with any other argument, e.g. `configs/paper.py:1.5b,batchtopk`."""
    words = [w.strip() for w in (arg or "").split(",") if w.strip()]
    return ",".join(w for w in words if w != variant) or None, variant in words


MATRYOSHKA = "matryoshka"
LOSS_VARIANTS = (BATCHTOPK, MATRYOSHKA)


def loss_variant(arg: str | None) -> tuple[str | None, str | None]:
    """(the config argument without its loss word, the loss it names or None): at most one
    of `LOSS_VARIANTS`, e.g. `configs/paper.py:1.5b,matryoshka`."""
    found = []
    for variant in LOSS_VARIANTS:
        arg, there = split_variant(arg, variant)
        found += [variant] if there else []
    if len(found) > 1:
        raise ConfigError(f"one loss variant at most, got {' and '.join(found)}")
    return arg, (found[0] if found else None)


def batchtopk(config, k: int, aux_k: int | None = None, loss: str = BATCHTOPK):
    """Switches `config` (in place; returned) to BatchTopK (Minder et al. 2025), the
    recipe of the model-diffing literature: k active latents per row on average, AuxK on
    dead latents with coefficient 1/32, the EMA threshold as the inference JumpReLU, the
    decoder bias starting at the store's mean (fewer dead latents, README). Use it against
    the L1 loss's false exclusive latents; keep L1 for fidelity to the paper. `loss`
    MATRYOSHKA: the same recipe with nested groups of latents (Bussmann et al. 2025,
    `crosscoder.group_fractions`)."""
    if loss not in LOSS_VARIANTS:
        raise ConfigError(f"not a BatchTopK loss: {loss!r} ({', '.join(LOSS_VARIANTS)})")
    cc = config.crosscoder
    cc.loss, cc.k, cc.aux_coeff, cc.b_dec_init = loss, k, 1 / 32, "mean"
    if aux_k is not None:
        cc.aux_k = aux_k
    return config


def runlocal(config):
    """Shrinks `config` in place (and returns it) to a CPU smoke run of every stage.

    Bounds the fields of RUNLOCAL_CAPS (steps, batches, latents, documents, prompts, draws,
    resamples) and nothing else: the models, layer, loss, learning rate, schedule shares and
    every other field keep their values.
    """
    for path, cap in RUNLOCAL_CAPS.items():
        section, field = path.split(".")
        if section not in config or field not in config[section]:
            continue
        value = config[section][field]
        config[section][field] = cap if value < 0 else min(value, cap)
    if "crosscoder" in config:  # AuxK cannot pick more dead latents than there are latents
        cc = config.crosscoder
        cc.aux_k = min(cc.aux_k, cc.n_latents)
    return config


def load_sibling(config_file: str, name: str) -> ModuleType:
    """The config module `name` (e.g. "tiny.py") next to `config_file`, loaded by path.

    Config files are loaded by path (`--config=configs/paper.py`), so they cannot import
    each other as a package without changing sys.path; this reads the sibling file instead.
    """
    return load_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def load_file(path: str) -> ModuleType:
    """The config module at `path`, loaded by path (ConfigError when it cannot be)."""
    module_name = "xcoder_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load the config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
