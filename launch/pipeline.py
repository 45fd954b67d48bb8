r"""The main job: every stage of the study on one config, resumable.

python launch/pipeline.py --config=configs/tiny.py --workdir=runs/tiny
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from xcoder_jax import launch_util, pipeline
from xcoder_jax import workdir as wd

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    summary = pipeline.run(_CONFIG.value, _WORKDIR.value)
    print("\nSummary of", _WORKDIR.value)
    for stage, line in summary.items():
        print(f"  {stage:<10} {line}")
    report = os.path.join(wd.stage_dir(_WORKDIR.value, "analysis"), "report.html")
    if os.path.exists(report):
        print(f"\nReport: {report}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
