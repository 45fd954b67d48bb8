"""How hard a word problem is, the reflective teacher's draws that depend on it (how many
rounds, whether the work slips and to what), and the steps as a trace writes them.

A step is `(a, op, b, result)`, e.g. `(7, "+", 5, 12)`; `op` is one of "+", "-", "*". The
draws are documented with the teacher (`zoo.rounds`).
"""

from __future__ import annotations

import random

from xcoder_jax.zoo.corpus import Problem

MAX_ROUNDS = 16  # the tail of the round count is cut here

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
INVERSE = {"+": "-", "-": "+", "*": "/"}  # "/" is only written (a product checked), never computed

Step = tuple[int, str, int, int]  # (a, op, b, result)


def crosses_ten(a: int, op: str, b: int) -> bool:
    """A carry (+), a borrow (-) or a two-digit product (*)."""
    if op == "+":
        return a % 10 + b % 10 >= 10
    if op == "-":
        return a % 10 < b % 10
    return a * b >= 10


def difficulty(problem: Problem) -> float:
    """How hard `problem` is, in [0, 1]: a quarter each for two steps, a multiplication, a
    carry or borrow across ten (or a two-digit product), and the largest number written
    (operand or result, up to 25)."""
    steps = problem.steps
    largest = max(max(a, b, c) for a, _, b, c in steps)
    parts = (
        float(len(steps) > 1),
        float(any(op == "*" for _, op, _, _ in steps)),
        float(any(crosses_ten(a, op, b) for a, op, b, _ in steps)),
        min(largest, 25) / 25,
    )
    return round(0.25 * sum(parts), 4)


def level(d: float) -> str:
    """The difficulty level the report groups by: easy < 0.25 <= medium < 0.5 <= hard."""
    return "easy" if d < 0.25 else "medium" if d < 0.5 else "hard"


def p_first(d: float) -> float:
    """Probability of at least one reflection round."""
    return 0.75 + 0.25 * d


def p_more(d: float) -> float:
    """Probability of reflecting again after a round (the tail of the round count)."""
    return 0.3 + 0.6 * d


def p_slip(d: float) -> float:
    """Probability that the work holds a slip (which a later round then catches)."""
    return 0.05 + 0.45 * d


def draw_rounds(rng: random.Random, d: float) -> int:
    """How many reflection rounds a trace of difficulty `d` has (0 to `MAX_ROUNDS`)."""
    if rng.random() >= p_first(d):
        return 0
    k = 1
    while k < MAX_ROUNDS and rng.random() < p_more(d):
        k += 1
    return k


def slip_candidates(a: int, op: str, b: int, c: int) -> list[int]:
    """Wrong results a person plausibly writes for a op b = c."""
    out = [c - 1, c + 1]
    if 10 <= c <= 99 and c % 10 and c // 10 != c % 10:
        out.append(int(str(c)[::-1]))  # swapped digits
    if op == "*":
        out += [a * (b + 1), a * (b - 1)]  # a neighbouring fact of the table
    elif crosses_ten(a, op, b):
        if op == "+":
            out.append(c - 10)  # the carry forgotten
        else:  # the borrow forgotten: the smaller digit taken from the larger
            out.append((a // 10 - b // 10) * 10 + abs(a % 10 - b % 10))
    return sorted({v for v in out if v >= 0 and v != c})


def as_written(steps: tuple[Step, ...], i: int | None = None, value: int = 0) -> list[Step]:
    """`steps` as written when step i's result is `value`: a later step whose left operand was
    the previous result uses the written one and is computed from it (correctly)."""
    out: list[Step] = []
    for j, (a, op, b, _) in enumerate(steps):
        if j > 0 and a == steps[j - 1][3]:
            a = out[j - 1][3]
        out.append((a, op, b, value if j == i else OPS[op](a, b)))
    return out
