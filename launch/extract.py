r"""Extracts block-L activations of the model pair into the workdir's activation store.

    python launch/extract.py --config=configs/tiny.py --workdir=runs/tiny

Split across processes or hosts, then merge:

    python launch/extract.py --config=... --workdir=... --shard_index=0 --num_shards=3  # x3
    python launch/extract.py --config=... --workdir=... --num_shards=3 --merge

or with the training launch line's flags (`--config.num_processes=3 --config.process_id=i`
stand for `--num_shards=3 --shard_index=i`).
"""

from absl import flags, logging
from ml_collections import config_flags

from xcoder_jax import activations, headlines, launch_util, multihost

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's share of the documents.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of processes sharing the documents.")
_MERGE = flags.DEFINE_bool("merge", False, "Join the num_shards extracted parts into one store.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    index, count = multihost.process_share(config, _SHARD_INDEX.value, _NUM_SHARDS.value)
    if _MERGE.value:
        manifest = activations.merge(config, _WORKDIR.value, count)
    else:
        manifest = activations.extract(config, _WORKDIR.value, index, count)
    m = manifest
    print(f"store: {headlines.extract(m)}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
