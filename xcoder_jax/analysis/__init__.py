"""What distillation changed: relative decoder norms, max-activating examples, reasoning
categories, splice-in CE, latent scaling, and the report.

    summary = run_analysis(config, workdir)   # writes <workdir>/analysis/
    print(summarize(summary))
"""

from xcoder_jax.analysis.categories import category_stats, firing_latents
from xcoder_jax.analysis.examples import RunningTopK, gather_windows, label
from xcoder_jax.analysis.facts import DecoderFacts, LatentFacts
from xcoder_jax.analysis.histogram import ActivationHistogram
from xcoder_jax.analysis.norms import (
    CLASSES,
    classify,
    decoder_cosine,
    decoder_norms,
    relative_norms,
)
from xcoder_jax.analysis.run import run_analysis, summarize
from xcoder_jax.analysis.scaling import LatentScaling, fit_betas
from xcoder_jax.analysis.splice import SpliceError, splice_ce
from xcoder_jax.analysis.stream import scan_store
from xcoder_jax.analysis.summary import Analysis, analyze

__all__ = [
    "CLASSES",
    "ActivationHistogram",
    "Analysis",
    "DecoderFacts",
    "LatentFacts",
    "LatentScaling",
    "RunningTopK",
    "SpliceError",
    "analyze",
    "category_stats",
    "classify",
    "decoder_cosine",
    "decoder_norms",
    "firing_latents",
    "fit_betas",
    "gather_windows",
    "label",
    "relative_norms",
    "run_analysis",
    "scan_store",
    "splice_ce",
    "summarize",
]
