"""The analysis stage: `run_analysis(config, workdir)` reads the export and the store, writes
analysis/summary.json, analysis/latents.jsonl, analysis/report.html (its figures also as
PNG files) and analysis/browser.html.

Order: check that export and store belong together and take the held-out shards training
recorded (`stage_inputs.load_inputs`: the export is read once, as an `ExportedCrosscoder`);
relative decoder norms (from the decoder alone); one streaming pass over the store
(`stream.scan_store`); reasoning categories; latent scaling; per-latent lines with examples
(these in `summary.analyze`, the facts per latent in `facts`); splice-in CE in the HF models;
the browser and the report. Every file is put in place by one `stage.commit`, summary.json
last. A workdir whose summary.json records the same export, store and analysis settings is
left as it is.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time

import numpy as np

from xcoder_jax import documents, params, stage
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations import models as pair
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.analysis import browser, kl, report, splice
from xcoder_jax.analysis.histogram import ActivationHistogram
from xcoder_jax.analysis.norms import CLASSES
from xcoder_jax.analysis.summary import LATENTS, analyze
from xcoder_jax.stage_inputs import StageInputs, load_inputs

# Bump when the outputs change meaning, to redo old analyses. 2: latent scaling on both sides
# with error and reconstruction ratios, category NRN against alive latents, strict JSON.
# 3: the feature browser (browser.html). 4: dead latents are their own class, labels name what
# a latent's firing tokens are (`labels`), the figures also as PNG files. 5: behavioural KL
# (splice KL per model, half-step KL with the fraction closed: `kl`).
ANALYSIS_FORMAT = 6
SUMMARY, REPORT = "summary.json", "report.html"


# Every config field the analysis reads (splice-in and the browser's promoted tokens load
# the models).
FIELDS = params.Declared(
    "analyze",
    what=(
        *params.MODELS, *params.DATA, "train.eval_shards",
        "analysis.norm", "analysis.base_only_max", "analysis.distilled_only_min",
        "analysis.nrn_bins", "analysis.top_k_examples", "analysis.context_before",
        "analysis.context_after", "analysis.firing_share", "analysis.bare_markers",
        "analysis.label_min_share", "analysis.top_latents", "analysis.scaling_max_latents",
        "analysis.scaling_min_rows", "analysis.scaling_false_ratio", "analysis.splice_docs",
        "analysis.browser_latents", "analysis.browser_examples", "analysis.browser_promoted",
        "analysis.kl_docs", "analysis.kl_random_draws", "seed",
    ),
    how=("models.device", "train.verify_store", "analysis.batch_rows", "analysis.splice_batch"),
)  # fmt: skip


def fingerprint(config, workdir: str, store: ActivationStore) -> dict:
    """What the analysis depends on: its declared fields, the export files, the store."""
    return stage.fingerprint(
        ANALYSIS_FORMAT,
        FIELDS.read(config),
        export=stage.export_hash(workdir),
        store={"n_rows": store.n_rows, "fingerprint": store.manifest.get("fingerprint")},
    )


# --- The stage ---------------------------------------------------------------------------


def run_analysis(config, workdir: str, progress: bool = True) -> dict:
    """Analyses `workdir`'s export over its store; returns the summary (README: analysis/)."""
    config = FIELDS.read(config)  # from here on, only the declared fields can be read
    ac = config.analysis
    out_dir = wd.stage_dir(workdir, "analysis")
    inputs = load_inputs(config, workdir)
    store, xcoder = inputs.store, inputs.xcoder
    fp = fingerprint(config, workdir, store)
    files = [LATENTS, REPORT, browser.BROWSER, *report.FIGURE_FILES.values()]
    done = stage.done(out_dir, SUMMARY, fp, files)
    if done is not None:
        return done
    start = time.time()
    tokenizer = _tokenizer(config, workdir, store)
    hist = ActivationHistogram(xcoder.n_latents)
    digest = browser.LatentDigest(int(ac.browser_examples))
    os.makedirs(out_dir, exist_ok=True)
    with _spool(out_dir, LATENTS) as latents_path:
        result = analyze(
            store, xcoder, ac, heldout=inputs.heldout, tokenizer=tokenizer,
            latents_path=latents_path, on_line=digest.add, progress=progress, hist=hist,
        )  # fmt: skip
        summary = result.summary
        # The pair serves splice-in and the browser's promoted tokens (loaded only for them).
        models = []
        if ac.splice_docs > 0 or ac.kl_docs > 0 or ac.browser_promoted > 0:
            models = _load_models(config, workdir, xcoder.roles)
        # The distilled-only latents of the summary (NRN above analysis.distilled_only_min,
        # alive on held-out rows).
        distilled_only = np.flatnonzero(result.facts.classes == CLASSES.index("distilled_only"))
        summary["splice"], summary["half_step"] = _splice(
            config, workdir, inputs, tokenizer=tokenizer, models=models,
            distilled_only=distilled_only,
        )  # fmt: skip
        data = browser.browser_data(
            digest, store=store, encoder=xcoder, models=models, tokenizer=tokenizer, hist=hist,
            ac=ac,
        )  # fmt: skip
        summary["fingerprint"] = fp
        summary["seconds"] = round(time.time() - start, 1)
        figures = report.draw_figures(summary, wd.metrics_path(workdir))
        outputs = {
            LATENTS: lambda p: os.replace(latents_path, p),
            REPORT: lambda p: report.write_report(
                p, summary, result.kept, figures, workdir=workdir
            ),
            browser.BROWSER: lambda p: browser.write_browser(p, data),
            **report.figure_writers(figures),
        }
        return stage.commit(out_dir, SUMMARY, summary, outputs)


@contextlib.contextmanager
def _spool(directory: str, name: str):
    """A temporary file in `directory` that an output is rendered into before `stage.commit`
    puts it in place as `name`; removed if it is still there on exit."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)


def _tokenizer(config, workdir: str, store: ActivationStore):
    """The base model's tokenizer, checked to be the one the store was made with."""
    path, rev = pair.model_source(config, workdir, "base")
    tokenizer = pair.load_tokenizer(path, rev)
    if pair.tokenizer_fingerprint(tokenizer) != store.manifest.get("tokenizer_sha256"):
        raise pair.PairError(f"the tokenizer of {path} is not the one the store was made with")
    return tokenizer


def _load_models(config, workdir: str, roles: list[str]) -> list:
    """The HF pair in the crosscoder's slot order."""
    device = pair.torch_device(config.models.device)
    models = []
    for role in roles:
        path, rev = pair.model_source(config, workdir, role)
        models.append(pair.load_model(path, rev, config.models.torch_dtype, device))
    return models


def _splice(
    config, workdir: str, inputs: StageInputs, *, tokenizer, models, distilled_only
) -> tuple[dict, dict]:
    """summary["splice"] (splice-in CE, with the splice KL on the first analysis.kl_docs of
    its documents) and summary["half_step"] (half-step KL of the `distilled_only` latents and
    its controls), on the first held-out documents (`splice`, `kl`)."""
    ac, store = config.analysis, inputs.store
    skipped = {"skipped": "analysis.splice_docs is 0"}, {"skipped": "analysis.kl_docs is 0"}
    n_docs = max(ac.splice_docs, ac.kl_docs)
    if n_docs <= 0:
        return skipped
    stored, n_cut = documents.shard_documents(store, inputs.heldout, n_docs)
    if not stored:
        none = {"skipped": "the held-out shards hold no document"}
        return tuple(none if n > 0 else sk for n, sk in zip((ac.splice_docs, ac.kl_docs), skipped))
    exclusion = Exclusion.from_manifest(store.manifest)
    docs = documents.rebuild_documents(config.data, workdir, tokenizer, stored, exclusion=exclusion)
    # A copy on the models' device: the rest of the analysis reads the export on the CPU.
    encoder = copy.copy(inputs.xcoder).to(next(models[0].parameters()).device)
    kw = dict(batch_size=ac.splice_batch, pad_id=documents.pad_token_id(tokenizer),
              roles=inputs.xcoder.roles, exclusion=exclusion)  # fmt: skip
    out, half = skipped
    if ac.splice_docs > 0:
        out = splice.splice_ce(models, store.layer, docs[: ac.splice_docs], encoder.reconstruct,
                               kl_docs=ac.kl_docs, seed=config.seed, **kw)  # fmt: skip
        for role in out.values():
            role["docs_partly_trained"] = n_cut
    if ac.kl_docs > 0:
        half = kl.half_step_kl(models, store.layer, docs[: ac.kl_docs], encoder,
                               latents=distilled_only,
                               n_draws=ac.kl_random_draws, seed=config.seed, **kw)  # fmt: skip
        half["docs_partly_trained"] = n_cut
    return out, half


def summarize(summary: dict) -> str:
    """One line for the pipeline's final screen."""
    parts = [
        f"NRN mean {summary['mean_nrn']:.3f}: {summary['n_base_only']} base-only / "
        f"{summary['n_shared']} shared / {summary['n_distilled_only']} distilled-only / "
        f"{summary.get('n_dead', 0)} dead"
    ]
    sr = summary.get("categories", {}).get("self_reflection", {})
    if sr.get("mean_nrn") is not None:
        alive = summary.get("mean_nrn_alive")
        vs = f" (alive latents {alive:.3f})" if alive is not None else ""
        parts.append(f"self-reflection latents NRN {sr['mean_nrn']:.3f}{vs}")
    sp = summary.get("splice", {})
    rec = [sp[r]["fraction_recovered"] for r in ("base", "distilled") if r in sp]
    if rec and all(r is not None for r in rec):
        parts.append("splice-in CE recovered " + " / ".join(f"{r:.0%}" for r in rec))
    return "; ".join(parts)
