"""Geometry of word-pair relations in a base model and its distilled variant.

A relation (singular -> plural, present -> past, ...) is a set of word pairs (a_i, b_i). Each
word is represented by the input of block L at its token (raw units, read through
`site.forward_to_site`), in each model separately. Per model and relation a PCA, fitted
centred on all 2n word vectors (inputs and outputs together), projects them to k dimensions,
and for every two pairs i < j the "parallelogram" loss is

    loss_ij = ||a_i - b_i - a_j + b_j|| / sqrt(||a_i||^2 + ||b_i||^2 + ||a_j||^2 + ||b_j||^2)

on the PCA coordinates: 0 when the relation is one shared offset, and unchanged by a global
rescaling. A lower mean loss is a more structured relation. The control scores the same words
paired at random (shuffled b's): a relation the model encodes should score below it. The
control moves between the models too, so the test of "the distilled model is more
structured" is the difference of differences, the structure gain
(true - shuffled)_distilled - (true - shuffled)_base (below 0: more structured). Where the
zoo built a sham model (the base fine-tuned for as many steps as the distillation, on replay
text and concise solutions but no reasoning traces), the sham gain
(true - shuffled)_distilled - (true - shuffled)_sham separates what the traces taught from
further training. Every comparison (base - distilled, true - shuffled, the gains) comes with
a 95% bootstrap interval over word pairs, per relation and pooled over relations, and counts
only where it excludes 0; the pooled ones are fitted against log10(parameters) over the
sizes, the slopes with intervals from the same resamples.

    run_geometry(config, workdir)  # geometry/results.json, cdf.png, loss_vs_size.png

Modules: `relations` (pair sets, single-token filtering, block-L word vectors), `metric`
(PCA, loss, control), `bootstrap` (intervals over word pairs), `trend` (slope over sizes),
`study` (every model pair, results, skip-when-complete), `plots`.
"""

from xcoder_jax.geometry.bootstrap import (
    intervals,
    pair_counts,
    pooled,
    pooled_intervals,
    pooled_replicates,
    relation_replicates,
    resampled_means,
)
from xcoder_jax.geometry.metric import (
    derangements,
    loss_scores,
    parallelogram_losses,
    pca_coordinates,
    relation_losses,
    relation_scores,
)
from xcoder_jax.geometry.relations import (
    Relation,
    RelationError,
    filter_relation,
    load_pair_file,
    relation_sets,
    word_prompt,
    word_vectors,
)
from xcoder_jax.geometry.study import model_pairs, run_geometry, study_pair
from xcoder_jax.geometry.summary import summarize, verdicts
from xcoder_jax.geometry.trend import ordered_pairs, size_trend, slope_ci, slopes, trend_pairs

__all__ = [
    "Relation",
    "RelationError",
    "derangements",
    "filter_relation",
    "intervals",
    "load_pair_file",
    "loss_scores",
    "model_pairs",
    "ordered_pairs",
    "pair_counts",
    "parallelogram_losses",
    "pca_coordinates",
    "pooled",
    "pooled_intervals",
    "pooled_replicates",
    "relation_losses",
    "relation_replicates",
    "relation_scores",
    "relation_sets",
    "resampled_means",
    "run_geometry",
    "size_trend",
    "slope_ci",
    "slopes",
    "study_pair",
    "summarize",
    "trend_pairs",
    "verdicts",
    "word_prompt",
    "word_vectors",
]
