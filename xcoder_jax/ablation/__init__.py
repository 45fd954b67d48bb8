"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

`run_ablation(config, workdir)` writes <workdir>/ablation/ and returns its results.json,
skipping work already done (see `experiment` for the design, `controls` for the random sets
it is compared with, `probe` for how marker logits are read, `report` for the figure and the
one-line summary).
"""

from xcoder_jax.ablation.experiment import AblationError, run_ablation, targeted_latents
from xcoder_jax.ablation.probe import LogitProbe, marker_positions
from xcoder_jax.ablation.report import summarize_ablation

__all__ = [
    "AblationError",
    "LogitProbe",
    "marker_positions",
    "run_ablation",
    "summarize_ablation",
    "targeted_latents",
]
