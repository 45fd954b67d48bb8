"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

Selection and measurement use disjoint documents of the store:

- selection, on the TRAINING shards, by two rules (`sets`): *specificity* (firing before the
  category's markers against the same preceding token elsewhere, `xcoder_jax.specificity`)
  and *attribution* (gradient x activation of the markers' log-probability in the distilled
  model, `xcoder_jax.attribution`). The top `frac` of the latents that pass a rule with NRN >
  `ablation.min_nrn` is the targeted set S;
- measurement, on HELD-OUT documents wholly inside the held-out shards (re-tokenised from the
  sources): S is removed at block L in each model at every stored position (reconstruction
  error kept), and the log-probability of the marker's first token at the position before
  each occurrence is compared with the clean model's (`effects`).

Controls (`controls`): random latents at the targeted set's activity, read off a
dose-response curve of random sets (NRN pool), and norm-matched random directions. Each
effect is a mean over occurrences with a 95% bootstrap CI resampling documents and random
draws; targeted minus each control and the distilled - base difference get their own CIs.
Per category, the `headline` entry is the declared test: the specificity rule at
`ablation.headline_frac`, with its specificity matrix (the set's effect on every category's
markers and on the ordinary continuations, at the same positions). The headline sets'
half-step KL (`half_step`: the share of KL(distilled || base continued in the distilled model)
a set's share of the reconstruction difference closes, against random sets of its size matched on
activity) is read on the first `ablation.kl_docs` measured documents.

Writes ablation/results.json and ablation/ablation.png.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from xcoder_jax import documents, params, selection, stage
from xcoder_jax import workdir as wd
from xcoder_jax.ablation import controls, half_step, measure, occurrences
from xcoder_jax.ablation.effects import Measurer
from xcoder_jax.ablation.measure import HEADLINE_RULE
from xcoder_jax.ablation.probe import LogitProbe
from xcoder_jax.ablation.report import plot_ablation
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.activations.models import load_pair
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.marker_tokens import marker_groups
from xcoder_jax.stage_inputs import load_inputs

ABLATION_FORMAT = 7  # bump when results change meaning, to redo old runs
RESULTS, FIGURE = "results.json", "ablation.png"


def _id_ranges(ids) -> list[list[int]]:
    """Sorted ids as inclusive [first, last] runs (compact for 100k documents)."""
    ids = np.unique(np.asarray(ids, np.int64))
    if not len(ids):
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    return [[int(r[0]), int(r[-1])] for r in np.split(ids, cut)]


# Every config field the ablation reads (selection and measurement included).
FIELDS = params.Declared(
    "ablate",
    what=(
        *params.MODELS, *params.DATA, *params.SELECTION, "train.eval_shards",
        "analysis.norm", "analysis.distilled_only_min", "analysis.bare_markers",
        "ablation.categories", "ablation.rules", "ablation.fracs", "ablation.headline_frac",
        "ablation.min_nrn", "ablation.dose_levels", "ablation.n_random", "ablation.n_docs",
        "ablation.seed", "ablation.kl_docs", "analysis.kl_random_draws",
    ),
    how=(*params.HOW, "ablation.batch_size"),
)  # fmt: skip


def _fingerprint(p: params.StageParams, workdir: str, store) -> dict:
    store_fp = store.manifest.get("fingerprint")
    return stage.fingerprint(ABLATION_FORMAT, p, export=stage.export_hash(workdir), store=store_fp)


def fingerprint(config, workdir: str) -> dict:
    """The fingerprint `run_ablation` compares with `stage.done` for this config and workdir."""
    store = ActivationStore(wd.activations_dir(workdir), False)
    return _fingerprint(FIELDS.read(config), workdir, store)


class AblationError(XcoderError, ValueError):
    """The ablation cannot be measured on held-out documents of this store."""


def measurement_documents(store, config, heldout: list[int]):
    """{doc id: (first stored position, tokens)} of held-out documents never trained on."""
    if not heldout:
        raise AblationError(
            "the store has no held-out shards (train.eval_shards = 0): the ablation measures on "
            "documents its latents were not selected on; set train.eval_shards >= 1"
        )
    stored, n_cut = documents.shard_documents(store, heldout, config.ablation.n_docs)
    if n_cut:
        raise AblationError(
            f"the held-out shards {heldout} hold no whole document (each begins in a training "
            "shard); hold out more shards (train.eval_shards) or extract with larger shards"
        )
    return stored


def _check_config(ac) -> None:
    if ac.n_random < 2:
        raise ConfigError(f"ablation.n_random must be >= 2 for a CI, got {ac.n_random}")
    if not ac.dose_levels or min(ac.dose_levels) <= 0:
        raise ConfigError(f"ablation.dose_levels must be positive multiples, got {ac.dose_levels}")
    if ac.headline_frac not in tuple(ac.fracs):
        raise ConfigError(f"ablation.headline_frac {ac.headline_frac} is not in ablation.fracs")
    bad = [r for r in ac.rules if r not in selection.RULES]
    if bad or HEADLINE_RULE not in ac.rules:
        raise ConfigError(
            f"ablation.rules must be among {selection.RULES} and include {HEADLINE_RULE!r}, "
            f"got {tuple(ac.rules)}"
        )


def run_ablation(config, workdir: str) -> dict:
    """The ablation experiment on `workdir`'s export; returns (and writes) ablation/results.json."""
    config = FIELDS.read(config)  # from here on, only the declared fields can be read
    ac = config.ablation
    out_dir = wd.stage_dir(workdir, "ablation")
    inputs = load_inputs(config, workdir)
    store, xcoder = inputs.store, inputs.xcoder
    fp = _fingerprint(config, workdir, store)
    old = stage.done(out_dir, RESULTS, fp, [FIGURE])
    if old is not None:
        return old
    _check_config(ac)
    start = time.time()
    stored = measurement_documents(store, config, inputs.heldout)
    doc_ids = sorted(stored)
    selection_docs = _selection_documents(store, inputs.train, doc_ids)
    dec_norms = np.linalg.norm(xcoder.W_dec.numpy().astype(np.float64), axis=-1)  # [h, m] raw
    models, tokenizer = load_pair(config, workdir, xcoder.roles)
    xcoder.to(next(models[0].parameters()).device)
    cats = list(ac.categories)
    forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
    rules = selection.score_rules(
        ac.rules, config, workdir, store=store, train=inputs.train, xcoder=xcoder, models=models,
        roles=xcoder.roles, tokenizer=tokenizer, forms=forms, categories=cats,
    )  # fmt: skip
    exclusion = Exclusion.from_manifest(store.manifest)
    docs = documents.rebuild_documents(config.data, workdir, tokenizer, stored, exclusion=exclusion)
    docs = [d[: config.data.max_tokens] for d in docs]
    occ = occurrences.locate(docs, doc_ids, forms=forms, categories=cats, exclusion=exclusion)
    meas = None  # with no occurrence at all, every category says so
    if occ.where:
        probe = LogitProbe(
            models, xcoder, [docs[d] for d in occ.probe_docs], batch_size=ac.batch_size,
            pad_id=documents.pad_token_id(tokenizer), exclusion=exclusion,
        )  # fmt: skip
        meas = Measurer(
            probe, len(models), occ.where, marker_ids=occ.marker_ids, cat_cols=occ.columns
        )
    study = measure.Study(
        meas=meas, occ=occ, rules=rules, nrn=xcoder.nrn(config.analysis.norm),
        dec_norms=dec_norms, labels=selection.read_labels(workdir), roles=xcoder.roles,
        categories=cats, ac=ac, distilled_min=config.analysis.distilled_only_min,
    )  # fmt: skip
    results = _header(
        config, fp, inputs, selection_docs=selection_docs, measured=doc_ids,
        with_markers=len(occ.probe_docs), roles=xcoder.roles,
    )  # fmt: skip
    bar = tqdm(total=len(cats) * len(ac.rules) * len(ac.fracs), desc="ablation", unit="set")
    for c, cat in enumerate(cats):
        results["categories"][cat] = measure.category_entry(study, c, bar.update)
    bar.close()
    results["half_step_kl"] = half_step.half_step_entry(
        config, models, xcoder, docs, doc_ids, results["categories"],
        pad_id=documents.pad_token_id(tokenizer), exclusion=exclusion,
    )  # fmt: skip
    results["seconds"] = round(time.time() - start, 1)
    return stage.commit(out_dir, RESULTS, results, {FIGURE: lambda p: plot_ablation(results, p)})


def _selection_documents(store, train: list[int], measured: list[int]) -> np.ndarray:
    """Ids of the documents of the training shards (latents are selected on them); raises
    AblationError when one of them is also `measured`."""
    selection_docs = np.unique(np.concatenate([store.shard_index(k)[:, 0] for k in train]))
    overlap = np.intersect1d(selection_docs, measured)
    if len(overlap):  # a document cut by the train/held-out border; never measured on
        raise AblationError(f"documents {overlap[:5].tolist()} are both selected and measured on")
    return selection_docs


def _header(config, fp: dict, inputs, *, selection_docs, measured, with_markers, roles) -> dict:
    """results.json without its categories: the design, what was selected on and measured on."""
    ac = config.ablation
    return {
        "fingerprint": fp,
        "roles": roles,
        "fracs": [float(f) for f in ac.fracs],
        "headline": {"rule": HEADLINE_RULE, "frac": float(ac.headline_frac)},
        "n_random": ac.n_random,
        "dose_levels": [float(v) for v in ac.dose_levels],
        "selection": {
            "shards": inputs.train,
            "documents": _id_ranges(selection_docs),
            "rules": {
                "specificity": "token-matched firing difference before the markers, 95% lower "
                "bound > 0",
                "attribution": "gradient x activation of the markers' log-probability "
                "(distilled model), 95% lower bound > 0",
            },
        },
        "measurement": {
            "shards": inputs.heldout,
            "documents": measured,
            "documents_with_markers": with_markers,
        },
        "measure": "mean change of the log-probability of the marker's first token at the "
        "position before each occurrence (ablated - clean), over held-out occurrences; "
        "'margin': the same for log p(marker) - log p(best non-marker token)",
        "controls": {"random_at_matched": controls.DOSE, "random_direction": controls.DIRECTION},
        "ci": "95% bootstrap percentile CI resampling documents (and random draws)",
        "categories": {},
    }
