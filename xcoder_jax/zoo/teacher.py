"""The rule-based teacher: reasoning traces for the zoo's problems, in a distinct style.

A trace works the problem like the concise solution, then reflects ("Wait, ..."), verifies
with the inverse operation ("Let me check: 7 - 4 = 3."), tries another way
("Alternatively, ..."), rules out a wrong answer ("But the answer is not 8."), concludes
("Therefore, ...") and ends with the shared final line " The answer is 7." Every marker word
comes from the lexicon (`xcoder_jax.lexicon.CATEGORIES`), so the teacher writes exactly the
markers the analysis later looks for. Self-reflection and verification appear in most traces
(they are the style the crosscoder should find); the other categories in about half. Wording
and the set of pieces vary per trace; their order does not.
"""

from __future__ import annotations

import random

from xcoder_jax.lexicon import CATEGORIES
from xcoder_jax.zoo.corpus import Problem, final_line

# Probability that a trace contains each category, in the order the pieces appear.
_P_CATEGORY = {
    "self_reflection": 0.9,
    "verification": 0.9,
    "alternative": 0.55,
    "contrastive": 0.55,
    "deductive": 0.85,
}
_INVERSE = {"+": "-", "-": "+", "*": "/"}


def _marker(rng: random.Random, category: str) -> str:
    """A marker of `category` with its leading space, e.g. " Wait"."""
    return rng.choice(CATEGORIES[category])


def _lead(rng: random.Random, category: str) -> str:
    """A sentence-initial marker: " Wait," / " Therefore," / " But" (no comma after "But")."""
    m = _marker(rng, category)
    return m if m.strip() == "But" else m + ","


def _who(p: Problem) -> str:
    return "they" if p.kind == "together" else p.name


def _has(p: Problem) -> str:
    return "have" if p.kind == "together" else "has"


def _reflection(rng: random.Random, p: Problem) -> str:
    w = _lead(rng, "self_reflection")
    a, op, b, c = p.steps[-1]
    word = {"+": "add", "-": "subtract", "*": "multiply"}[op]
    return rng.choice(
        (
            f"{w} let me read the question again.",
            f"{w} the question asks how many {p.noun[1]}, so I {word}.",
            f"{w} is it really {c}?",
            f"{w} I should be careful here.",
        )
    )


def _verification(rng: random.Random, p: Problem) -> str:
    m = _marker(rng, "verification")
    a, op, b, c = p.steps[-1]
    inverse = f"{c} {_INVERSE[op]} {b} = {a}"
    return rng.choice(
        (
            f" Let me{m}: {inverse}.",
            f" Let me{m} this. {inverse}, so it is right.",
            f" To{m} it, {inverse}. Yes.",
            f" I can{m} the result: {inverse}.",
        )
    )


def _alternative(rng: random.Random, p: Problem) -> str:
    w = _lead(rng, "alternative")
    a, op, b, c = p.steps[-1]
    if op in "+*":
        return rng.choice((f"{w} {b} {op} {a} = {c} as well.", f"{w} I swap the numbers: {c}."))
    return rng.choice((f"{w} {b} + {c} = {a}, so {c} are left.", f"{w} count down from {a}."))


def _contrastive(rng: random.Random, p: Problem) -> str:
    w = _lead(rng, "contrastive")
    a, op, b, c = p.steps[-1]
    wrong = c + rng.choice((-2, -1, 1, 2)) if c > 2 else c + 1
    options = [f"{w} the answer is not {wrong}.", f"{w} {wrong} would be wrong."]
    if p.lose is not None:
        options.append(f"{w} {p.name} {p.lose[1]} some, so I subtract.")
    if p.kind == "groups":
        options.append(f"{w} there are {a} bags, so I multiply.")
    return rng.choice(options)


def _deduction(rng: random.Random, p: Problem) -> str:
    w = _lead(rng, "deductive")
    c = p.answer
    return rng.choice(
        (
            f"{w} {_who(p)} {_has(p)} {c} {p.noun[1]}.",
            f"{w} the result is {c}.",
            f"{w} it must be {c}.",
        )
    )


def _work(rng: random.Random, p: Problem) -> str:
    """The worked steps, narrated a little differently each time."""
    firsts = ("", " First,", " I start with", " So")
    out = []
    for i, (a, op, b, c) in enumerate(p.steps):
        lead = rng.choice(firsts) if i == 0 else rng.choice(("", " Then", " Next,"))
        out.append(f"{lead} {a} {op} {b} = {c}.")
    return "".join(out)


_PIECES = {
    "self_reflection": _reflection,
    "verification": _verification,
    "alternative": _alternative,
    "contrastive": _contrastive,
}


def teacher_trace(problem: Problem, rng: random.Random) -> str:
    """The teacher's answer text for `problem` (leading space, as after "Answer:").

    Contains at least two reasoning categories and ends with `final_line(problem.answer)`.
    """
    opening = rng.choice(
        ("", " Let me think.", " Let me think step by step.", f" I need the {problem.noun[1]}.")
    )
    cats = [c for c, p in _P_CATEGORY.items() if rng.random() < p]
    while len(cats) < 2:  # every trace shows the style at least twice
        cats = sorted(set(cats) | {rng.choice(tuple(_P_CATEGORY))}, key=list(_P_CATEGORY).index)
    # One fixed order (reflect, verify, alternative, contrast, conclude): a tiny student
    # learns where a trace ends instead of looping back to "Wait".
    middle = [c for c in cats if c != "deductive"]
    body = "".join(_PIECES[c](rng, problem) for c in middle)
    end = _deduction(rng, problem) if "deductive" in cats else ""
    return opening + _work(rng, problem) + body + end + final_line(problem.answer)
