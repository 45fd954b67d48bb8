"""What every config field a run reads accepts: `RULES`, checked by `config_check`.

A `Rule` is a test of one value and the words naming what it accepts ("an integer >= 1");
`integer`, `number`, `choice` and `each` build them. Option lists that live with their code
(loss kinds, export formats, teachers, ...) are read only when a config is checked, so this
module imports nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What one field accepts: `ok(value)` and the words naming it ("an integer >= 1"),
    either as they are or computed when needed (a choice lists the options of its code)."""

    ok: Callable[[Any], bool]
    words: str | Callable[[], str]

    @property
    def accepted(self) -> str:
        return self.words if isinstance(self.words, str) else self.words()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int, hi: int | None = None, also: tuple[int, ...] = (), note: str = "") -> Rule:
    """An int in [lo, hi] (or one of `also`, e.g. -1 for "all")."""
    words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if also:
        words += ", or " + " or ".join(str(a) for a in also) + (f" ({note})" if note else "")
    in_range = lambda v: v >= lo and (hi is None or v <= hi)
    return Rule(lambda v: _is_int(v) and (v in also or in_range(v)), words)


def number(lo: float, hi: float | None = None, lo_open=False, hi_open=False) -> Rule:
    """A finite number in the interval from lo to hi (brackets as given)."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    words = f"a number in {left}{lo}, {'inf' if hi is None else hi}{right}"
    above = lambda v: v > lo if lo_open else v >= lo
    below = lambda v: hi is None or (v < hi if hi_open else v <= hi)
    return Rule(lambda v: _is_number(v) and above(v) and below(v), words)


def choice(options: Callable[[], Iterable[str]] | Iterable[str]) -> Rule:
    """One of `options` (a callable is read only when checking: the lists live with their
    code, some of it heavy to import)."""
    get = options if callable(options) else (lambda o=tuple(options): o)
    return Rule(lambda v: v in tuple(get()), lambda: "one of " + ", ".join(map(repr, get())))


def each(rule: Rule, min_len: int = 1) -> Rule:
    """A tuple/list of at least `min_len` values, each accepted by `rule`."""
    seq = lambda v: isinstance(v, (tuple, list)) and len(v) >= min_len
    ok = lambda v: seq(v) and all(rule.ok(x) for x in v)
    return Rule(ok, lambda: f"a list of {rule.accepted}")


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
STRING = Rule(lambda v: isinstance(v, str), "a string")
POSITIVE = integer(1)
MODEL = Rule(lambda v: isinstance(v, str) and v.strip() != "", "'zoo', a model directory or hub id")
COUNT = integer(0)
ALL_OR_POSITIVE = integer(1, also=(-1,), note="all")
FRACTION = number(0, 1)
SHARE = number(0, 1, lo_open=True)  # (0, 1]: a share of something that must not be empty
PROBABILITY_OPEN = number(0, 1, hi_open=True)  # [0, 1): Adam's betas, an EMA's decay
POSITIVE_NUMBER = number(0, lo_open=True)
# (f_base, f_distilled): shares of the latents dedicated to one model (`xcoder_jax.exclusive`).
EXCLUSIVE = Rule(
    lambda v: isinstance(v, (tuple, list)) and len(v) == 2
    and all(PROBABILITY_OPEN.ok(x) for x in v) and sum(v) < 1,
    "a pair (base-only, distilled-only) of numbers in [0, 1) summing to < 1",
)  # fmt: skip
# Matryoshka's latent groups: shares of n_latents, each > 0, summing to 1 (within 1e-6).
GROUP_FRACTIONS = Rule(
    lambda v: each(POSITIVE_NUMBER).ok(v) and abs(math.fsum(v) - 1.0) <= 1e-6,
    "a list of numbers > 0 summing to 1",
)


def _losses():
    from xcoder_jax.losses import KINDS

    return KINDS


def _l1_paths():
    from xcoder_jax.losses.l1 import PATHS

    return PATHS


def _conventions():
    from xcoder_jax.exported import CONVENTIONS

    return CONVENTIONS


def _categories():
    from xcoder_jax.lexicon import CATEGORY_NAMES

    return CATEGORY_NAMES


def _formats():
    from xcoder_jax.formats import FORMATS

    return FORMATS


def _teachers():
    from xcoder_jax.zoo.texts import TEACHERS

    return TEACHERS


RULES: dict[str, Rule] = {
    "seed": COUNT,
    "num_processes": integer(1, also=(-1,), note="the cluster tells"),
    "process_id": integer(0, also=(-1,), note="the cluster tells"),
    "heartbeat_seconds": POSITIVE_NUMBER,
    "models.base": MODEL,
    "models.distilled": MODEL,
    "models.torch_dtype": choice(("float32", "bfloat16", "float16")),
    "models.device": STRING,
    # The zoo (its structure: zoo.build_config.check_config).
    "zoo.n_layers": POSITIVE,
    "zoo.n_heads": POSITIVE,
    "zoo.n_kv_heads": POSITIVE,
    "zoo.mlp_mult": POSITIVE,
    "zoo.vocab_size": integer(256),
    "zoo.max_len": integer(8),
    "zoo.teacher": choice(_teachers),
    "zoo.n_train_problems": POSITIVE,
    "zoo.n_relation_docs": COUNT,
    "zoo.n_everyday_docs": COUNT,
    "zoo.replay_frac": FRACTION,
    "zoo.n_heldout_problems": POSITIVE,
    "zoo.n_val_problems": POSITIVE,
    "zoo.n_extract_docs": POSITIVE,
    "zoo.pretrain_steps": POSITIVE,
    "zoo.distill_steps": POSITIVE,
    "zoo.converge_every": POSITIVE,
    "zoo.converge_patience": POSITIVE,
    "zoo.converge_tol": number(0),
    "zoo.decay_frac": FRACTION,
    "zoo.batch_size": POSITIVE,
    "zoo.lr": POSITIVE_NUMBER,
    "zoo.distill_lr": POSITIVE_NUMBER,
    "zoo.warmup_frac": FRACTION,
    "zoo.weight_decay": number(0),
    "zoo.criterion_min_rate": FRACTION,
    "zoo.max_new_tokens": POSITIVE,
    "zoo.eval_batch_size": POSITIVE,
    "zoo.num_threads": POSITIVE,
    # Text and extraction.
    "data.min_tokens": COUNT,
    "data.max_tokens": POSITIVE,
    "data.max_docs": ALL_OR_POSITIVE,
    "extract.layer": integer(0, also=(-1,), note="n_layers // 2"),
    "extract.exclude_first": COUNT,
    "extract.exclude_special": BOOL,
    "extract.batch_size": POSITIVE,
    "extract.dtype": choice(("bfloat16", "float16")),
    "extract.shard_rows": POSITIVE,
    "extract.max_rows": ALL_OR_POSITIVE,
    # The crosscoder and its training.
    "crosscoder.n_models": integer(2, 2),
    "crosscoder.d_model": integer(1, also=(-1, 0), note="read from the store"),
    "crosscoder.n_latents": POSITIVE,
    "crosscoder.loss": choice(_losses),
    "crosscoder.l1_coeff": number(0),
    "crosscoder.l1_warmup_frac": FRACTION,
    "crosscoder.k": POSITIVE,
    "crosscoder.k_max": integer(1, also=(0,), note="4 k"),
    "crosscoder.k_anneal_steps": COUNT,
    "crosscoder.aux_k": COUNT,
    "crosscoder.aux_coeff": number(0),
    "crosscoder.threshold_ema": PROBABILITY_OPEN,
    "crosscoder.topk_path": choice(("auto", "dense", "sparse")),
    "crosscoder.l1_path": choice(_l1_paths),
    "crosscoder.group_fractions": GROUP_FRACTIONS,
    "crosscoder.dead_window_tokens": POSITIVE,
    "crosscoder.dec_init_norm": POSITIVE_NUMBER,
    "crosscoder.batchtopk_dec_init_norm": POSITIVE_NUMBER,
    "crosscoder.b_dec_init": choice(("zero", "mean")),
    "crosscoder.center": BOOL,
    "crosscoder.exclusive": EXCLUSIVE,
    "crosscoder.dtype": choice(("float32", "bfloat16")),
    "train.mu_dtype": choice(("float32", "bfloat16")),
    "export.formats": each(choice(_formats), min_len=0),
    "train.steps": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.lr": POSITIVE_NUMBER,
    "train.beta1": PROBABILITY_OPEN,
    "train.beta2": PROBABILITY_OPEN,
    "train.clip_norm": POSITIVE_NUMBER,
    "train.decay_start_frac": FRACTION,
    "train.log_every": POSITIVE,
    "train.eval_every": COUNT,
    "train.eval_shards": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.group_shards": POSITIVE,
    "train.prefetch": COUNT,
    "train.nonfinite_rows": choice(("error", "skip")),
    "train.verify_store": BOOL,
    "mesh.data": integer(1, also=(-1,), note="all devices not used by 'model'"),
    "mesh.model": POSITIVE,
    # Geometry (its structure: geometry.results_key.check_config).
    "geometry.max_pairs": integer(2, also=(-1,), note="all"),
    "geometry.n_shuffles": POSITIVE,
    "geometry.n_boot": POSITIVE,
    "geometry.batch_size": POSITIVE,
    # Analysis.
    "analysis.norm": choice(("l1", "l2")),
    "analysis.base_only_max": FRACTION,
    "analysis.distilled_only_min": FRACTION,
    "analysis.nrn_bins": POSITIVE,
    "analysis.top_k_examples": POSITIVE,
    "analysis.context_before": COUNT,
    "analysis.context_after": COUNT,
    "analysis.firing_share": FRACTION,
    "analysis.label_min_share": FRACTION,
    "analysis.top_latents": POSITIVE,
    "analysis.batch_rows": POSITIVE,
    "analysis.scaling_max_latents": COUNT,
    "analysis.scaling_min_rows": POSITIVE,
    "analysis.scaling_false_ratio": POSITIVE_NUMBER,
    "analysis.splice_docs": COUNT,
    "analysis.splice_batch": POSITIVE,
    "analysis.kl_docs": COUNT,
    "analysis.kl_random_draws": COUNT,
    "analysis.browser_latents": COUNT,
    "analysis.browser_examples": COUNT,
    "analysis.browser_promoted": COUNT,
    # Selection, steering and ablation.
    "selection.max_controls": POSITIVE,
    "selection.n_docs": POSITIVE,
    "selection.batch_size": POSITIVE,
    "steering.min_nrn": FRACTION,
    "steering.models": each(choice(("base", "distilled"))),
    "steering.convention": choice(_conventions),
    "steering.alphas": each(number(-1e6, 1e6)),
    "steering.n_prompts": ALL_OR_POSITIVE,
    "steering.samples": POSITIVE,
    "steering.temperature": number(0),
    "steering.max_new_tokens": POSITIVE,
    "steering.cap_factor": number(1),
    "steering.n_control_draws": POSITIVE,
    "steering.match_pool": POSITIVE,
    "steering.batch_size": POSITIVE,
    "ablation.categories": each(choice(_categories)),
    "ablation.rules": each(choice(("specificity", "attribution"))),
    "ablation.fracs": each(SHARE),
    "ablation.headline_frac": SHARE,
    "ablation.min_nrn": FRACTION,
    "ablation.dose_levels": each(POSITIVE_NUMBER),
    "ablation.n_random": POSITIVE,
    "ablation.n_docs": POSITIVE,
    "ablation.batch_size": POSITIVE,
    "ablation.kl_docs": COUNT,
}
