"""What a reflection round of the teacher (`zoo.rounds`) re-derives, and how it picks one.

A re-derivation (`Derivation`) recomputes something already written, each of a kind:
"verify" (a step checked by its inverse operation, or done again), "alternative" (another
route to a step's result, or another grouping of a two-step problem) or "reread" (the
question read again and the operation chosen again). Its `key` is what it computes, so a
trace prefers re-derivations that compute something it has not written yet.
"""

from __future__ import annotations

import dataclasses
import random

from xcoder_jax.zoo.corpus import Problem
from xcoder_jax.zoo.difficulty import Step, crosses_ten
from xcoder_jax.zoo.trace_reading import read_equations
from xcoder_jax.zoo.wording import (
    capitalized,
    equation,
    expression,
    inverse_equation,
    new_ones,
    operations_named,
    restate,
)


def _confirm(rng: random.Random, v: int) -> str:
    return rng.choice((" Yes.", " That works.", f" So {v} is right.", " Good.", ""))


def verification(rng: random.Random, step: Step, inverse: bool) -> str:
    """A check of a (correct) step: by its inverse operation, or the step done again."""
    if not inverse:
        head = rng.choice((" Let me check {} again:", " Let me check {} once more:"))
        return head.format(expression(step)) + f" {equation(step)}." + _confirm(rng, step[3])
    return rng.choice(
        (
            f" Let me check: {inverse_equation(step)}.",
            f" Let me check it backwards: {inverse_equation(step)}.",
            f" I can verify it: {inverse_equation(step)}.",
            f" To check, {inverse_equation(step)}.",
        )
    ) + _confirm(rng, step[3])


def routes(step: Step) -> list[str]:
    """Other routes to a (correct) step's result, each a sentence opening " Alternatively,"."""
    a, op, b, v = step
    out = []
    if op in "+*" and a != b:
        out.append(f" Alternatively, {b} {op} {a} = {v}.")
    if op == "+":
        if a < 10 and b < 10 and v > 10:  # fill the larger up to ten
            big, small = max(a, b), min(a, b)
            x = 10 - big
            out.append(
                f" Alternatively, I make a ten: {big} + {x} = 10 and 10 + {small - x} = {v}."
            )
        if 2 <= b <= 6:
            seq = ", ".join(str(a + i) for i in range(1, b + 1))
            out.append(f" Alternatively, I count on from {a}: {seq}.")
    elif op == "-":
        out.append(f" Alternatively, I add back: {v} + {b} = {a}.")
        if 2 <= b <= 6:
            seq = ", ".join(str(a - i) for i in range(1, b + 1))
            out.append(f" Alternatively, I count down from {a}: {seq}.")
        if 10 < a < 20 and crosses_ten(a, op, b):
            u = a - 10
            out.append(f" Alternatively, I go down to ten: {a} - {u} = 10 and 10 - {b - u} = {v}.")
    else:
        out.append(f" Alternatively, {a} bags of {b}: {' + '.join([str(b)] * a)} = {v}.")
        seq = ", ".join(str(b * i) for i in range(1, a + 1))
        out.append(f" Alternatively, I count by {b}s: {seq}.")
    return out


def regroupings(p: Problem) -> list[str]:
    """Other groupings of a two-step problem's arithmetic (only once its values are right)."""
    (a, _, b, _), (_, _, c, ans) = p.steps
    out = [f" Alternatively, in one line: {a} + {b} - {c} = {ans}."]
    if a >= c:
        out.append(
            f" Alternatively, I take away the {c} first: {a} - {c} = {a - c} "
            f"and {a - c} + {b} = {ans}."
        )
    if b >= c:
        out.append(
            f" Alternatively, I take the {c} from the {new_ones(b)}: {b} - {c} = {b - c} "
            f"and {a} + {b - c} = {ans}."
        )
    return out


REREAD = " Let me read the question again."


def reread(p: Problem) -> str:
    """The question read again, its events retold in words, and the operation chosen again
    (no arithmetic)."""
    return f"{REREAD} {capitalized(restate(p, words=True))}, so I {operations_named(p)}."


KINDS = ("verify", "alternative", "reread")
KIND_WEIGHTS = (0.4, 0.4, 0.2)


@dataclasses.dataclass(frozen=True)
class Derivation:
    kind: str  # one of KINDS
    step: Step  # the step it re-derives (the last one for a regrouping)
    text: str

    @property
    def key(self) -> tuple:
        """What it computes: its equations, or its text when it has none (counting on)."""
        eqs = read_equations(self.text)[0]
        return tuple((e.lhs, e.value) for e in eqs) if eqs else (self.text,)


def candidates(
    rng: random.Random, p: Problem, written: list[Step], safe: list[int], avoid: str | None
) -> list[Derivation]:
    """Every re-derivation of a step in `safe` (written steps that are right), and of the
    whole problem by another grouping when every step is safe; phrasing drawn from `rng`.
    None computes `avoid` (the slipped step's "a op b" while its catch is due: checking step 1
    of "5 + 2 = 7, 7 - 2 = 4" by its inverse would compute 7 - 2 again)."""
    out = []
    for i in safe:
        step = written[i]
        out.append(Derivation("verify", step, verification(rng, step, inverse=True)))
        out.append(Derivation("verify", step, verification(rng, step, inverse=False)))
        out += [Derivation("alternative", step, r) for r in routes(step)]
        out.append(Derivation("reread", step, reread(p) + f" {equation(step)}."))
    if p.kind == "two_step" and len(safe) == len(written):
        out += [Derivation("alternative", written[-1], r) for r in regroupings(p)]
    return [d for d in out if all(e.lhs != avoid for e in read_equations(d.text)[0])]


def pick(rng: random.Random, cands: list[Derivation], seen: set) -> Derivation:
    """A re-derivation of a kind drawn by `KIND_WEIGHTS`, preferring one that computes
    something not yet written in the trace (falling back to the other kinds, then repeats)."""
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    for k in (kind,) + tuple(k for k in KINDS if k != kind):
        fresh = [c for c in cands if c.kind == k and c.key not in seen]
        if fresh:
            return rng.choice(fresh)
    return rng.choice([c for c in cands if c.kind == kind] or cands)
