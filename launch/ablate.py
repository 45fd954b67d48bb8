r"""Ablates each reasoning category's latents at block L and measures the marker logits.

    python launch/ablate.py --config=configs/tiny.py --workdir=runs/tiny

Writes <workdir>/ablation/results.json and ablation.png;
results of the same export and settings are left as they are.
"""

from absl import flags
from ml_collections import config_flags

from xcoder_jax import ablation, launch_util

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    results = ablation.run_ablation(_CONFIG.value, _WORKDIR.value)
    print(ablation.summarize_ablation(results))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
