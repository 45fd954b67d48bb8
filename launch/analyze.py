r"""Analyses the workdir's crosscoder export over its activation store.

    python launch/analyze.py --config=configs/tiny.py --workdir=runs/tiny

Writes <workdir>/analysis/summary.json, latents.jsonl and report.html; a finished analysis of
the same export and settings is left as it is.
"""

from absl import flags
from ml_collections import config_flags

from xcoder_jax import analysis, launch_util

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    summary = analysis.run_analysis(_CONFIG.value, _WORKDIR.value)
    print(analysis.summarize(summary))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
