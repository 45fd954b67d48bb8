r"""Crosscoder variants compared on one store, over several seeds (xcoder_jax/variants.py).

    python launch/variants.py --config=configs/tiny.py --store=runs/tiny \
        --workdir=runs/variants --seeds=0,1,2

--store names a workdir whose zoo and activation store are built (`make demo`, or
launch/build_zoo.py and launch/extract.py). Each variant and seed trains, analyses and
ablates in <workdir>/<variant>/seed<s> (resumable); the table goes to
<workdir>/variants.json and <workdir>/variants.md. At each seed the l1 variant runs first and
the BatchTopK variants run at k = its held-out L0 (--k without l1). --table_only tabulates
the finished runs (no --store needed).
"""

from absl import flags, logging
from ml_collections import config_flags

from xcoder_jax import launch_util, variants
from xcoder_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "One run per variant and seed.", required=True)
_STORE = flags.DEFINE_string("store", None, "Workdir with the model pair and store.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, comma-separated.")
_K = flags.DEFINE_integer("k", None, "BatchTopK k when the l1 variant is not run (else its L0).")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Tabulate the finished runs; run nothing.")
_VARIANTS = flags.DEFINE_list("variants", list(variants.VARIANTS), "Variants, comma-separated.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    seeds = [int(s) for s in _SEEDS.value]
    if _TABLE_ONLY.value:
        tab = variants.collect(_WORKDIR.value, _VARIANTS.value, seeds)
    elif not _STORE.value:
        raise ConfigError("--store is required (a workdir with the model pair and store)")
    else:
        tab = variants.run_variants(
            _CONFIG.value, _WORKDIR.value, _STORE.value, _VARIANTS.value, seeds, k=_K.value
        )
    print()
    print(variants.markdown(tab))
    print(f"Written: {_WORKDIR.value}/{variants.JSON}, {_WORKDIR.value}/{variants.MARKDOWN}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
