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
interval excludes 0 (`changed`). At every alpha != 0 each set also has two random controls
(`controls`: a random direction of the same norm, a matched random latent; `n_control_draws`
each) on the same prompts and seeds, and is paired with them (`vs_random_direction`,
`vs_random_latent`). `headline` holds each set's comparison at its largest positive alpha.

Generation length: the clean model is sampled first with `max_new_tokens`; the cap of every
condition is then max(max_new_tokens, ceil(cap_factor x its mean tokens)), and when that is
larger the clean condition is sampled again with it (unless none of its samples hit
max_new_tokens: the same seeds then draw the same samples), so all conditions share one cap.
Each sample records whether it hit the cap (`truncated`).

Writes steering/results.json, steering/samples.jsonl and steering/steering.png.
"""

from __future__ import annotations

import json
import time

import numpy as np
from tqdm import tqdm

from xcoder_jax import params, selection, stage
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.models import load_pair, torch_device
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import CONVENTIONS, ExportedCrosscoder
from xcoder_jax.marker_tokens import marker_groups
from xcoder_jax.stage_inputs import check_pair, split_shards
from xcoder_jax.steering import conditions as cond
from xcoder_jax.steering import controls as ctl
from xcoder_jax.steering import stats
from xcoder_jax.steering.generation import check_lengths, prompt_path, read_prompts
from xcoder_jax.steering.report import plot_steering

STEERING_FORMAT = 5  # bump when results change meaning, to redo old runs
RESULTS, SAMPLES, FIGURE = "results.json", "samples.jsonl", "steering.png"


# Every config field steering reads (latent selection included).
FIELDS = params.Declared(
    "steer",
    what=(
        *params.MODELS, *params.DATA, *params.SELECTION, "train.eval_shards",
        "analysis.norm", "analysis.distilled_only_min", "analysis.bare_markers",
        "steering.latents", "steering.min_nrn", "steering.models", "steering.convention",
        "steering.alphas", "steering.prompts", "steering.n_prompts", "steering.samples",
        "steering.temperature", "steering.max_new_tokens", "steering.cap_factor",
        "steering.n_control_draws", "steering.match_pool", "steering.stop", "steering.seed",
    ),
    how=(*params.HOW, "steering.batch_size"),
)  # fmt: skip


def _fingerprint(p, workdir: str, *, prompts_file: str, store, freq_fp: dict) -> dict:
    return stage.fingerprint(
        STEERING_FORMAT,
        p,
        export=stage.export_hash(workdir),
        prompts=stage.file_sha(prompts_file),
        store=None if store is None else store.manifest.get("fingerprint"),
        firing_freq=freq_fp,  # the random-latent control's matching, by content
    )


def _inputs(config, workdir: str, load_xcoder):
    """(store or None, firing frequencies [h], fingerprint) of a steering run; the store is
    opened when category specs need it (the frequencies may need it too)."""
    needs_store = any(":" in str(s) for s in config.steering.latents)
    store = ActivationStore(wd.activations_dir(workdir), verify=False) if needs_store else None
    open_store = lambda: store or ActivationStore(wd.activations_dir(workdir), verify=False)
    freq, freq_fp = ctl.firing_frequencies(workdir, load_xcoder, open_store)
    prompts_file = prompt_path(config, workdir)
    fp = _fingerprint(config, workdir, prompts_file=prompts_file, store=store, freq_fp=freq_fp)
    return store, freq, fp


def _xcoder_loader(config, workdir: str):
    """A function loading the export once, on first call."""
    loaded = []

    def load() -> ExportedCrosscoder:
        if not loaded:
            device = torch_device(config.models.device)
            loaded.append(ExportedCrosscoder.load(wd.export_dir(workdir), device))
        return loaded[0]

    return load


def fingerprint(config, workdir: str) -> dict:
    """The fingerprint `run_steering` compares with `stage.done` for this config and workdir."""
    p = FIELDS.read(config)
    return _inputs(p, workdir, _xcoder_loader(p, workdir))[2]


def choose_sets(config, xcoder: ExportedCrosscoder, *, models, tokenizer, store, workdir):
    """({spec: latent ids} of `steering.latents` (see `xcoder_jax.selection`), {spec: why it has no
    latents} for category specs with too few qualifying latents, NRN [h], {spec: what the set
    is (`selection.describe`)})."""
    sc = config.steering
    nrn = xcoder.nrn(config.analysis.norm)
    counts = None
    parsed = [p for p in map(selection.parse_spec, sc.latents) if p is not None]
    if parsed:
        forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
        cats = sorted({cat for cat, _, _ in parsed})
        rules = sorted({rule for _, _, rule in parsed})
        # Selected on the training shards, like every latent choice of the study.
        train, _ = split_shards(config, store, xcoder.config)
        scores = selection.score_rules(
            rules, config, workdir, store=store, train=train, xcoder=xcoder, models=models,
            roles=xcoder.roles, tokenizer=tokenizer, forms=forms, categories=cats,
        )  # fmt: skip
        counts = {
            (cat, rule): scores[rule].qualifying()[c]
            for rule in rules
            for c, cat in enumerate(cats)
        }
    sets, skipped, described = {}, {}, {}
    labels = selection.read_labels(workdir)
    for spec in map(str, sc.latents):
        try:
            sets[spec] = selection.select_latents(spec, nrn, counts, sc.min_nrn)
        except selection.TooFewLatents as e:  # a finding of this run, not a bad input
            skipped[spec] = str(e)
            continue
        parsed = selection.parse_spec(spec)
        score = np.zeros(len(nrn)) if parsed is None else counts[(parsed[0], parsed[2])]
        described[spec] = selection.describe(
            sets[spec], nrn, score, distilled_min=config.analysis.distilled_only_min,
            labels=labels,
        ) | {"rule": "ids" if parsed is None else parsed[2]}  # fmt: skip
    return sets, skipped, nrn, described


def _check_config(sc) -> None:
    """Refuses bad settings before any model is loaded."""
    if sc.convention not in CONVENTIONS:
        raise ConfigError(
            f"steering.convention must be one of {sorted(CONVENTIONS)}, got {sc.convention!r}"
        )
    if not float(sc.cap_factor) >= 1:
        raise ConfigError(f"steering.cap_factor must be >= 1, got {sc.cap_factor}")
    if int(sc.n_control_draws) < 1 or int(sc.match_pool) < 1:
        raise ConfigError("steering.n_control_draws and steering.match_pool must be >= 1")


def run_steering(config, workdir: str) -> dict:
    """The steering sweep of `workdir`'s export; returns (and writes) steering/results.json."""
    config = FIELDS.read(config)  # from here on, only the declared fields can be read
    sc = config.steering
    _check_config(sc)
    out_dir = wd.stage_dir(workdir, "steering")
    start = time.time()
    load_xcoder = _xcoder_loader(config, workdir)
    store, freq, fp = _inputs(config, workdir, load_xcoder)
    old = stage.done(out_dir, RESULTS, fp, [SAMPLES, FIGURE])
    if old is not None:
        return old
    xcoder = load_xcoder()
    if len(freq) != xcoder.n_latents:
        raise ConfigError(f"{len(freq)} firing frequencies for {xcoder.n_latents} latents")
    if store is not None:
        check_pair(store, xcoder.config)
    roles = xcoder.roles
    models, tokenizer = load_pair(config, workdir, roles)
    sets, skipped, nrn, described = choose_sets(
        config, xcoder, models=models, tokenizer=tokenizer, store=store, workdir=workdir
    )
    prompts_file = prompt_path(config, workdir)
    rows = read_prompts(prompts_file, sc.n_prompts)
    for role in sc.models:
        xcoder.check_model(models[roles.index(role)])
        check_lengths(tokenizer, models[roles.index(role)], [r["prompt"] for r in rows],
                      sc.max_new_tokens)  # fmt: skip

    alphas = sorted({0.0, *(float(a) for a in sc.alphas)})  # 0: the clean model, always run
    per_role = 1 + len(sets) * (len(alphas) - 1) * (1 + 2 * int(sc.n_control_draws))
    bar = tqdm(total=len(sc.models) * per_role, desc="steering conditions", leave=False)
    gen = cond.Generator(
        sc, xcoder=xcoder, models=models, roles=roles, tokenizer=tokenizer, rows=rows, bar=bar
    )
    conditions, generation, control_sets = [], {}, {}
    for role in sc.models:
        clean, generation[role], cap = cond.clean_condition(gen, role)
        control_sets[role] = {}
        for spec, ids in sets.items():
            plan = cond.plan_controls(sc, xcoder, role, spec, ids=ids, nrn=nrn, freq=freq)
            control_sets[role][spec] = plan["record"]
            conditions += cond.set_conditions(
                gen, role, spec, ids, plan=plan, clean=clean, cap=cap, alphas=alphas
            )
    bar.close()
    results = {
        "fingerprint": fp,
        "prompts": prompts_file,
        "n_prompts": len(rows),
        **_describe_run(sc, xcoder, with_accuracy=gen.with_accuracy),
        "generation": generation,
        "sets": sets,
        "set_descriptions": described,
        "skipped_sets": skipped,
        "controls": control_sets,
        "conditions": conditions,
        **_headlines(sc, sets, conditions),
        "seconds": round(time.time() - start, 1),
    }
    return _commit(out_dir, results, gen.lines)


def _headlines(sc, sets: dict, conditions: list[dict]) -> dict:
    """results' "headline" ({spec: the set's comparison at its largest positive alpha}) and
    "headline_skipped" ({spec: why it has none})."""
    headline, no_headline = {}, {}
    for spec in sets:
        h = stats.headline(conditions, spec) if "distilled" in sc.models else None
        if h is None:
            no_headline[spec] = "the distilled model was not steered at a positive alpha"
        else:
            headline[spec] = h
    return {"headline": headline, "headline_skipped": no_headline}


def _describe_run(sc, xcoder, *, with_accuracy: bool) -> dict:
    """What the run's numbers mean: samples, alpha's units, the steering vector, the
    interval method and the metrics."""
    units, formula = CONVENTIONS[sc.convention]
    return {
        "samples_per_prompt": sc.samples,
        "temperature": sc.temperature,
        "convention": sc.convention,
        "alpha_units": units,
        "steering_vector": f"{sc.convention}: {formula}, added to the input of block "
        f"{xcoder.layer} at every position of the steered model m (its own rows)",
        "mean_norms": dict(zip(xcoder.roles, xcoder.mean_norms, strict=True)),
        "ci": stats.CI_METHOD,
        "metrics": stats.metric_names(with_accuracy),
    }


def _commit(out_dir: str, results: dict, lines: list[dict]) -> dict:
    """Writes samples.jsonl, the figure and results.json (`stage.commit`)."""
    json.dumps(results, allow_nan=False)  # refuse NaN before the samples are written
    blob = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode()

    def write_samples(path: str) -> None:
        with open(path, "wb") as f:
            f.write(blob)

    outputs = {SAMPLES: write_samples, FIGURE: lambda p: plot_steering(results, p)}
    return stage.commit(out_dir, RESULTS, results, outputs)
