r"""Steers the model pair along crosscoder latents' decoder rows and measures reasoning style.

    python launch/steer.py --config=configs/tiny.py --workdir=runs/tiny

Writes <workdir>/steering/results.json, samples.jsonl and steering.png;
results of the same export and settings are left as they are.
"""

from absl import flags
from ml_collections import config_flags

from xcoder_jax import launch_util, steering

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    results = steering.run_steering(_CONFIG.value, _WORKDIR.value)
    print(steering.summarize_steering(results))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
