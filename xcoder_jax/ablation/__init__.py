"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

`run_ablation(config, workdir)` writes <workdir>/ablation/ and returns its results.json,
skipping work already done (see `experiment` for the design, `controls` for the random sets
it is compared with).
"""

from xcoder_jax.ablation.experiment import (
    AblationError,
    LogitProbe,
    marker_positions,
    run_ablation,
    summarize_ablation,
    targeted_latents,
)

__all__ = [
    "AblationError",
    "LogitProbe",
    "marker_positions",
    "run_ablation",
    "summarize_ablation",
    "targeted_latents",
]
