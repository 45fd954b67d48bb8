"""The steering sweep: generate with latents' decoder rows added at block L, measure style.

For every steered model (`steering.models`, its own decoder rows), every latent set
(`steering.latents`, specs as in `xcoder_jax.selection`) and every alpha (`steering.alphas`;
its units are set by `steering.convention`, see `hooks.CONVENTIONS`), `samples`
continuations of each prompt are drawn (seeded, the same seeds in every condition, so
conditions differ by the intervention, not by the draws) and scored with `stats`. alpha = 0
is the clean model; it is always generated, once per model, and shared by every set.

The experiment is paired: every steered condition is compared with the clean model on the
same prompts and seeds, metric by metric, by the per-prompt difference of sample means with
a Student-t 95% CI over prompts (`vs_clean`); a metric counts as changed only where that
interval excludes 0 (`changed`).

Writes steering/results.json, steering/samples.jsonl and steering/steering.png.
"""

from __future__ import annotations

import json
import time

from xcoder_jax import selection, stage
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.models import load_pair, torch_device
from xcoder_jax.analysis import check_pair, marker_groups
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import CONVENTIONS, ExportedCrosscoder
from xcoder_jax.steering import stats
from xcoder_jax.steering.generation import check_lengths, prompt_path, read_prompts, sample
from xcoder_jax.steering.hooks import steer
from xcoder_jax.steering.report import plot_steering

STEERING_FORMAT = 4  # bump when results change meaning, to redo old runs
RESULTS, SAMPLES, FIGURE = "results.json", "samples.jsonl", "steering.png"


def _fingerprint(config, workdir: str, prompts_file: str, store) -> dict:
    return {
        "format": STEERING_FORMAT,
        "export": stage.export_hash(workdir),
        "steering": config.steering.to_dict(),
        "norm": config.analysis.norm,
        "bare_markers": config.analysis.bare_markers,
        "models": stage.digest(config.models.to_dict()),
        "prompts": stage.file_sha(prompts_file),
        "store": None if store is None else store.manifest.get("fingerprint"),
        "eval_shards": int(config.train.eval_shards),  # latents are chosen on the rest
    }


def choose_sets(config, xcoder: ExportedCrosscoder, tokenizer, store):
    """({spec: latent ids} of `steering.latents` (see `xcoder_jax.selection`), {spec: why it has no
    latents} for category specs with too few qualifying latents, NRN [h])."""
    sc = config.steering
    nrn = xcoder.nrn(config.analysis.norm)
    counts = None
    if any(":" in str(s) for s in sc.latents):
        forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
        cats = sorted({str(s).split(":")[0] for s in sc.latents if ":" in str(s)})
        unknown = [c for c in cats if c not in forms]
        if unknown:
            raise ConfigError(f"unknown categories {unknown} in steering.latents")
        # Selected on the training shards, like every latent choice of the study.
        train, _ = store.split(config.train.eval_shards)
        per_cat = selection.marker_counts(store, xcoder, forms, cats, sc.fire_offset, shards=train)
        counts = dict(zip(cats, per_cat, strict=True))
    sets, skipped = {}, {}
    for spec in map(str, sc.latents):
        try:
            sets[spec] = selection.select_latents(spec, nrn, counts, sc.min_nrn)
        except selection.TooFewLatents as e:  # a finding of this run, not a bad input
            skipped[spec] = str(e)
    return sets, skipped, nrn


def run_steering(config, workdir: str) -> dict:
    """The steering sweep of `workdir`'s export; returns (and writes) steering/results.json."""
    sc = config.steering
    if sc.convention not in CONVENTIONS:
        # Fail before models are loaded, not after the first condition.
        raise ConfigError(
            f"steering.convention must be one of {sorted(CONVENTIONS)}, got {sc.convention!r}"
        )
    out_dir = wd.stage_dir(workdir, "steering")
    prompts_file = prompt_path(config, workdir)
    needs_store = any(":" in str(s) for s in sc.latents)
    store = ActivationStore(wd.activations_dir(workdir), verify=False) if needs_store else None
    fp = _fingerprint(config, workdir, prompts_file, store)
    old = stage.done(out_dir, RESULTS, fp, [SAMPLES, FIGURE])
    if old is not None:
        return old
    start = time.time()
    xcoder = ExportedCrosscoder.load(wd.export_dir(workdir), torch_device(config.models.device))
    if store is not None:
        check_pair(store, xcoder.config)
    roles = xcoder.roles
    models, tokenizer = load_pair(config, workdir, roles)
    sets, skipped, nrn = choose_sets(config, xcoder, tokenizer, store)
    rows = read_prompts(prompts_file, sc.n_prompts)
    prompts = [r["prompt"] for r in rows]
    with_accuracy = all(r["answer"] is not None for r in rows)
    for role in sc.models:
        xcoder.check_model(models[roles.index(role)])
        check_lengths(tokenizer, models[roles.index(role)], prompts, sc.max_new_tokens)

    conditions, lines = [], []

    def run(role: str, spec: str, alpha: float) -> dict[str, dict[int, float]]:
        """Generates one condition; {metric: {prompt id: mean over its samples}}."""
        m = roles.index(role)
        with steer(models[m], xcoder, sets.get(spec, []), alpha, m, sc.convention):
            outs = sample(models[m], tokenizer, prompts, sc)
        samples = []
        for i, s, text, n in outs:
            answer = rows[i]["answer"] if with_accuracy else None
            metrics = stats.text_metrics(text, n, answer)
            samples.append({"prompt_id": i, "metrics": metrics})
            lines.append(
                {"model": role, "set": spec, "alpha": alpha, "prompt_id": i, "sample": s}
                | {"text": text, "metrics": metrics}
            )
        return stats.per_prompt(samples)

    # alpha = 0 is always run: it is the baseline every steered condition is paired with.
    alphas = sorted({0.0, *(float(a) for a in sc.alphas)})
    for role in sc.models:
        clean = run(role, "clean", 0.0)
        for spec, ids in sets.items():
            for alpha in alphas:
                means = clean if alpha == 0 else run(role, spec, alpha)
                conditions.append(
                    {"model": role, "set": spec, "latents": ids, "alpha": alpha}
                    | {"nrn": [round(float(nrn[i]), 4) for i in ids]}
                    | stats.condition(means, clean, alpha)
                )
    units, formula = CONVENTIONS[sc.convention]
    results = {
        "fingerprint": fp,
        "prompts": prompts_file,
        "n_prompts": len(prompts),
        "samples_per_prompt": sc.samples,
        "temperature": sc.temperature,
        "convention": sc.convention,
        "alpha_units": units,
        "steering_vector": f"{sc.convention}: {formula}, added to the input of block "
        f"{xcoder.layer} at every position of the steered model m (its own rows)",
        "mean_norms": dict(zip(roles, xcoder.mean_norms, strict=True)),
        "ci": stats.CI_METHOD,
        "metrics": stats.metric_names(with_accuracy),
        "sets": sets,
        "skipped_sets": skipped,
        "conditions": conditions,
        "seconds": round(time.time() - start, 1),
    }
    json.dumps(results, allow_nan=False)  # refuse NaN before the samples are written
    blob = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode()

    def write_samples(path: str) -> None:
        with open(path, "wb") as f:
            f.write(blob)

    outputs = {SAMPLES: write_samples, FIGURE: lambda p: plot_steering(results, p)}
    return stage.commit(out_dir, RESULTS, results, outputs)
