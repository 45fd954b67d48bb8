"""What distillation changed: relative decoder norms, max-activating examples, reasoning
categories, splice-in CE, latent scaling, and the report.

    summary = run_analysis(config, workdir)   # writes <workdir>/analysis/
    print(summarize(summary))
"""

from xcoder_jax.analysis.categories import category_stats, firing_latents, marker_groups
from xcoder_jax.analysis.examples import RunningTopK, gather_windows, label
from xcoder_jax.analysis.norms import (
    CLASSES,
    classify,
    decoder_cosine,
    decoder_norms,
    relative_norms,
)
from xcoder_jax.analysis.run import check_pair, load_inputs, run_analysis, summarize
from xcoder_jax.analysis.scaling import LatentScaling, fit_betas
from xcoder_jax.analysis.splice import SpliceError, splice_ce
from xcoder_jax.analysis.stream import scan_store
from xcoder_jax.analysis.summary import analyze

__all__ = [
    "CLASSES",
    "LatentScaling",
    "RunningTopK",
    "SpliceError",
    "analyze",
    "category_stats",
    "check_pair",
    "load_inputs",
    "classify",
    "decoder_cosine",
    "decoder_norms",
    "firing_latents",
    "fit_betas",
    "gather_windows",
    "label",
    "marker_groups",
    "relative_norms",
    "run_analysis",
    "scan_store",
    "splice_ce",
    "summarize",
]
