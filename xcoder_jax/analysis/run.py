"""The analysis stage: `run_analysis(config, workdir)` reads the export and the store, writes
analysis/summary.json, analysis/latents.jsonl, analysis/report.html (its figures also as
PNG files) and analysis/browser.html.

Order: check that export and store belong together; relative decoder norms (from the
decoder alone); one streaming pass over the store (`stream.scan_store`); reasoning
categories; latent scaling; per-latent lines with examples (these in `summary.analyze`);
splice-in CE in the HF models; the report; summary.json last. A workdir whose summary.json
records the same export, store and analysis settings is left as it is.
"""

from __future__ import annotations

import json
import os
import time

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import stage
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations import models as pair
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.analysis import browser, report, splice
from xcoder_jax.analysis.summary import LATENTS, analyze
from xcoder_jax.exported import ExportedCrosscoder

# Bump when the outputs change meaning, to redo old analyses. 2: latent scaling on both sides
# with error and reconstruction ratios, category NRN against alive latents, strict JSON.
# 3: the feature browser (browser.html). 4: dead latents are their own class, labels name what
# a latent's firing tokens are (`labels`), the figures also as PNG files.
ANALYSIS_FORMAT = 4
SUMMARY, REPORT = "summary.json", "report.html"


# --- Inputs ------------------------------------------------------------------------------


def load_inputs(config, workdir: str) -> tuple[ActivationStore, dict, dict]:
    """(store, export tensors [raw, numpy], export config) of `workdir`, checked to belong
    together: what every stage that reads both the store and the export starts from."""
    store = ActivationStore(wd.activations_dir(workdir), verify=config.train.verify_store)
    tensors, export_config = ckpt.load_export(wd.export_dir(workdir), "numpy")
    check_pair(store, export_config)
    return store, tensors, export_config


def check_pair(store: ActivationStore, export_config: dict) -> None:
    """Raises ExportError unless the export was trained on a store like this one."""
    man = store.manifest
    problems = []
    for key, have in (("layer", store.layer), ("d_model", store.d_model)):
        if export_config.get(key) != have:
            problems.append(f"{key}: export {export_config.get(key)}, store {have}")
    if export_config.get("n_models", store.n_models) != store.n_models:
        problems.append(f"n_models: export {export_config['n_models']}, store {store.n_models}")
    if export_config.get("tokenizer_sha256") != man.get("tokenizer_sha256"):
        problems.append("tokenizer: export and store were made with different tokenizers")
    ident = lambda ms: [(m.get("role"), m.get("source"), m.get("weights")) for m in ms or []]
    if ident(export_config.get("models")) != ident(man.get("models")):
        problems.append(
            f"models: export {ident(export_config.get('models'))}, store {ident(man.get('models'))}"
        )
    if problems:
        raise ckpt.ExportError(
            "the export and the activation store come from different models or sites: "
            + "; ".join(problems)
        )


def fingerprint(config, workdir: str, store: ActivationStore) -> dict:
    """What the analysis depends on: the export files, the store, the analysis settings."""
    return {
        "format": ANALYSIS_FORMAT,
        "export": stage.export_hash(workdir),
        "store": {"n_rows": store.n_rows, "fingerprint": store.manifest.get("fingerprint")},
        "analysis": config.analysis.to_dict(),
        "eval_shards": int(config.train.eval_shards),
        "data": stage.digest(config.data.to_dict()),
    }


# --- The stage ---------------------------------------------------------------------------


def run_analysis(config, workdir: str, progress: bool = True) -> dict:
    """Analyses `workdir`'s export over its store; returns the summary (README: analysis/)."""
    ac = config.analysis
    out_dir = wd.stage_dir(workdir, "analysis")
    store, tensors, export_config = load_inputs(config, workdir)
    fp = fingerprint(config, workdir, store)
    files = [LATENTS, REPORT, browser.BROWSER, *report.FIGURE_FILES.values()]
    done = stage.done(out_dir, SUMMARY, fp, files)
    if done is not None:
        return done
    start = time.time()
    path, rev = pair.model_source(config, workdir, "base")
    tokenizer = pair.load_tokenizer(path, rev)
    if pair.tokenizer_fingerprint(tokenizer) != store.manifest.get("tokenizer_sha256"):
        raise pair.PairError(f"the tokenizer of {path} is not the one the store was made with")
    _, heldout = store.split(config.train.eval_shards)
    hist = browser.ActivationHistogram(int(export_config["n_latents"]))
    summary, kept = analyze(
        store, tensors, export_config, ac, heldout, tokenizer, out_dir, progress, hist
    )

    # The pair serves splice-in and the browser's promoted tokens (loaded only for them).
    device = pair.torch_device(config.models.device)
    roles = ckpt.role_order({"models": store.manifest.get("models")})
    models = []
    for role in roles if ac.splice_docs > 0 or ac.browser_promoted > 0 else ():
        path, rev = pair.model_source(config, workdir, role)  # in the crosscoder's order
        models.append(pair.load_model(path, rev, config.models.torch_dtype, device))
    if ac.splice_docs > 0:
        summary["splice"] = _splice(config, workdir, store, tensors, heldout, tokenizer, models)
    else:
        summary["splice"] = {"skipped": "analysis.splice_docs is 0"}
    with open(os.path.join(out_dir, LATENTS)) as f:
        lines = [json.loads(line) for line in f]
    data = browser.browser_data(
        lines, store, ExportedCrosscoder(tensors), models, tokenizer, hist, ac, roles
    )
    summary["fingerprint"] = fp
    summary["seconds"] = round(time.time() - start, 1)
    figures = report.draw_figures(summary, wd.metrics_path(workdir))
    draw = lambda p: report.write_report(p, summary, kept, figures, workdir)
    outputs = {
        REPORT: draw,
        browser.BROWSER: lambda p: browser.write_browser(p, data),
        **report.figure_writers(figures),
    }
    return stage.commit(out_dir, SUMMARY, summary, outputs)


def _splice(config, workdir, store, tensors, heldout, tokenizer, models) -> dict:
    ac = config.analysis
    stored, n_cut = splice.heldout_documents(store, heldout, ac.splice_docs)
    if not stored:
        return {"skipped": "the held-out shards hold no document"}
    exclusion = Exclusion.from_manifest(store.manifest)
    docs = splice.rebuild_documents(config.data, workdir, tokenizer, stored, exclusion)
    roles = ckpt.role_order({"models": store.manifest.get("models")})
    device = next(models[0].parameters()).device
    encoder = ExportedCrosscoder(tensors).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = splice.splice_ce(
        models, store.layer, docs, encoder.reconstruct, ac.splice_batch, pad_id, roles, exclusion
    )
    for role in out.values():
        role["docs_partly_trained"] = n_cut
    return out


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
