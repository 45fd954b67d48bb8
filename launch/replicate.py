r"""The whole embedded study once per seed, and which declared findings the seeds confirm.

    python launch/replicate.py --config=configs/tiny.py --workdir=runs/replicate --seeds=0,1,2,3,4

Each seed runs in <workdir>/seed<s> (resumable); the table goes to <workdir>/replication.json
and <workdir>/replication.md. The findings are the family declared in xcoder_jax/family.py;
seed 0 is exploratory (shown, not pooled), the others are pooled by random effects and the
family is Holm-corrected (see xcoder_jax/replicate.py).
"""

from absl import flags, logging
from ml_collections import config_flags

from xcoder_jax import launch_util, replicate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Holds one run per seed.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds, comma-separated.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    seeds = [int(s) for s in _SEEDS.value]
    table = replicate.run_replication(_CONFIG.value, _WORKDIR.value, seeds)
    print()
    print(replicate.markdown(table))
    print(f"Written: {_WORKDIR.value}/{replicate.JSON}, {_WORKDIR.value}/{replicate.MARKDOWN}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
