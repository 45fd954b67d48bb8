"""Steering crosscoder latents in the HF models: decoder rows added at block L.

`run_steering(config, workdir)` writes <workdir>/steering/ and returns its results.json,
skipping work already done. The hooks here (`steer`, `ablate`) are the public interventions;
`ablate` removes latents with the subtraction and at the positions the ablation experiment
uses (`xcoder_jax.intervention`: where the store would hold a row).
"""

from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.selection import select_latents
from xcoder_jax.steering.generation import read_prompts
from xcoder_jax.steering.hooks import (
    ablate,
    add_at_site,
    site_inputs,
    steer,
    subtract_at_site,
)
from xcoder_jax.steering.report import summarize_steering
from xcoder_jax.steering.stats import text_metrics
from xcoder_jax.steering.sweep import run_steering

__all__ = [
    "ExportedCrosscoder",
    "ablate",
    "add_at_site",
    "read_prompts",
    "run_steering",
    "select_latents",
    "site_inputs",
    "steer",
    "subtract_at_site",
    "summarize_steering",
    "text_metrics",
]
