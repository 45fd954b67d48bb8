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
"""

from __future__ import annotations

import dataclasses
import random

from xcoder_jax.zoo.corpus import NUMBER_WORDS, Problem, final_line
from xcoder_jax.zoo.trace_reading import length_words, read_equations

MAX_ROUNDS = 16
MAX_WORDS = 400  # no trace is longer (words of a whitespace split)
# No round starts past this length: a round and the conclusion fit in what is left.
_BUDGET = MAX_WORDS - 70
_FIND_BY = {1: 2, 2: 3}  # latest round that catches a slip, by the problem's number of steps

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INVERSE = {"+": "-", "-": "+", "*": "/"}
_VERB = {"+": "add", "-": "subtract", "*": "multiply"}

Step = tuple[int, str, int, int]


# --- Difficulty and the draws that depend on it --------------------------------------------


def _crosses_ten(a: int, op: str, b: int) -> bool:
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
        float(any(_crosses_ten(a, op, b) for a, op, b, _ in steps)),
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


def _draw_rounds(rng: random.Random, d: float) -> int:
    if rng.random() >= p_first(d):
        return 0
    k = 1
    while k < MAX_ROUNDS and rng.random() < p_more(d):
        k += 1
    return k


def _slip_candidates(a: int, op: str, b: int, c: int) -> list[int]:
    """Wrong results a person plausibly writes for a op b = c."""
    out = [c - 1, c + 1]
    if 10 <= c <= 99 and c % 10 and c // 10 != c % 10:
        out.append(int(str(c)[::-1]))  # swapped digits
    if op == "*":
        out += [a * (b + 1), a * (b - 1)]  # a neighbouring fact of the table
    elif _crosses_ten(a, op, b):
        if op == "+":
            out.append(c - 10)  # the carry forgotten
        else:  # the borrow forgotten: the smaller digit taken from the larger
            out.append((a // 10 - b // 10) * 10 + abs(a % 10 - b % 10))
    return sorted({v for v in out if v >= 0 and v != c})


def _carry(steps: tuple[Step, ...], i: int | None = None, value: int = 0) -> list[Step]:
    """`steps` as written when step i's result is `value`: a later step whose left operand was
    the previous result uses the written one and is computed from it (correctly)."""
    out: list[Step] = []
    for j, (a, op, b, _) in enumerate(steps):
        if j > 0 and a == steps[j - 1][3]:
            a = out[j - 1][3]
        out.append((a, op, b, value if j == i else _OPS[op](a, b)))
    return out


# --- Wording --------------------------------------------------------------------------------


def _n(n: int, noun: tuple[str, str]) -> str:
    return f"{n} {noun[0] if n == 1 else noun[1]}"


def _who(p: Problem) -> str:
    return "they" if p.kind == "together" else p.name


def _has(p: Problem) -> str:
    return "have" if p.kind == "together" else "has"


def _new(n: int) -> str:
    """ "3 new ones" / "1 new one"."""
    return f"{n} new {'one' if n == 1 else 'ones'}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _eq(step: Step) -> str:
    a, op, b, v = step
    return f"{a} {op} {b} = {v}"


def _expr(step: Step) -> str:
    a, op, b, _ = step
    return f"{a} {op} {b}"


def _inverse(step: Step) -> str:
    a, op, b, v = step
    return f"{v} {_INVERSE[op]} {b} = {a}"


def _word(n: int) -> str:
    """A count in words up to twenty ("seven"), in digits beyond."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _restate(p: Problem, words: bool = False) -> str:
    """The question's quantities in a clause, without arithmetic. With `words`, its events
    retold: counts spelled out, verbs in the past tense, nouns in number agreement ("Tom had
    seven apples and gave three of them"), the words the relation sentences teach, met here
    in reasoning."""
    a, _, b, _ = p.steps[0]
    num = _word if words else str
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


def _focus(p: Problem) -> str:
    """What the question asks, e.g. "how many apples Tom has left"."""
    tail = {"lose": " left", "together": " together", "groups": " in all"}.get(p.kind, " now")
    return f"how many {p.noun[1]} {_who(p)} {_has(p)}{tail}"


def _ops_named(p: Problem) -> str:
    ops = [_VERB[op] for _, op, _, _ in p.steps]
    return " and then ".join(ops)


def _opening(rng: random.Random, p: Problem) -> str:
    first = rng.choice(
        (" Let me think.", " Let me think step by step.", " Let me see.", " Hmm, let me see.")
    )
    return first + rng.choice(
        (
            f" Okay, so {_restate(p)}, and I need {_focus(p)}.",
            f" {_cap(_restate(p))}. The question asks {_focus(p)}.",
            f" I need {_focus(p)}. {_cap(_restate(p))}.",
            f" The question asks {_focus(p)}. So {_restate(p)}.",
        )
    )


def _work(rng: random.Random, p: Problem, written: list[Step]) -> str:
    """The worked steps as written (a slipped step included), narrated a little differently
    each time."""
    out = []
    name, plural = p.name, p.noun[1]
    for i, step in enumerate(written):
        a, op, b, v = step
        if p.kind == "two_step":
            leads = (
                (" First,", f" First, {name} gets {b} more.", f" First I add the {_new(b)}.")
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
        out.append(f"{rng.choice(leads)} {_eq(step)}.")
    return "".join(out)


def _confirm(rng: random.Random, v: int) -> str:
    return rng.choice((" Yes.", " That works.", f" So {v} is right.", " Good.", ""))


def _verification(rng: random.Random, step: Step, inverse: bool) -> str:
    """A check of a (correct) step: by its inverse operation, or the step done again."""
    if not inverse:
        head = rng.choice((" Let me check {} again:", " Let me check {} once more:"))
        return head.format(_expr(step)) + f" {_eq(step)}." + _confirm(rng, step[3])
    return rng.choice(
        (
            f" Let me check: {_inverse(step)}.",
            f" Let me check it backwards: {_inverse(step)}.",
            f" I can verify it: {_inverse(step)}.",
            f" To check, {_inverse(step)}.",
        )
    ) + _confirm(rng, step[3])


def _routes(step: Step) -> list[str]:
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
        if 10 < a < 20 and _crosses_ten(a, op, b):
            u = a - 10
            out.append(f" Alternatively, I go down to ten: {a} - {u} = 10 and 10 - {b - u} = {v}.")
    else:
        out.append(f" Alternatively, {a} bags of {b}: {' + '.join([str(b)] * a)} = {v}.")
        seq = ", ".join(str(b * i) for i in range(1, a + 1))
        out.append(f" Alternatively, I count by {b}s: {seq}.")
    return out


def _regroupings(p: Problem) -> list[str]:
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
            f" Alternatively, I take the {c} from the {_new(b)}: {b} - {c} = {b - c} "
            f"and {a} + {b - c} = {ans}."
        )
    return out


_REREAD = " Let me read the question again."


def _reread(p: Problem) -> str:
    """The question read again, its events retold in words, and the operation chosen again
    (no arithmetic)."""
    return f"{_REREAD} {_cap(_restate(p, words=True))}, so I {_ops_named(p)}."


def _contrast(rng: random.Random, p: Problem, written: list[Step]) -> str:
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


def _deduction(rng: random.Random, p: Problem, written: list[Step]) -> str:
    cur = written[-1][3]
    return rng.choice(
        (
            f" Thus, {_who(p)} {_has(p)} {_n(cur, p.noun)}.",
            f" Thus, the result is {cur}.",
            f" Thus, I get {cur}.",
        )
    )


_KINDS = ("verify", "alternative", "reread")
_KIND_WEIGHTS = (0.4, 0.4, 0.2)


@dataclasses.dataclass(frozen=True)
class _Derivation:
    kind: str  # one of _KINDS
    step: Step  # the step it re-derives (the last one for a regrouping)
    text: str

    @property
    def key(self) -> tuple:
        """What it computes: its equations, or its text when it has none (counting on)."""
        eqs = read_equations(self.text)[0]
        return tuple((e.lhs, e.value) for e in eqs) if eqs else (self.text,)


def _candidates(
    rng: random.Random, p: Problem, written: list[Step], safe: list[int], avoid: str | None
) -> list[_Derivation]:
    """Every re-derivation of a step in `safe` (written steps that are right), and of the
    whole problem by another grouping when every step is safe; phrasing drawn from `rng`.
    None computes `avoid` (the slipped step's "a op b" while its catch is due: checking step 1
    of "5 + 2 = 7, 7 - 2 = 4" by its inverse would compute 7 - 2 again)."""
    out = []
    for i in safe:
        step = written[i]
        out.append(_Derivation("verify", step, _verification(rng, step, inverse=True)))
        out.append(_Derivation("verify", step, _verification(rng, step, inverse=False)))
        out += [_Derivation("alternative", step, r) for r in _routes(step)]
        out.append(_Derivation("reread", step, _reread(p) + f" {_eq(step)}."))
    if p.kind == "two_step" and len(safe) == len(written):
        out += [_Derivation("alternative", written[-1], r) for r in _regroupings(p)]
    return [d for d in out if all(e.lhs != avoid for e in read_equations(d.text)[0])]


def _pick(rng: random.Random, cands: list[_Derivation], seen: set) -> _Derivation:
    """A re-derivation of a kind drawn by `_KIND_WEIGHTS`, preferring one that computes
    something not yet written in the trace (falling back to the other kinds, then repeats)."""
    kind = rng.choices(_KINDS, weights=_KIND_WEIGHTS)[0]
    for k in (kind,) + tuple(k for k in _KINDS if k != kind):
        fresh = [c for c in cands if c.kind == k and c.key not in seen]
        if fresh:
            return rng.choice(fresh)
    return rng.choice([c for c in cands if c.kind == kind] or cands)


_MERGE = ("Let me", "I can")


def _opener(rng: random.Random, first: _Derivation) -> str:
    v = first.step[3]
    common = (" Wait, let me make sure.", " Wait, let me think again.", " Wait, hmm.")
    if first.kind == "alternative":
        own = (" Wait, let me try another way.", " Wait, is there another way?")
    else:
        own = (
            f" Wait, is {v} right?",
            f" Wait, let me look at {_expr(first.step)} again.",
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
    `seen` (keys of what the trace has computed) is updated; `avoid` as in `_candidates`."""
    cands = _candidates(rng, p, written, safe, avoid)
    if not cands:  # the only step holds a slip a later round catches: re-read, don't redo
        rereads = [
            " let me read the question again." + _reread(p)[len(_REREAD) :],
            f" the question asks {_focus(p)}, so I {_ops_named(p)}.",
            f" do I {_ops_named(p)} here? {_cap(_restate(p))}, so I {_ops_named(p)}.",
        ]
        text = rng.choice([r for r in rereads if (r,) not in seen] or rereads)
        seen.add((text,))
        return " Wait," + text
    first = _pick(rng, cands, seen)
    seen.add(first.key)
    parts = [first]
    if rng.random() < 0.6:  # a second re-derivation, computing something else
        second = _pick(rng, _candidates(rng, p, written, safe, avoid), seen)
        if second.key not in seen:
            seen.add(second.key)
            parts.append(second)
    body = [d.text for d in parts]
    if rng.random() < 0.35:  # after a re-derivation
        body.insert(rng.randint(1, len(body)), _deduction(rng, p, written))
    if rng.random() < 0.35:  # anywhere
        body.insert(rng.randint(0, len(body)), _contrast(rng, p, written))
    lead = body[0].lstrip()
    if lead.startswith(_MERGE) and rng.random() < 0.5:  # "Wait, let me check: ..."
        body[0] = " " + (lead[0].lower() + lead[1:] if lead.startswith("Let") else lead)
        return " Wait," + "".join(body)
    return _opener(rng, first) + "".join(body)


def _catch(rng: random.Random, p: Problem, written: list[Step], i: int) -> str:
    """The round that catches the slip in step i and carries the right values forward."""
    a, op, b, w = written[i]
    c = _OPS[op](a, b)
    right = (a, op, b, c)
    fix = f" {a} {op} {b} is {c}, not {w}."
    forms = [
        " Wait," + fix,
        f" Wait, {w} is wrong." + fix,
        f" Wait, let me check {a} {op} {b} again."
        + rng.choice(_routes(right) or [""])
        + " So"
        + fix,
        f" Wait, let me check {a} {op} {b} again: {_eq(right)}. So" + fix,
    ]
    if op in "+-" and _OPS[_INVERSE[op]](w, b) >= 0:
        back = _OPS[_INVERSE[op]](w, b)
        forms.append(f" Wait, let me check: {w} {_INVERSE[op]} {b} = {back}, not {a}. So" + fix)
    text = rng.choice(forms)
    fixed = _carry(p.steps)
    old = written[-1][3]
    for step in fixed[i + 1 :]:
        text += rng.choice((" Then", " So", "")) + f" {_eq(step)}."
    if rng.random() < 0.6:
        text += rng.choice(
            (
                f" So {_who(p)} {_has(p)} {_n(p.answer, p.noun)}, not {old}.",
                f" So {_who(p)} {_has(p)} {_n(p.answer, p.noun)}.",
            )
        )
    return text


def _conclusion(rng: random.Random, p: Problem, before: str) -> str:
    """ "Therefore, ..." and the final line, not in the words of a "Thus, ..." just `before`."""
    ans = p.answer
    options = [
        f" Therefore, {_who(p)} {_has(p)} {_n(ans, p.noun)}.",
        f" Therefore, the result is {ans}.",
        f" Therefore, it is {ans}.",
    ]
    options = [o for o in options if not before.endswith(o.replace("Therefore", "Thus"))]
    return rng.choice(options) + final_line(ans)


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
    k = _draw_rounds(rng, d)
    slip_step = slip_value = caught = None
    written = _carry(problem.steps)
    if rng.random() < p_slip(d):
        i = rng.randrange(len(problem.steps))
        ok = [
            w
            for w in _slip_candidates(*problem.steps[i])
            if min(s[3] for s in _carry(problem.steps, i, w)) >= 0
        ]
        if ok:
            slip_step, slip_value = i, rng.choice(ok)
            written = _carry(problem.steps, i, slip_value)
            k = max(k, 1)
            # Found in the first rounds: before it only honest checks of other things fit
            # (another step, or the question re-read), and there are few of those.
            caught = rng.randint(1, min(k, _FIND_BY[len(problem.steps)]))
    text = _opening(rng, problem) + _work(rng, problem, written)
    seen = {_Derivation("verify", s, f" {_eq(s)}.").key for s in written}
    written_rounds = 0
    for r in range(1, k + 1):
        if length_words(text) > _BUDGET:  # out of room: conclude (after the catch, if due)
            if caught is None or caught < r:
                break
            caught = r
        written_rounds = r
        if r == caught:
            text += _catch(rng, problem, written, slip_step)
            written = _carry(problem.steps)
            continue
        pending = caught is not None and r < caught
        safe = [i for i in range(len(written)) if not (pending and i == slip_step)]
        avoid = _expr(written[slip_step]) if pending else None
        text += _round(rng, problem, written, safe, seen, avoid)
    text += _conclusion(rng, problem, text)
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
