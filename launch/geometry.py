"""Parallelogram geometry of word-pair relations, base vs distilled, over every model pair.

    python launch/geometry.py --config=configs/tiny.py --workdir=runs/tiny

Needs the models (the zoo: launch/build_zoo.py first). Writes <workdir>/geometry/results.json,
cdf.png and loss_vs_size.png; a complete result for the same config is reused.
"""

from absl import flags
from ml_collections import config_flags

from xcoder_jax import launch_util
from xcoder_jax.geometry import run_geometry, summarize

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    results = run_geometry(_CONFIG.value, _WORKDIR.value)
    k = str(results["plot_n_components"])
    for name, pair in results["pairs"].items():
        for rel, r in pair["relations"].items():
            b, d = r["models"]["base"][k], r["models"]["distilled"][k]
            print(
                f"  {name:6s} {rel:12s} kept {r['kept']:3d}/{r['total']:<3d} mean loss base "
                f"{b['mean']:.3f} (control {b['control_mean']:.3f})  distilled {d['mean']:.3f} "
                f"(control {d['control_mean']:.3f})"
            )
    print(summarize(results))


if __name__ == "__main__":
    launch_util.run_main(main)
