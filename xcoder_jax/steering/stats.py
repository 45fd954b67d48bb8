"""Reasoning-style metrics of generated text, per condition and paired against the clean model.

Per sample: tokens and words generated, marker occurrences per category per 100 tokens
(counted with `lexicon.count_markers`), whether a final answer ("The answer is N") was given,
and whether it is right where the answer is known.

Several samples of one prompt are not independent, so the unit of every interval is the
prompt: a prompt's value is the mean over its samples. A condition is summarised by the mean
over prompts with a Student-t 95% interval (`xcoder_jax.stats.t_ci`). A steered condition is
compared with the clean model on the same prompts and seeds by the paired difference of the
per-prompt values (`xcoder_jax.stats.paired_ci`); prompt-to-prompt spread, which both
conditions share, cancels there, so the paired interval is the one that says whether the
intervention changed a metric (`changed`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from xcoder_jax import stats as cis
from xcoder_jax.lexicon import CATEGORY_NAMES, count_markers
from xcoder_jax.zoo import final_answer

CI_METHOD = {
    "unit": "prompt: each prompt's value is the mean over its samples",
    "metrics": "mean over prompts; Student-t 95% CI over prompts (n - 1 dof)",
    "vs_clean": "per prompt, the condition's value minus the clean model's (alpha = 0, same "
    "prompts and seeds); mean over prompts with a Student-t 95% CI (n - 1 dof)",
    "changed": "metrics whose vs_clean CI excludes 0",
}


def metric_names(with_accuracy: bool) -> list[str]:
    names = ["tokens", "words", *(f"{c}_per_100" for c in CATEGORY_NAMES), "has_answer"]
    return [*names, "accuracy"] if with_accuracy else names


def text_metrics(text: str, n_tokens: int, answer: str | None) -> dict[str, float]:
    """Metrics of one generation; `accuracy` only where the answer is known."""
    counts = count_markers(text)
    got = final_answer(text)
    out = {"tokens": float(n_tokens), "words": float(len(text.split()))}
    for c in CATEGORY_NAMES:
        out[f"{c}_per_100"] = 100.0 * counts[c] / n_tokens if n_tokens else 0.0
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


def condition(
    means: dict[str, dict[int, float]], clean: dict[str, dict[int, float]], alpha: float
) -> dict:
    """{"metrics", "vs_clean", "changed"} of one condition (both args from `per_prompt`).

    "metrics": {metric: t_ci over prompts}; "vs_clean": {metric: paired_ci against the
    clean model}, None at alpha = 0 (the clean model itself); "changed": the metrics whose
    paired CI excludes 0 ([] at alpha = 0).
    """
    vs_clean = None if alpha == 0 else paired(means, clean)
    return {
        "metrics": summarize(means),
        "vs_clean": vs_clean,
        "changed": [] if vs_clean is None else changed(vs_clean),
    }
