"""Causal tests of crosscoder latents in the HF models: steering and ablation at block L.

`run_steering(config, workdir)` writes <workdir>/steering/ and `run_ablation(config, workdir)`
writes <workdir>/ablation/; both return their results.json and skip work already done.
"""

from xcoder_jax.steering.ablation import run_ablation, summarize_ablation, targeted_latents
from xcoder_jax.steering.common import select_latents
from xcoder_jax.steering.hooks import (
    ExportedCrosscoder,
    ablate,
    add_at_site,
    site_inputs,
    steer,
    subtract_at_site,
)
from xcoder_jax.steering.stats import aggregate, text_metrics
from xcoder_jax.steering.sweep import read_prompts, run_steering, summarize_steering

__all__ = [
    "ExportedCrosscoder",
    "ablate",
    "add_at_site",
    "aggregate",
    "read_prompts",
    "run_ablation",
    "run_steering",
    "select_latents",
    "site_inputs",
    "steer",
    "subtract_at_site",
    "summarize_ablation",
    "summarize_steering",
    "targeted_latents",
    "text_metrics",
]
