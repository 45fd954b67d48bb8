"""Reasoning-style metrics of generated text, and their means with confidence intervals.

Per sample: tokens and words generated, marker occurrences per category per 100 tokens
(counted with `lexicon.count_markers`), whether a final answer ("The answer is N") was given,
and whether it is right where the answer is known. Several samples of one prompt are not
independent, so a condition's mean is the mean over prompts of each prompt's sample mean,
and its 95% confidence interval is mean +- 1.96 standard errors over prompts (normal
approximation).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from xcoder_jax.lexicon import CATEGORY_NAMES, count_markers
from xcoder_jax.zoo import final_answer

Z95 = 1.959963984540054
CI_METHOD = "mean over prompts of per-prompt sample means; 95% CI = mean +- 1.96 SE over prompts"


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


def mean_ci(values) -> dict[str, float]:
    """Mean and normal-approximation 95% CI of independent values."""
    v = np.asarray(values, np.float64)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "lo": mean - Z95 * se, "hi": mean + Z95 * se, "n": n}


def aggregate(samples: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: mean_ci over prompts} from sample rows {"prompt_id", "metrics": {...}}."""
    per_prompt: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        for name, value in s["metrics"].items():
            per_prompt[name][s["prompt_id"]].append(value)
    return {
        name: mean_ci([np.mean(v) for v in by_prompt.values()])
        for name, by_prompt in per_prompt.items()
    }


def separated(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two 95% CIs do not overlap."""
    return a["lo"] > b["hi"] or b["lo"] > a["hi"]
