"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

`run_ablation(config, workdir)` writes <workdir>/ablation/ and returns its results.json,
skipping work already done. See `experiment` for the design, `sets` for the rules that choose
latents, `occurrences` for where markers are read, `measure` for each category's sets and
headline test, `effects` for what is measured, `controls` for the random sets and directions
it is compared with, `half_step` for the headline sets' half-step KL, `probe` for how
log-probabilities are read (the intervention of `xcoder_jax.intervention`, shared with
`steering.ablate`), `report` for the figure, the half-step table and the one-line summary.
"""

from xcoder_jax.ablation.experiment import AblationError, run_ablation
from xcoder_jax.ablation.probe import LogitProbe, marker_positions
from xcoder_jax.ablation.report import summarize_ablation
from xcoder_jax.ablation.sets import targeted_latents

__all__ = [
    "AblationError",
    "LogitProbe",
    "marker_positions",
    "run_ablation",
    "summarize_ablation",
    "targeted_latents",
]
