"""Build the embedded model zoo (corpus, tokenizer, base/distilled pairs) and print its report.

python launch/build_zoo.py --config=configs/tiny.py --workdir=runs/tiny
"""

import json
import os

# Idle OpenMP threads sleep instead of spinning: when another process holds a core of a small
# machine, spinning threads make each training step several times slower. Read once, when
# torch loads, so it is set before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from xcoder_jax import launch_util  # noqa: E402
from xcoder_jax.zoo import build_zoo, summarize_zoo  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory the zoo is written into.", required=True)


def main(argv):
    del argv
    report = build_zoo(_CONFIG.value, _WORKDIR.value)
    print(f"zoo in {_WORKDIR.value}/models (built in {report['total_seconds']} s)")
    for line in summarize_zoo(report):
        print(f"  {line}")
    print(json.dumps({k: v for k, v in report.items() if k != "sizes"}, indent=1))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    launch_util.run_main(main)
