"""What a zoo build accepts (`check_config`) and depends on (`config_hash`).

The hash covers the zoo section of the config, the seed and `ZOO_FORMAT`: a zoo.json recording
the same hash is a finished build of this config, and a model dir stamped with the weights-only
hash is reused when only fields that never change weights differ.
"""

from __future__ import annotations

import hashlib
import json

from xcoder_jax.errors import ConfigError
from xcoder_jax.zoo.texts import TEACHERS

ZOO_FORMAT = 5  # bump when the corpus or training changes, to invalidate old builds
# Fields that do not change weights.
_EVAL_ONLY = ("max_new_tokens", "eval_batch_size", "num_threads", "criterion_min_rate")
_DRY_RUN = ("intermediate_size", "model_vocab_size", "random_pair")


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
    depths = tuple(zc.depths)
    if depths and len(depths) != len(sizes):
        raise ConfigError(f"zoo.depths {depths} needs one depth per size of zoo.sizes {sizes}")
    counts = (zc.n_layers, *depths, zc.n_train_problems, zc.n_heldout_problems)
    if min(*counts, zc.n_val_problems, zc.batch_size, zc.converge_every) < 1:
        raise ConfigError(
            "zoo.n_layers, depths, n_*_problems, batch_size and converge_every must be positive"
        )
    if zc.converge_patience < 1 or zc.converge_tol < 0 or zc.decay_frac < 0:
        raise ConfigError("zoo.converge_patience must be >= 1, converge_tol and decay_frac >= 0")
    for field in ("teacher", "control_teacher"):
        name = zc[field]
        if name not in TEACHERS and (field == "teacher" or name):
            raise ConfigError(f"zoo.{field} must be one of {sorted(TEACHERS)}, got {name!r}")
    if zc.control_teacher == zc.teacher:
        raise ConfigError(f"zoo.control_teacher must differ from zoo.teacher ({zc.teacher!r})")


def config_hash(config, weights_only: bool = False) -> str:
    """What a build depends on: the zoo section, the seed and the zoo format.

    `weights_only` leaves out the fields that only change the evaluation, so a finished model
    is reused when only those change.
    """
    # The dry-run fields enter the hash only when set.
    zoo = {k: v for k, v in config.zoo.to_dict().items() if not (k in _DRY_RUN and not v)}
    if weights_only:
        zoo = {k: v for k, v in zoo.items() if k not in _EVAL_ONLY}
    blob = json.dumps([ZOO_FORMAT, config.seed, zoo], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
