r"""Trains the crosscoder on the workdir's activation store; resumes from its checkpoints.

    python launch/train.py --config=configs/tiny.py --workdir=runs/tiny

Ends with the portable export in <workdir>/export (raw activation units).
"""

from absl import flags, logging
from ml_collections import config_flags

from xcoder_jax import launch_util, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    fve = ", ".join(f"{v:.3f}" for v in final["fve"])
    print(f"held-out FVE per model: {fve}; L0 {final['l0']:.1f}; dead {final['dead_fraction']:.1%}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
