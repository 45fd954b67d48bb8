"""Query the zoo's models: greedy answers to held-out prompts, what they hold (reasoning
markers, the trace format, reflection rounds, the right final answer), whether a size's
distillation took, and one summary line per size and arm of the zoo report.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from xcoder_jax import workdir as wd
from xcoder_jax.lexicon import has_marker
from xcoder_jax.zoo.trace_reading import length_words, parse_rounds, reads_as_trace

_ANSWER = re.compile(r"The answer is (-?\d+)")


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 50
) -> list[str]:
    """Greedy continuations of `prompts`, cut at EOS or at the start of a next "Question:".

    Prompts are left-padded so a batch decodes together.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            out.extend(t.split("Question:")[0] for t in texts)
    finally:
        tokenizer.padding_side = side
    return out


def final_answer(text: str) -> str | None:
    """The N of the first "The answer is N" in `text`, or None."""
    m = _ANSWER.search(text)
    return m.group(1) if m else None


def evaluate_answers(
    model, tokenizer, heldout: Sequence[dict], max_new_tokens: int, batch_size: int
) -> dict:
    """Greedy answers to `heldout` ({"prompt", "answer"}): the fraction containing a reasoning
    marker, reading as a trace (`trace_reading.reads_as_trace`) and with the right final
    answer; reflection rounds per answer; answer lengths in words; a few samples."""
    prompts = [h["prompt"] for h in heldout]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = [final_answer(a) == h["answer"] for a, h in zip(answers, heldout, strict=True)]
    words = np.array([length_words(a) for a in answers], float)
    return {
        "marker_rate": float(np.mean([has_marker(a) for a in answers])),
        "trace_format_rate": float(np.mean([reads_as_trace(a) for a in answers])),
        "accuracy": float(np.mean(hits)),
        "mean_rounds": float(np.mean([len(parse_rounds(a)) for a in answers])),
        "words": {
            "median": float(np.median(words)),
            "p90": float(np.percentile(words, 90)),
            "max": int(words.max()),
        },  # fmt: skip
        "mean_answer_chars": float(np.mean([len(a) for a in answers])),
        "samples": answers[:3],
    }


def distillation_criterion(evaluation: dict, min_rate: float) -> dict:
    """Whether a size's distillation took: held-out greedy answers holding a reasoning
    marker, and reading as a trace, each at least `min_rate` of the time."""
    rates = {k: evaluation[k] for k in ("marker_rate", "trace_format_rate")}
    return {"min_rate": min_rate, **rates, "met": all(v >= min_rate for v in rates.values())}


def summarize_zoo(report: dict) -> list[str]:
    """One line per size and arm: held-out greedy accuracy, marker and trace-format rates,
    reflection rounds, median words, training steps (* where the held-out loss converged);
    and each size's distillation criterion."""
    lines = []
    for size, r in report["sizes"].items():
        for arm in (a for a in wd.ARMS if a in r):
            e, t = r[arm], (r.get("training") or {}).get(arm) or {}
            steps = f"{t.get('steps', '-')}{'*' if t.get('converged') else ''}"
            lines.append(
                f"h{size:<4} L{r.get('n_layers', '?')} {arm:<9} accuracy {e['accuracy']:.2f}  "
                f"marker {e['marker_rate']:.2f}  trace format {e.get('trace_format_rate', 0):.2f}  "
                f"rounds {e.get('mean_rounds', 0):.1f}  median words "
                f"{e.get('words', {}).get('median', 0):.0f}  steps {steps}"
            )
        if "criterion" in r:
            met = "met" if r["criterion"]["met"] else "NOT met"
            lines.append(f"h{size:<4} distillation criterion {met}")
    return lines
