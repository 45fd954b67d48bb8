"""The reflective teacher: traces that reflect in rounds, as R1's distillation data does.

A trace works the problem (`Problem.steps`), reflects in k >= 0 rounds, and concludes:

    <opening> <work> [" Wait," <re-derivation> ...] x k " Therefore," <statement> <final line>

Every round opens with a sentence-initial " Wait," (the self-reflection move of
`lexicon.REASONING_FORMS`) and re-derives something: a step recomputed, checked by its inverse
("Let me check: 12 - 5 = 7. Yes."), reached by another route ("Alternatively, I make a ten:
7 + 3 = 10 and 10 + 2 = 12.", another grouping of a two-step problem), or the question re-read
and the operation chosen again. After each round the teacher stands at the same decision
point: reflect again or conclude. The number of rounds k has a geometric-like tail: a first
round with probability `p_first`, then each further one with probability `p_more`, both rising
with `difficulty` (two steps, a multiplication, a carry or borrow across ten, larger numbers),
so hard problems reflect more and a few traces run to many rounds.

In some traces (more for hard problems, `p_slip`) the work slips: one step's result is off by
one, has its digits swapped, is a neighbouring multiplication fact, or forgets a carry or a
borrow. The wrong value is carried into the later steps until a later round (one of the first
two or three) catches it ("Wait, 7 + 5 is 12, not 13."), after which the corrected value is
carried forward. Rounds before the catch find nothing and say so honestly: they check steps
that are right (given the values written so far) or re-read the question, never the slipped
step. So every equation a
trace writes is true except the slip itself, each slip is corrected in its own trace, and the
final line is always the right answer.

Within a round the pieces come in varied order: a contrastive "But it is not 8." may come before
or after the re-derivation and a deductive "Thus, ..." may follow it; "Therefore," is kept for
the conclusion. Markers are written only in their reasoning forms, so a trace holds no everyday
use of a marker word (`lexicon.count_everyday_markers` is zero).

`teacher_trace` has the signature and return of `zoo.teacher.teacher_trace` (the no-loop
teacher, which writes at most one reflection, in one fixed order, and stays as the negative
control); `teacher_trace_meta` also returns what was drawn (`TraceMeta`). `zoo.trace_reading`
recovers the work, the rounds, the slips and their corrections from a trace's text alone and
summarises a set of traces for the zoo report. The zoo's default teacher.

The pieces live beside it: the difficulty and its draws in `zoo.difficulty`, the sentences in
`zoo.wording`, what a round re-derives in `zoo.rederivations`.
"""

from __future__ import annotations

import dataclasses
import random

from xcoder_jax.zoo.corpus import Problem
from xcoder_jax.zoo.difficulty import (
    INVERSE,
    MAX_ROUNDS,
    OPS,
    Step,
    as_written,
    difficulty,
    draw_rounds,
    level,
    p_first,
    p_more,
    p_slip,
    slip_candidates,
)
from xcoder_jax.zoo.rederivations import REREAD, Derivation, candidates, pick, reread, routes
from xcoder_jax.zoo.trace_reading import length_words
from xcoder_jax.zoo.wording import (
    capitalized,
    conclusion,
    contrast,
    counted,
    deduction,
    equation,
    expression,
    focus,
    opening,
    operations_named,
    restate,
    subject,
    verb_has,
    work,
)

__all__ = [
    "MAX_ROUNDS",
    "MAX_WORDS",
    "TraceMeta",
    "difficulty",
    "level",
    "p_first",
    "p_more",
    "p_slip",
    "teacher_trace",
    "teacher_trace_meta",
]

MAX_WORDS = 400  # no trace is longer (words of a whitespace split)
# No round starts past this length: a round and the conclusion fit in what is left.
_BUDGET = MAX_WORDS - 70
_FIND_BY = {1: 2, 2: 3}  # latest round that catches a slip, by the problem's number of steps


# A round whose first re-derivation opens with one of these may run on from " Wait,".
_MERGE = ("Let me", "I can")


def _opener(rng: random.Random, first: Derivation) -> str:
    """The " Wait, ..." sentence that opens a round, fitting its `first` re-derivation."""
    v = first.step[3]
    common = (" Wait, let me make sure.", " Wait, let me think again.", " Wait, hmm.")
    if first.kind == "alternative":
        own = (" Wait, let me try another way.", " Wait, is there another way?")
    else:
        own = (
            f" Wait, is {v} right?",
            f" Wait, let me look at {expression(first.step)} again.",
            " Wait, I should be careful here.",
        )
    return rng.choice(common + own)


def _round(
    rng: random.Random,
    p: Problem,
    written: list[Step],
    safe: list[int],
    seen: set,
    avoid: str | None = None,
) -> str:
    """A round that finds nothing: " Wait," + one or two re-derivations of right steps (or,
    when no step may be redone, the question re-read), a contrast and a deduction sometimes.
    `seen` (keys of what the trace has computed) is updated; `avoid` as in `candidates`."""
    cands = candidates(rng, p, written, safe, avoid)
    if not cands:  # the only step holds a slip a later round catches: re-read, don't redo
        ops = operations_named(p)
        rereads = [
            " let me read the question again." + reread(p)[len(REREAD) :],
            f" the question asks {focus(p)}, so I {ops}.",
            f" do I {ops} here? {capitalized(restate(p))}, so I {ops}.",
        ]
        text = rng.choice([r for r in rereads if (r,) not in seen] or rereads)
        seen.add((text,))
        return " Wait," + text
    first = pick(rng, cands, seen)
    seen.add(first.key)
    parts = [first]
    if rng.random() < 0.6:  # a second re-derivation, computing something else
        second = pick(rng, candidates(rng, p, written, safe, avoid), seen)
        if second.key not in seen:
            seen.add(second.key)
            parts.append(second)
    body = [d.text for d in parts]
    if rng.random() < 0.35:  # after a re-derivation
        body.insert(rng.randint(1, len(body)), deduction(rng, p, written))
    if rng.random() < 0.35:  # anywhere
        body.insert(rng.randint(0, len(body)), contrast(rng, p, written))
    lead = body[0].lstrip()
    if lead.startswith(_MERGE) and rng.random() < 0.5:  # "Wait, let me check: ..."
        body[0] = " " + (lead[0].lower() + lead[1:] if lead.startswith("Let") else lead)
        return " Wait," + "".join(body)
    return _opener(rng, first) + "".join(body)


def _catch(rng: random.Random, p: Problem, written: list[Step], i: int) -> str:
    """The round that catches the slip in step i and carries the right values forward."""
    a, op, b, w = written[i]
    c = OPS[op](a, b)
    right = (a, op, b, c)
    fix = f" {a} {op} {b} is {c}, not {w}."
    forms = [
        " Wait," + fix,
        f" Wait, {w} is wrong." + fix,
        f" Wait, let me check {a} {op} {b} again."
        + rng.choice(routes(right) or [""])
        + " So"
        + fix,
        f" Wait, let me check {a} {op} {b} again: {equation(right)}. So" + fix,
    ]
    if op in "+-" and OPS[INVERSE[op]](w, b) >= 0:
        back = OPS[INVERSE[op]](w, b)
        forms.append(f" Wait, let me check: {w} {INVERSE[op]} {b} = {back}, not {a}. So" + fix)
    text = rng.choice(forms)
    fixed = as_written(p.steps)
    old = written[-1][3]
    for step in fixed[i + 1 :]:
        text += rng.choice((" Then", " So", "")) + f" {equation(step)}."
    if rng.random() < 0.6:
        text += rng.choice(
            (
                f" So {subject(p)} {verb_has(p)} {counted(p.answer, p.noun)}, not {old}.",
                f" So {subject(p)} {verb_has(p)} {counted(p.answer, p.noun)}.",
            )
        )
    return text


# --- The teacher ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceMeta:
    """What `teacher_trace_meta` drew for one trace (the text is what the tests check)."""

    difficulty: float
    level: str
    rounds: int  # reflection rounds written
    slip: bool
    answer: int
    slip_step: int | None = None  # index into Problem.steps
    slip_value: int | None = None  # the wrong result written
    caught_round: int | None = None  # 1-based round that corrects it


def teacher_trace_meta(problem: Problem, rng: random.Random) -> tuple[str, TraceMeta]:
    """`teacher_trace` and what was drawn for it; the same draws, so the same text."""
    d = difficulty(problem)
    k = draw_rounds(rng, d)
    slip_step = slip_value = caught = None
    written = as_written(problem.steps)
    if rng.random() < p_slip(d):
        i = rng.randrange(len(problem.steps))
        ok = [
            w
            for w in slip_candidates(*problem.steps[i])
            if min(s[3] for s in as_written(problem.steps, i, w)) >= 0
        ]
        if ok:
            slip_step, slip_value = i, rng.choice(ok)
            written = as_written(problem.steps, i, slip_value)
            k = max(k, 1)
            # Found in the first rounds: before it only honest checks of other things fit
            # (another step, or the question re-read), and there are few of those.
            caught = rng.randint(1, min(k, _FIND_BY[len(problem.steps)]))
    text = opening(rng, problem) + work(rng, problem, written)
    seen = {Derivation("verify", s, f" {equation(s)}.").key for s in written}
    written_rounds = 0
    for r in range(1, k + 1):
        if length_words(text) > _BUDGET:  # out of room: conclude (after the catch, if due)
            if caught is None or caught < r:
                break
            caught = r
        written_rounds = r
        if r == caught:
            text += _catch(rng, problem, written, slip_step)
            written = as_written(problem.steps)
            continue
        pending = caught is not None and r < caught
        safe = [i for i in range(len(written)) if not (pending and i == slip_step)]
        avoid = expression(written[slip_step]) if pending else None
        text += _round(rng, problem, written, safe, seen, avoid)
    text += conclusion(rng, problem, text)
    meta = TraceMeta(
        difficulty=d,
        level=level(d),
        rounds=written_rounds,
        slip=slip_step is not None,
        answer=problem.answer,
        slip_step=slip_step,
        slip_value=slip_value,
        caught_round=caught,
    )
    return text, meta


def teacher_trace(problem: Problem, rng: random.Random) -> str:
    """The reflective teacher's answer text for `problem` (leading space, as after "Answer:"),
    ending with `final_line(problem.answer)`: the signature of `zoo.teacher.teacher_trace`."""
    return teacher_trace_meta(problem, rng)[0]
