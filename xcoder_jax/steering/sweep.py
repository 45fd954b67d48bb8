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
import os
import time

import numpy as np
import torch

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import selection, stage
from xcoder_jax import stats as cis
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.models import load_pair, torch_device
from xcoder_jax.analysis import check_pair, marker_groups
from xcoder_jax.errors import ConfigError, MissingInputError
from xcoder_jax.exported import CONVENTIONS, ExportedCrosscoder
from xcoder_jax.steering import stats
from xcoder_jax.steering.hooks import steer
from xcoder_jax.train import split_shards

STEERING_FORMAT = 4  # bump when results change meaning, to redo old runs
RESULTS, SAMPLES, FIGURE = "results.json", "samples.jsonl", "steering.png"


# --- Prompts and generation ----------------------------------------------------------------


def read_prompts(path: str, limit: int = -1) -> list[dict]:
    """[{"prompt", "answer" (str or None)}] from a JSONL file of {"prompt", optional "answer"}."""
    if not os.path.exists(path):
        raise MissingInputError(f"prompt file {path} does not exist")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise ConfigError(f"{path}:{n}: each line must be an object with a 'prompt'")
            answer = row.get("answer")
            rows.append(
                {"prompt": row["prompt"], "answer": None if answer is None else str(answer)}
            )
    if not rows:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return rows[:limit] if limit > 0 else rows


def prompt_path(config, workdir: str) -> str:
    sc = config.steering
    if sc.prompts:
        return sc.prompts
    if "zoo" in (config.models.base, config.models.distilled):
        return os.path.join(wd.zoo_data_dir(workdir), "heldout.jsonl")
    raise ConfigError("steering.prompts must name a JSONL file of prompts for real models")


def check_lengths(tokenizer, model, prompts: list[str], max_new_tokens: int) -> None:
    """Raises ValueError when a prompt plus the generation exceeds the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    for i, p in enumerate(prompts):
        n = len(tokenizer(p)["input_ids"])
        if n + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {i} has {n} tokens; with {max_new_tokens} new tokens it exceeds the "
                f"model's context of {limit} (shorten it or lower steering.max_new_tokens)"
            )


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], sc) -> list[tuple[int, int, str, int]]:
    """`sc.samples` continuations of every prompt: [(prompt id, sample, text, tokens)].

    Prompts are left-padded and decoded `sc.batch_size` rows at a time; batch b draws with
    a seed derived from (`sc.seed`, b) whatever the intervention. Text is cut where
    `sc.stop` begins.
    """
    rows = [(i, s) for i in range(len(prompts)) for s in range(sc.samples)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out = []
    try:
        for b, lo in enumerate(range(0, len(rows), sc.batch_size)):
            chunk = rows[lo : lo + sc.batch_size]
            enc = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            greedy = sc.temperature <= 0
            # One stream per (run seed, batch): runs with neighbouring seeds share none.
            seed = int(np.random.SeedSequence([sc.seed, b]).generate_state(1)[0])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if device.type == "cuda":
                    torch.cuda.manual_seed_all(seed)
                gen = model.generate(
                    **enc,
                    max_new_tokens=sc.max_new_tokens,
                    do_sample=not greedy,
                    temperature=None if greedy else sc.temperature,
                    # Plain temperature sampling, whatever the model's generation_config says.
                    top_p=None if greedy else 1.0,
                    top_k=None if greedy else 0,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts = tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for (i, s), text in zip(chunk, texts, strict=True):
                if sc.stop:
                    text = text.split(sc.stop)[0]
                n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                out.append((i, s, text, n))
    finally:
        tokenizer.padding_side = side
    return out


# --- The stage ------------------------------------------------------------------------------


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
    nrn = selection.export_nrn(
        {"W_dec": xcoder.W_dec.cpu().numpy()}, xcoder.config, config.analysis.norm
    )
    counts = None
    if any(":" in str(s) for s in sc.latents):
        forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
        cats = sorted({str(s).split(":")[0] for s in sc.latents if ":" in str(s)})
        unknown = [c for c in cats if c not in forms]
        if unknown:
            raise ConfigError(f"unknown categories {unknown} in steering.latents")
        # Selected on the training shards, like every latent choice of the study.
        train, _ = split_shards(store, config.train.eval_shards)
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
    roles = ckpt.role_order(xcoder.config)
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


def _series(results: dict) -> dict[tuple[str, str], list[dict]]:
    """{(model, set): its conditions in alpha order}."""
    series: dict[tuple[str, str], list[dict]] = {}
    for c in results["conditions"]:
        series.setdefault((c["model"], c["set"]), []).append(c)
    return {k: sorted(v, key=lambda c: c["alpha"]) for k, v in series.items()}


def _num(x) -> float:
    return np.nan if x is None else float(x)


def plot_steering(results: dict, path: str) -> None:
    """Per metric: steered minus clean (paired over prompts, 95% CI) against alpha.

    One line per (model, latent set); a filled marker where the paired CI excludes 0. The
    clean model sits at (0, 0) by construction.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["metrics"]
    cols = 3
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for (model, spec), conds in _series(results).items():
            xs, mean, lo, hi, sig = [], [], [], [], []
            for c in conds:
                clean = c["vs_clean"] is None
                ci = {"mean": 0.0, "lo": 0.0, "hi": 0.0} if clean else c["vs_clean"].get(name)
                if ci is None or ci["mean"] is None:
                    continue
                xs.append(c["alpha"])
                mean.append(ci["mean"])
                lo.append(_num(ci["lo"]))
                hi.append(_num(ci["hi"]))
                sig.append(name in c["changed"])
            if not xs:
                continue
            mean, lo, hi = np.array(mean), np.array(lo), np.array(hi)
            err = np.nan_to_num(np.stack([mean - lo, hi - mean]))  # no CI: no bar
            line = ax.errorbar(xs, mean, yerr=err, capsize=3, label=f"{model} {spec}")[0]
            face = [line.get_color() if s else "white" for s in sig]
            ax.scatter(xs, mean, c=face, edgecolors=line.get_color(), zorder=3, s=25)
        ax.set_title(f"{name}: steered - clean")
        ax.set_xlabel(f"alpha ({results['convention']})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        "Steering at block L: paired difference from the clean model over prompts, 95% CI "
        "(filled: CI excludes 0)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


_LABELS = {"tokens": ("tokens", "{:+.1f}"), "words": ("words", "{:+.1f}")}


def _fmt_ci(name: str, ci: dict) -> str:
    """'self_reflection/100tok +0.72 [+0.45, +0.99]', '... (n.s.)' or '... (no CI: why)'."""
    label, fmt = _LABELS.get(name, (name.replace("_per_100", "/100tok"), "{:+.2f}"))
    text = f"{label} {cis.format_ci(ci, fmt)}"
    return text if ci["lo"] is None or cis.excludes_zero(ci) else f"{text} (n.s.)"


def summarize_steering(results: dict) -> str:
    """One line: per (model, set), at the largest |alpha| on each side of 0, the paired
    difference from the clean model (95% CI) of the set's category rate, tokens and accuracy,
    and of every other metric whose CI excludes 0; "(n.s.)" marks CIs that include 0."""
    parts = []
    for (model, spec), conds in _series(results).items():
        neg = [c for c in conds if c["vs_clean"] is not None and c["alpha"] < 0]
        pos = [c for c in conds if c["vs_clean"] is not None and c["alpha"] > 0]
        cat = spec.split(":")[0] if ":" in spec else None
        sides = []
        for c in neg[:1] + pos[-1:]:
            vs = c["vs_clean"]
            head = [k for k in (f"{cat}_per_100", "tokens", "accuracy") if k in vs]
            shown = head + [k for k in c["changed"] if k not in head]
            vals = ", ".join(_fmt_ci(k, vs[k]) for k in shown)
            sides.append(f"alpha {c['alpha']:+g}: {vals}")
        if sides:
            parts.append(f"{model} {spec} " + " | ".join(sides))
    parts += [f"{spec} not steered ({why})" for spec, why in results["skipped_sets"].items()]
    if not parts:
        return "steering: no steered conditions"
    return f"steering vs clean (paired over {results['n_prompts']} prompts): " + "; ".join(parts)
