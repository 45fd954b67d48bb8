"""The held-out split of the store, as training used it.

Training holds out the last `train.eval_shards` shards of the store (`ActivationStore.split`)
and records which in the export's config.json (and its checkpoints) under "split":

    {"eval_shards": 1, "heldout_shards": [7], "group_shards": 4}

Every later stage that measures on held-out documents takes them from there
(`heldout_from_export`), so that it measures on rows the crosscoder was not trained on.
A leaf module: no JAX, no Orbax.
"""

from __future__ import annotations

from xcoder_jax.errors import ConfigError

KEY = "split"  # the export config's field


def record(config, heldout_shards) -> dict:
    """The split a training run uses: `train.eval_shards`, the held-out shards that gives
    (`ActivationStore.split`), and `train.group_shards` (shards shuffled together)."""
    return {
        "eval_shards": int(config.train.eval_shards),
        "heldout_shards": [int(s) for s in heldout_shards],
        "group_shards": int(config.train.group_shards),
    }


def heldout_from_export(export_config: dict, store, config) -> list[int]:
    """The store shards held out from training, as the export records them.

    ConfigError when `config.train.eval_shards` is not the value training used, or when a
    recorded shard is not in `store`. Exports that record no split (written before it was
    recorded, or elsewhere) fall back to `store.split(config.train.eval_shards)`.
    """
    n = int(config.train.eval_shards)
    recorded = export_config.get(KEY)
    if recorded is None:
        return store.split(n)[1]
    heldout = [int(s) for s in recorded["heldout_shards"]]
    if int(recorded["eval_shards"]) != n:
        raise ConfigError(
            f"the export was trained with train.eval_shards = {recorded['eval_shards']} "
            f"(held-out shards {heldout}); this config says {n}: analysing with another split "
            "would measure held-out figures on trained rows"
        )
    missing = [s for s in heldout if not 0 <= s < len(store.shards)]
    if missing:
        raise ConfigError(
            f"the export's held-out shards {missing} are not in the store ({len(store.shards)} "
            "shards): it was trained on another store"
        )
    return heldout
