r"""The main job: every stage of the study on one config, resumable.

python launch/pipeline.py --config=configs/tiny.py --workdir=runs/tiny
"""

from absl import flags, logging
from ml_collections import config_flags

from xcoder_jax import launch_util, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    workdir = _WORKDIR.value
    summary = pipeline.run(_CONFIG.value, workdir)
    print("\n" + "\n".join(pipeline.summary_lines(workdir, summary)))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
