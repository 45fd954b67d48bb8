"""What the geometry study accepts (`check_config`) and what its results depend on
(`results_key`, recorded in results.json as its fingerprint).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from xcoder_jax import stage
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, MissingInputError
from xcoder_jax.geometry.relations import split_template

FORMAT = 4  # bump when the metric or the results layout changes, to invalidate old results


def check_config(gc) -> None:
    """Raise a one-line ConfigError (a ValueError) for a geometry config that cannot run."""
    ks = tuple(gc.n_components)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ConfigError(f"geometry.n_components must be distinct positive ints, got {ks}")
    if gc.plot_n_components not in ks:
        raise ConfigError(f"geometry.plot_n_components={gc.plot_n_components} is not in {ks}")
    if gc.n_shuffles < 1 or gc.batch_size < 1 or gc.n_boot < 1:
        raise ConfigError("geometry.n_shuffles, n_boot and batch_size must be positive")
    split_template(gc.template)


def results_key(
    config, workdir: str, entries: list[dict], has_sham: Callable[[dict], bool]
) -> dict:
    """What the geometry results of the pairs `entries` (`study.model_pairs`) depend on;
    results.json recording the same key is reused. `has_sham(entry)`: whether a zoo pair has
    a sham model (a sham built into an existing zoo adds its gain, so changes the key)."""
    zoo_hash = None
    if any(e["zoo"] for e in entries):
        from xcoder_jax.zoo import config_hash

        zoo_hash = config_hash(config)
        path = wd.zoo_report_path(workdir)
        if not os.path.exists(path):
            raise MissingInputError(f"no zoo in {workdir}: build it first (launch/build_zoo.py)")
        with open(path) as f:
            if json.load(f).get("config_hash") != zoo_hash:
                raise ConfigError(f"the zoo in {workdir} was built from another zoo config")
    geometry = config.geometry.to_dict()
    geometry["pairs"] = [dict(p) for p in config.geometry.pairs]
    sham = [e["name"] for e in entries if e["zoo"] and has_sham(e)]
    key = {
        "format": FORMAT,
        "geometry": geometry,
        "seed": config.seed,
        "extract_layer": config.extract.layer,
        "zoo_config_hash": zoo_hash,
        "pairs": entries,
        "sham_models": sham,  # a sham built into an existing zoo adds its gain
        "torch_dtype": config.models.torch_dtype,
    }
    return stage.canonical(key)  # tuples become lists, as they come back from disk
