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
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from xcoder_jax import selection, stage
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.models import load_pair, torch_device
from xcoder_jax.analysis import check_pair, marker_groups
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import CONVENTIONS, ExportedCrosscoder
from xcoder_jax.steering import controls as ctl
from xcoder_jax.steering import stats
from xcoder_jax.steering.generation import check_lengths, prompt_path, read_prompts, sample
from xcoder_jax.steering.hooks import add_at_site
from xcoder_jax.steering.report import plot_steering

STEERING_FORMAT = 5  # bump when results change meaning, to redo old runs
RESULTS, SAMPLES, FIGURE = "results.json", "samples.jsonl", "steering.png"


def _fingerprint(config, workdir: str, prompts_file: str, store, freq_fp: dict) -> dict:
    return {
        "format": STEERING_FORMAT,
        "export": stage.export_hash(workdir),
        "steering": config.steering.to_dict(),
        "selection": config.selection.to_dict(),
        "distilled_only_min": config.analysis.distilled_only_min,
        "norm": config.analysis.norm,
        "bare_markers": config.analysis.bare_markers,
        "models": stage.digest(config.models.to_dict()),
        "prompts": stage.file_sha(prompts_file),
        "store": None if store is None else store.manifest.get("fingerprint"),
        "eval_shards": int(config.train.eval_shards),  # latents are chosen on the rest
        "firing_freq": freq_fp,  # the random-latent control's matching, by content
    }


def _inputs(config, workdir: str, load_xcoder):
    """(store or None, firing frequencies [h], fingerprint) of a steering run; the store is
    opened when category specs need it (the frequencies may need it too)."""
    needs_store = any(":" in str(s) for s in config.steering.latents)
    store = ActivationStore(wd.activations_dir(workdir), verify=False) if needs_store else None
    open_store = lambda: store or ActivationStore(wd.activations_dir(workdir), verify=False)
    freq, freq_fp = ctl.firing_frequencies(workdir, load_xcoder, open_store)
    fp = _fingerprint(config, workdir, prompt_path(config, workdir), store, freq_fp)
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
    return _inputs(config, workdir, _xcoder_loader(config, workdir))[2]


def choose_sets(config, xcoder: ExportedCrosscoder, models, roles, tokenizer, store, workdir):
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
        train, _ = store.split(config.train.eval_shards)
        scores = selection.score_rules(
            rules, config, workdir, store, train, xcoder, models, roles, tokenizer, forms, cats
        )
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
            sets[spec], nrn, score, config.analysis.distilled_only_min, labels
        ) | {"rule": "ids" if parsed is None else parsed[2]}
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


def _plan_controls(sc, xcoder, role: str, spec: str, ids, nrn, freq) -> dict:
    """The set's control draws (the same at every alpha): random unit directions and matched
    random latents, with what results record of them."""
    draws = range(int(sc.n_control_draws))
    units = [ctl.random_unit(xcoder.d_model, ctl.draw_seed(sc.seed, "direction", role, spec, j))
             for j in draws]  # fmt: skip
    info = lambda lat: (
        {"latents": lat, "nrn": [round(float(nrn[i]), 4) for i in lat]}
        | {"firing_freq": [float(freq[i]) for i in lat]}
    )
    record = info(list(ids)) | {
        "random_direction": {"method": ctl.RANDOM_DIRECTION, "draws": len(units)},
        "random_latent": {"method": ctl.RANDOM_LATENT, "match_pool": int(sc.match_pool)},
    }
    latents, reason = [], None
    try:
        for j in draws:
            rng = np.random.default_rng(ctl.draw_seed(sc.seed, "latent", role, spec, j))
            latents.append(ctl.match_latents(ids, nrn, freq, sc.match_pool, rng))
    except ValueError as e:
        latents, reason = [], str(e)
    record["random_latent"] |= {"draws": [info(lat) for lat in latents], "reason": reason}
    return {"units": units, "latents": latents, "record": record}


def run_steering(config, workdir: str) -> dict:
    """The steering sweep of `workdir`'s export; returns (and writes) steering/results.json."""
    sc = config.steering
    _check_config(sc)
    out_dir = wd.stage_dir(workdir, "steering")
    prompts_file = prompt_path(config, workdir)
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
        config, xcoder, models, roles, tokenizer, store, workdir
    )
    rows = read_prompts(prompts_file, sc.n_prompts)
    prompts = [r["prompt"] for r in rows]
    with_accuracy = all(r["answer"] is not None for r in rows)
    for role in sc.models:
        xcoder.check_model(models[roles.index(role)])
        check_lengths(tokenizer, models[roles.index(role)], prompts, sc.max_new_tokens)

    alphas = sorted({0.0, *(float(a) for a in sc.alphas)})  # 0: the clean model, always run
    steered = [a for a in alphas if a != 0]
    per_role = 1 + len(sets) * len(steered) * (1 + 2 * int(sc.n_control_draws))
    bar = tqdm(total=len(sc.models) * per_role, desc="steering conditions", leave=False)
    lines: list[dict] = []

    def run(role, spec, kind, alpha, vector, cap, draw=None):
        """Generates one condition: ({metric: {prompt id: mean over its samples}}, lines)."""
        m = roles.index(role)
        with add_at_site(models[m], xcoder.layer, vector):
            outs = sample(models[m], tokenizer, prompts, sc, cap)
        bar.update(1)
        samples, out = [], []
        for i, s, text, n, cut in outs:
            answer = rows[i]["answer"] if with_accuracy else None
            metrics = stats.text_metrics(text, n, answer, cut)
            samples.append({"prompt_id": i, "metrics": metrics})
            out.append({"model": role, "set": spec, "condition": kind, "draw": draw}
                       | {"alpha": alpha, "prompt_id": i, "sample": s}
                       | {"text": text, "metrics": metrics})  # fmt: skip
        return stats.per_prompt(samples), out

    conditions, generation, control_sets, steered_once = [], {}, {}, {}
    for role in sc.models:
        m = roles.index(role)
        zero = torch.zeros(xcoder.d_model)
        clean, clean_lines = run(role, "clean", "clean", 0.0, zero, sc.max_new_tokens)
        mean = stats.share(clean, "tokens")
        cap = max(int(sc.max_new_tokens), math.ceil(float(sc.cap_factor) * mean))
        generation[role] = {
            "max_new_tokens": int(sc.max_new_tokens),
            "cap_factor": float(sc.cap_factor),
            "clean_mean_tokens_at_max_new_tokens": round(mean, 2),
            "clean_truncated_at_max_new_tokens": stats.share(clean),
            "cap": cap,
        }
        why = f"steering.cap_factor (cap {cap} = ceil({sc.cap_factor} x {mean:.1f}))"
        check_lengths(tokenizer, models[m], prompts, cap, why)
        # Every condition of the model shares one cap. Where no clean sample hit
        # max_new_tokens, sampling again with the same seeds and a larger cap draws the very
        # same samples (each ended before), so they already are the clean condition at the cap.
        resample = cap > sc.max_new_tokens and stats.share(clean) > 0
        generation[role]["clean_resampled_at_cap"] = resample
        if resample:
            bar.total += 1
            clean, clean_lines = run(role, "clean", "clean", 0.0, zero, cap)
        lines += clean_lines
        control_sets[role] = {}
        for spec, ids in sets.items():
            plan = _plan_controls(sc, xcoder, role, spec, ids, nrn, freq)
            control_sets[role][spec] = plan["record"]
            base = {"model": role, "set": spec, "latents": ids, "cap": cap}
            base |= {k: plan["record"][k] for k in ("nrn", "firing_freq")}
            for alpha in alphas:
                if alpha == 0:
                    conditions.append(base | {"alpha": 0.0} | stats.condition(clean, clean, 0.0))
                    continue
                v = xcoder.steering_vector(ids, m, alpha, sc.convention)
                # Two specs may pick the same latents (e.g. both rules' top latent): the same
                # vector and seeds draw the same samples, so they are generated once.
                key = (role, tuple(ids), alpha)
                if key in steered_once:
                    means, out = steered_once[key]
                    out = [line | {"set": spec} for line in out]
                    bar.update(1)
                else:
                    means, out = steered_once[key] = run(role, spec, "steered", alpha, v, cap)
                lines += out
                draws = {"random_direction": [], "random_latent": []}
                for j, u in enumerate(plan["units"]):
                    vec = ctl.rescaled(u, v, alpha)
                    draws["random_direction"].append(
                        run(role, spec, "random_direction", alpha, vec, cap, j)
                    )
                for j, lat in enumerate(plan["latents"]):
                    vec = ctl.rescaled(xcoder.steering_vector(lat, m, alpha, sc.convention), v)
                    draws["random_latent"].append(
                        run(role, spec, "random_latent", alpha, vec, cap, j)
                    )
                ctrl = {}
                for kind, got in draws.items():
                    lines += [line for _, out in got for line in out]
                    ctrl[kind] = stats.mean_over_draws([mm for mm, _ in got]) or None
                conditions.append(
                    base | {"alpha": alpha, "vector_norm": round(float(v.norm()), 6)}
                    | stats.condition(means, clean, alpha, ctrl)
                )  # fmt: skip
    bar.close()
    headline, no_headline = {}, {}
    for spec in sets:
        h = stats.headline(conditions, spec) if "distilled" in sc.models else None
        if h is None:
            no_headline[spec] = "the distilled model was not steered at a positive alpha"
        else:
            headline[spec] = h
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
        "generation": generation,
        "ci": stats.CI_METHOD,
        "metrics": stats.metric_names(with_accuracy),
        "sets": sets,
        "set_descriptions": described,
        "skipped_sets": skipped,
        "controls": control_sets,
        "conditions": conditions,
        "headline": headline,
        "headline_skipped": no_headline,
        "seconds": round(time.time() - start, 1),
    }
    json.dumps(results, allow_nan=False)  # refuse NaN before the samples are written
    blob = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode()

    def write_samples(path: str) -> None:
        with open(path, "wb") as f:
            f.write(blob)

    outputs = {SAMPLES: write_samples, FIGURE: lambda p: plot_steering(results, p)}
    return stage.commit(out_dir, RESULTS, results, outputs)
