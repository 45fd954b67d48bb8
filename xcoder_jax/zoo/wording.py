"""The reflective teacher's wording (`zoo.rounds`): the sentences a trace is made of.

The question restated (in digits, or retold in words: "Tom had seven apples and gave three
of them"), the opening, the worked steps, a contrast ("But it is not 8."), a deduction
("Thus, ...") and the conclusion ("Therefore, ..." and the final line). Every choice of
phrasing is drawn from the trace's `random.Random`, so the same draws give the same text.
"""

from __future__ import annotations

import random

from xcoder_jax.zoo.corpus import NUMBER_WORDS, Problem, final_line
from xcoder_jax.zoo.difficulty import INVERSE, Step

VERB = {"+": "add", "-": "subtract", "*": "multiply"}


def counted(n: int, noun: tuple[str, str]) -> str:
    """ "7 apples" / "1 apple" for `noun` = (singular, plural)."""
    return f"{n} {noun[0] if n == 1 else noun[1]}"


def subject(p: Problem) -> str:
    """Who holds the things: "they" for two people together, else the problem's name."""
    return "they" if p.kind == "together" else p.name


def verb_has(p: Problem) -> str:
    """ "have" or "has", agreeing with `subject(p)`."""
    return "have" if p.kind == "together" else "has"


def new_ones(n: int) -> str:
    """ "3 new ones" / "1 new one"."""
    return f"{n} new {'one' if n == 1 else 'ones'}"


def capitalized(s: str) -> str:
    """`s` with its first letter upper-case (the rest as it is, unlike `str.capitalize`)."""
    return s[:1].upper() + s[1:]


def equation(step: Step) -> str:
    """ "7 + 5 = 12"."""
    a, op, b, v = step
    return f"{a} {op} {b} = {v}"


def expression(step: Step) -> str:
    """ "7 + 5", the left-hand side of `equation(step)`."""
    a, op, b, _ = step
    return f"{a} {op} {b}"


def inverse_equation(step: Step) -> str:
    """The step checked by its inverse: "12 - 5 = 7" for 7 + 5 = 12."""
    a, op, b, v = step
    return f"{v} {INVERSE[op]} {b} = {a}"


def count_word(n: int) -> str:
    """A count in words up to twenty ("seven"), in digits beyond."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def restate(p: Problem, words: bool = False) -> str:
    """The question's quantities in a clause, without arithmetic. With `words`, its events
    retold: counts spelled out, verbs in the past tense, nouns in number agreement ("Tom had
    seven apples and gave three of them"), the words the relation sentences teach, met here
    in reasoning."""
    a, _, b, _ = p.steps[0]
    num = count_word if words else str
    things = lambda n: f"{num(n)} {p.noun[0] if n == 1 else p.noun[1]}"
    has, are, them = ("had", "were", " of them") if words else ("has", "are", "")
    if p.kind == "gain":
        return f"{p.name} {has} {things(a)} and {p.gain[1]} {num(b)} more"
    if p.kind == "lose":
        return f"{p.name} had {things(a)} and {p.lose[1]} {num(b)}{them}"
    if p.kind == "together":
        return f"{p.name} {has} {things(a)} and the other one {has} {num(b)}"
    if p.kind == "groups":
        return f"there {are} {num(a)} bags with {things(b)} in each"
    c = p.steps[1][2]
    return (
        f"{p.name} had {things(a)}, {p.gain[1]} {num(b)} more and then {p.lose[1]} {num(c)}{them}"
    )


def focus(p: Problem) -> str:
    """What the question asks, e.g. "how many apples Tom has left"."""
    tail = {"lose": " left", "together": " together", "groups": " in all"}.get(p.kind, " now")
    return f"how many {p.noun[1]} {subject(p)} {verb_has(p)}{tail}"


def operations_named(p: Problem) -> str:
    """The problem's operations as verbs: "add", "add and then subtract"."""
    ops = [VERB[op] for _, op, _, _ in p.steps]
    return " and then ".join(ops)


def opening(rng: random.Random, p: Problem) -> str:
    first = rng.choice(
        (" Let me think.", " Let me think step by step.", " Let me see.", " Hmm, let me see.")
    )
    return first + rng.choice(
        (
            f" Okay, so {restate(p)}, and I need {focus(p)}.",
            f" {capitalized(restate(p))}. The question asks {focus(p)}.",
            f" I need {focus(p)}. {capitalized(restate(p))}.",
            f" The question asks {focus(p)}. So {restate(p)}.",
        )
    )


def work(rng: random.Random, p: Problem, written: list[Step]) -> str:
    """The worked steps as written (a slipped step included), narrated a little differently
    each time."""
    out = []
    name, plural = p.name, p.noun[1]
    for i, step in enumerate(written):
        a, op, b, v = step
        if p.kind == "two_step":
            leads = (
                (" First,", f" First, {name} gets {b} more.", f" First I add the {new_ones(b)}.")
                if i == 0
                else (" Then", " Next,", f" Then {name} {p.lose[1]} {b}, so I subtract.")
            )
        elif p.kind == "gain":
            leads = ("", " So", f" {name} gets {b} more, so I add.")
        elif p.kind == "lose":
            leads = ("", " So", f" {name} {p.lose[1]} {b}, so I subtract.")
        elif p.kind == "together":
            leads = ("", " So", " Together means I add the two.")
        else:
            leads = ("", " So", f" {a} bags of {b} {plural} means I multiply.")
        out.append(f"{rng.choice(leads)} {equation(step)}.")
    return "".join(out)


def contrast(rng: random.Random, p: Problem, written: list[Step]) -> str:
    cur, ans = written[-1][3], p.answer
    options = []
    wrong = [cur + d for d in (-2, -1, 1, 2) if cur + d >= 0 and cur + d not in (cur, ans)]
    if wrong:
        x = rng.choice(wrong)
        options += [f" But it is not {x}.", f" But {x} would be wrong.", f" However, {x} is wrong."]
    if p.lose is not None:
        options.append(f" But {p.name} {p.lose[1]} some, so I subtract.")
    if p.kind == "groups":
        options.append(f" But there are {p.steps[0][0]} bags, so I multiply, not add.")
    if p.kind == "together":
        options.append(" But there are two of them, so I add.")
    return rng.choice(options)


def deduction(rng: random.Random, p: Problem, written: list[Step]) -> str:
    cur = written[-1][3]
    return rng.choice(
        (
            f" Thus, {subject(p)} {verb_has(p)} {counted(cur, p.noun)}.",
            f" Thus, the result is {cur}.",
            f" Thus, I get {cur}.",
        )
    )


def conclusion(rng: random.Random, p: Problem, before: str) -> str:
    """ "Therefore, ..." and the final line, not in the words of a "Thus, ..." just `before`."""
    ans = p.answer
    options = [
        f" Therefore, {subject(p)} {verb_has(p)} {counted(ans, p.noun)}.",
        f" Therefore, the result is {ans}.",
        f" Therefore, it is {ans}.",
    ]
    options = [o for o in options if not before.endswith(o.replace("Therefore", "Thus"))]
    return rng.choice(options) + final_line(ans)
