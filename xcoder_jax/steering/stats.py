"""Reasoning-style metrics of generated text, per condition and paired against the clean model.

Per sample: tokens and words generated, whether the generation hit the cap (`truncated`,
0/1), reflection rounds (reasoning-form self-reflection markers), markers used as reasoning
moves per category per 100 tokens (`lexicon.count_reasoning_markers`: "Wait," opening a
sentence, not "Wait for me"), the same words in everyday use per 100 tokens
(`<category>_everyday_per_100`), whether a final answer ("The answer is N") was given, and
whether it is right where the answer is known.

Several samples of one prompt are not independent, so the unit of every interval is the
prompt: a prompt's value is the mean over its samples. A condition is summarised by the mean
over prompts with a Student-t 95% interval (`xcoder_jax.stats.t_ci`). A steered condition is
compared with the clean model on the same prompts and seeds by the paired difference of the
per-prompt values (`xcoder_jax.stats.paired_ci`); prompt-to-prompt spread, which both
conditions share, cancels there, so the paired interval is the one that says whether the
intervention changed a metric (`changed`). The random controls of a steered condition (a
random direction of the same norm, a matched random latent) share its prompts and seeds, so
it is paired with them too (`vs_random_direction`, `vs_random_latent`), each prompt's control
value being the mean over the control's draws.

Tokens are censored at the generation cap: a truncated sample would have run longer. Where
the steered condition hits the cap more often than the condition it is compared with, the
paired difference of tokens is therefore a lower bound of the uncensored one (`censoring`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from xcoder_jax import stats as cis
from xcoder_jax.lexicon import (
    CATEGORY_NAMES,
    REASONING_FORMS,
    count_everyday_markers,
    count_reasoning_markers,
)
from xcoder_jax.zoo import final_answer

CI_METHOD = {
    "unit": "prompt: each prompt's value is the mean over its samples",
    "metrics": "mean over prompts; Student-t 95% CI over prompts (n - 1 dof)",
    "vs_clean": "per prompt, the condition's value minus the clean model's (alpha = 0, same "
    "prompts and seeds); mean over prompts with a Student-t 95% CI (n - 1 dof)",
    "changed": "metrics whose vs_clean CI excludes 0",
    "vs_random_direction": "per prompt, the steered condition's value minus the random-"
    "direction control's (same prompts and seeds; the control's value is its mean over its "
    "draws); mean over prompts with a Student-t 95% CI (n - 1 dof)",
    "vs_random_latent": "as vs_random_direction, against the matched random latent",
    "markers": "<category>_per_100 counts markers used as reasoning moves per 100 tokens "
    "(lexicon.REASONING_FORMS); <category>_everyday_per_100 the same words otherwise; "
    "reflection_rounds the number of reasoning-form self-reflection markers per sample",
    "reasoning_forms": dict(REASONING_FORMS),
    "truncated": "1 when a sample drew the cap's number of tokens without ending; its tokens "
    "are censored at the cap",
    "notes": "tokens are censored at the cap, so a paired difference of tokens is a lower "
    "bound of the uncensored difference when the steered condition is truncated more often "
    "than the one it is compared with (an upper bound when less often); `censoring` says "
    "which per comparison, `truncated` gives the shares",
}


def metric_names(with_accuracy: bool) -> list[str]:
    names = ["tokens", "words", "truncated", "reflection_rounds"]
    names += [f"{c}_per_100" for c in CATEGORY_NAMES]
    names += [f"{c}_everyday_per_100" for c in CATEGORY_NAMES]
    names.append("has_answer")
    return [*names, "accuracy"] if with_accuracy else names


def text_metrics(
    text: str, n_tokens: int, answer: str | None, truncated: bool = False
) -> dict[str, float]:
    """Metrics of one generation; `accuracy` only where the answer is known."""
    moves, everyday = count_reasoning_markers(text), count_everyday_markers(text)
    got = final_answer(text)
    out = {"tokens": float(n_tokens), "words": float(len(text.split()))}
    out["truncated"] = float(bool(truncated))
    out["reflection_rounds"] = float(moves["self_reflection"])
    per = lambda k: 100.0 * k / n_tokens if n_tokens else 0.0
    for c in CATEGORY_NAMES:
        out[f"{c}_per_100"] = per(moves[c])
    for c in CATEGORY_NAMES:
        out[f"{c}_everyday_per_100"] = per(everyday[c])
    out["has_answer"] = float(got is not None)
    if answer is not None:
        out["accuracy"] = float(got is not None and got == str(answer).strip())
    return out


def per_prompt(samples: list[dict]) -> dict[str, dict[int, float]]:
    """{metric: {prompt id: mean over the prompt's samples}} from sample rows.

    samples: [{"prompt_id", "metrics": {name: value}}]. A metric missing from any sample
    (e.g. accuracy where some answers are unknown) is left out, so every metric kept is
    averaged over the same prompts and samples.
    """
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        for name, value in s["metrics"].items():
            values[name][int(s["prompt_id"])].append(float(value))
    return {
        name: {p: float(np.mean(v)) for p, v in sorted(by_prompt.items())}
        for name, by_prompt in values.items()
        if sum(map(len, by_prompt.values())) == len(samples)
    }


def summarize(means: dict[str, dict[int, float]]) -> dict[str, dict]:
    """{metric: t_ci over prompts} of per-prompt means (from `per_prompt`)."""
    return {name: cis.t_ci(list(by_prompt.values())) for name, by_prompt in means.items()}


def paired(
    steered: dict[str, dict[int, float]], clean: dict[str, dict[int, float]]
) -> dict[str, dict]:
    """{metric: paired_ci of steered - clean over prompts} (both from `per_prompt`).

    Only metrics both conditions have for the same prompts are compared; the rest are left
    out rather than paired over a subset.
    """
    out = {}
    for name, by_prompt in steered.items():
        base = clean.get(name)
        if base is None or sorted(base) != sorted(by_prompt):
            continue
        ids = sorted(by_prompt)
        out[name] = cis.paired_ci([by_prompt[p] for p in ids], [base[p] for p in ids])
    return out


def changed(vs_clean: dict[str, dict]) -> list[str]:
    """The metrics whose paired interval excludes 0, in `vs_clean`'s order."""
    return [name for name, ci in vs_clean.items() if cis.excludes_zero(ci)]


def mean_over_draws(draws: list[dict[str, dict[int, float]]]) -> dict[str, dict[int, float]]:
    """Per-prompt values of a control averaged over its draws (each from `per_prompt`).

    Only metrics every draw has for the same prompts are kept.
    """
    if not draws:
        return {}
    out = {}
    for name, first in draws[0].items():
        if all(sorted(d.get(name, {})) == sorted(first) for d in draws):
            out[name] = {p: float(np.mean([d[name][p] for d in draws])) for p in sorted(first)}
    return out


def share(means: dict[str, dict[int, float]], name: str = "truncated") -> float | None:
    """Mean over prompts of a per-prompt metric (the share of samples for a 0/1 metric with
    the same number of samples per prompt); None without it."""
    by_prompt = means.get(name)
    return None if not by_prompt else float(np.mean(list(by_prompt.values())))


def censoring(steered: dict[str, dict[int, float]], other: dict[str, dict[int, float]]) -> str:
    """How truncation at the cap biases the paired difference of tokens, steered - other."""
    a, b = share(steered), share(other)
    if a is None or b is None:
        return "unknown: truncation was not recorded"
    shares = f"{a:.1%} vs {b:.1%} of samples hit the cap"
    if a == b == 0:
        return "exact: no sample of either condition hit the cap"
    if a > b:
        return f"lower bound: the steered condition hit the cap more often ({shares})"
    if a < b:
        return f"upper bound: the steered condition hit the cap less often ({shares})"
    return f"censored equally often in both ({shares}): bias of unknown sign"


CONTROLS = ("random_direction", "random_latent")


def condition(
    means: dict[str, dict[int, float]],
    clean: dict[str, dict[int, float]],
    alpha: float,
    controls: dict[str, dict[str, dict[int, float]] | None] | None = None,
) -> dict:
    """One condition (`means`, `clean` and each control from `per_prompt`; a control's
    draws averaged with `mean_over_draws`; None: not drawn).

    "metrics": {metric: t_ci over prompts}; "vs_clean": {metric: paired_ci against the
    clean model}, None at alpha = 0 (the clean model itself); "changed": the metrics whose
    paired CI excludes 0 ([] at alpha = 0); "vs_<control>": {metric: paired_ci of steered -
    control}; "controls": {control: {"metrics", "vs_clean"}}; "censoring": {comparison: how
    truncation biases its tokens difference}. The last three are None at alpha = 0 or
    without controls; a control that could not be drawn compares as {}.
    """
    vs_clean = None if alpha == 0 else paired(means, clean)
    out = {
        "metrics": summarize(means),
        "vs_clean": vs_clean,
        "changed": [] if vs_clean is None else changed(vs_clean),
    }
    with_controls = alpha != 0 and controls is not None
    ctrl = {k: (controls or {}).get(k) for k in CONTROLS}
    for k in CONTROLS:
        out[f"vs_{k}"] = (paired(means, ctrl[k]) if ctrl[k] else {}) if with_controls else None
    out["controls"] = (
        {
            k: None if not v else {"metrics": summarize(v), "vs_clean": paired(v, clean)}
            for k, v in ctrl.items()
        }
        if with_controls
        else None
    )
    out["censoring"] = (
        {"vs_clean": censoring(means, clean)}
        | {f"vs_{k}": censoring(means, v) for k, v in ctrl.items() if v}
        if with_controls
        else None
    )
    return out


HEADLINE_METRICS = (
    "tokens",
    "truncated",
    "reflection_rounds",
    *(f"{c}_per_100" for c in CATEGORY_NAMES),
    "has_answer",
    "accuracy",
)


def headline(conditions: list[dict], spec: str, model: str = "distilled") -> dict | None:
    """The set's finding at its largest positive alpha on `model`, against the clean model
    and both controls (None when the set has no positive alpha on `model`)."""
    mine = [c for c in conditions if c["set"] == spec and c["model"] == model]
    pos = [c for c in mine if c["alpha"] > 0]
    if not pos:
        return None
    c = max(pos, key=lambda c: c["alpha"])
    clean = next(x for x in mine if x["alpha"] == 0)
    pick = lambda vs: {k: vs[k] for k in HEADLINE_METRICS if vs and k in vs}
    mean = lambda m: (m or {}).get("truncated", {}).get("mean")
    ctrl = c["controls"] or {}
    return {
        "model": model,
        "alpha": c["alpha"],
        "latents": c["latents"],
        "nrn": c["nrn"],
        "vs_clean": pick(c["vs_clean"]),
        "vs_random_direction": pick(c["vs_random_direction"]),
        "vs_random_latent": pick(c["vs_random_latent"]),
        "truncated": {
            "steered": mean(c["metrics"]),
            "clean": mean(clean["metrics"]),
            **{k: mean((ctrl.get(k) or {}).get("metrics")) for k in CONTROLS},
        },
    }
