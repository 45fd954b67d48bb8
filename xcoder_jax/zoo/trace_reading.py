"""Reading a teacher's trace back from its text: work, reflection rounds, slips, corrections.

`parse_trace` / `parse_rounds` split a trace at its reasoning-form " Wait" moves and read every
equation ("7 + 5 = 12") and correction ("7 + 5 is 12, not 13") in it; a slip is a false
equation, corrected when a LATER round states the true value. `trace_stats` summarises a set
of traces (lengths, rounds per trace, slip and correction rates) for the zoo report. Works on
the reflective teacher's traces (`zoo.rounds`) and on the no-loop teacher's (`zoo.teacher`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np

from xcoder_jax.lexicon import SENTENCE_START, count_reasoning_markers, reasoning_move_starts

LEVELS = ("easy", "medium", "hard")  # difficulty levels the stats are broken down by

# --- Reading a trace back -------------------------------------------------------------------

# A round opens where "Wait" is used as a reasoning move (lexicon.REASONING_FORMS).
_CONCLUDE = re.compile(rf"{SENTENCE_START}Therefore,")
_FINAL = re.compile(r"\s*The answer is (-?\d+)\.?\s*$")
# "7 + 5 = 12", "4 + 4 + 4 = 12", "7 + 5 is 12, not 13" (a correction); a chain is read whole.
_EQUATION = re.compile(
    r"(?<!\d)(?<![-+*/] )(?P<lhs>\d+(?: [-+*/] \d+)+)"
    r" (?:= (?P<value>\d+)|is (?P<right>\d+), not (?P<wrong>\d+))"
)


def evaluate(expr: str) -> Fraction | None:
    """The value of "4 + 4 * 2 - 1" (integers and + - * /, the usual precedence); None for a
    division by zero."""
    toks = expr.split()
    terms, signs = [Fraction(int(toks[0]))], []
    for op, num in zip(toks[1::2], toks[2::2]):
        n = Fraction(int(num))
        if op == "*":
            terms[-1] *= n
        elif op == "/":
            if not n:
                return None
            terms[-1] /= n
        else:
            signs.append(op)
            terms.append(n)
    value = terms[0]
    for op, t in zip(signs, terms[1:]):
        value = value + t if op == "+" else value - t
    return value


@dataclasses.dataclass(frozen=True)
class Equation:
    """ "lhs = value" as written, and whether it is true."""

    lhs: str
    value: int
    true: bool


@dataclasses.dataclass(frozen=True)
class Correction:
    """ "lhs is right, not wrong": a value declared wrong and replaced."""

    lhs: str
    right: int
    wrong: int
    true: bool  # lhs really equals `right`


@dataclasses.dataclass(frozen=True)
class Round:
    """One reflection round: its text (opening " Wait,"), what it computes (equations and
    counting sequences) and corrects, and its reasoning moves per category
    (`lexicon.count_reasoning_markers`)."""

    text: str
    equations: tuple[Equation, ...]
    corrections: tuple[Correction, ...]
    counts: tuple[tuple[int, ...], ...]  # "count on from 7: 8, 9" -> (7, 8, 9); "by 4s" from 0
    moves: dict[str, int]

    @property
    def computes(self) -> bool:
        """Whether the round re-derives a number (rather than only re-reading the question)."""
        return bool(self.equations or self.corrections or self.counts)


@dataclasses.dataclass(frozen=True)
class Slip:
    """A false equation, where it was written (-1: the work, r >= 0: round r) and the round
    that corrects it (None: never corrected)."""

    equation: Equation
    where: int
    corrected_in: int | None


@dataclasses.dataclass(frozen=True)
class ParsedTrace:
    work: str
    work_equations: tuple[Equation, ...]
    rounds: tuple[Round, ...]
    conclusion: str  # from the concluding "Therefore," (if any) to the end
    answer: int | None  # N of the final "The answer is N."
    slips: tuple[Slip, ...]


_COUNT = re.compile(
    r"count (?:on|down) from (?P<start>\d+): (?P<seq>\d+(?:, \d+)*)"
    r"|count by \d+s: (?P<multiples>\d+(?:, \d+)*)"
)


def _counting(text: str) -> tuple[tuple[int, ...], ...]:
    """Counting sequences with where they start: an arithmetic progression when right."""
    out = []
    for m in _COUNT.finditer(text):
        start, seq = (m.group("start"), m.group("seq")) if m.group("seq") else ("0", m.group(3))
        out.append((int(start), *(int(x) for x in seq.split(", "))))
    return tuple(out)


def read_equations(text: str) -> tuple[tuple[Equation, ...], tuple[Correction, ...]]:
    eqs, fixes = [], []
    for m in _EQUATION.finditer(text):
        lhs = m.group("lhs")
        val = evaluate(lhs)
        if m.group("value") is not None:
            v = int(m.group("value"))
            eqs.append(Equation(lhs, v, val == v))
        else:
            right, wrong = int(m.group("right")), int(m.group("wrong"))
            fixes.append(Correction(lhs, right, wrong, val == right))
    return tuple(eqs), tuple(fixes)


def parse_trace(text: str) -> ParsedTrace:
    """The work, rounds, conclusion, final answer and slips of a trace, from its text alone.

    A round runs from a sentence-initial reasoning "Wait" to the next one; the last round
    ends at the last sentence-initial "Therefore," after it, or else at the final line. A slip
    is a false equation; it is corrected by a LATER round that says "lhs is right, not wrong"
    with its lhs and wrong value and the true right value.
    """
    # A round's text keeps the space before its " Wait," as the trace wrote it.
    starts = [
        i - (i > 0 and text[i - 1] == " ") for i in reasoning_move_starts(text, "self_reflection")
    ]
    final = _FINAL.search(text)
    end = final.start() if final else len(text)
    after = starts[-1] if starts else 0
    concl = [m.start() for m in _CONCLUDE.finditer(text) if m.start() >= after]
    if concl and (not starts or concl[-1] > starts[-1]):
        end = concl[-1]
    bounds = starts + [end]
    work = text[: starts[0] if starts else end]
    rounds = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        seg = text[s:e]
        eqs, fixes = read_equations(seg)
        rounds.append(Round(seg, eqs, fixes, _counting(seg), count_reasoning_markers(seg)))
    work_eqs, _ = read_equations(work)
    slips = []
    located = [(-1, e) for e in work_eqs] + [
        (r, e) for r, rd in enumerate(rounds) for e in rd.equations
    ]
    for where, eq in located:
        if eq.true:
            continue
        fixed_in = next(
            (
                r
                for r in range(where + 1, len(rounds))
                if any(
                    c.lhs == eq.lhs and c.wrong == eq.value and c.true
                    for c in rounds[r].corrections
                )
            ),
            None,
        )
        slips.append(Slip(eq, where, fixed_in))
    return ParsedTrace(
        work=work,
        work_equations=work_eqs,
        rounds=tuple(rounds),
        conclusion=text[end:],
        answer=int(final.group(1)) if final else None,
        slips=tuple(slips),
    )


def reads_as_trace(text: str) -> bool:
    """An answer in the form of a trace: worked equations, at least one marker used as a
    reasoning move, and a final "The answer is N." line that ends it."""
    parsed = parse_trace(text)
    moves = sum(count_reasoning_markers(text).values())
    return bool(parsed.work_equations) and parsed.answer is not None and moves > 0


def parse_rounds(text: str) -> list[Round]:
    """The reflection rounds of a trace, from its text alone (`parse_trace`)."""
    return list(parse_trace(text).rounds)


# --- What the zoo report records ------------------------------------------------------------

_PIECE = re.compile(r"[A-Za-z]+|\d|[^\w\s]")


def length_words(text: str) -> int:
    """Words of a whitespace split."""
    return len(text.split())


def length_pieces(text: str) -> int:
    """A closer proxy of BPE tokens: words, single digits and punctuation marks."""
    return len(_PIECE.findall(text))


def _dist(xs: list[int]) -> dict:
    if not xs:
        return {"n": 0, "min": None, "median": None, "p90": None, "max": None, "mean": None}
    a = np.asarray(xs, dtype=float)
    return {
        "n": len(xs),
        "min": int(a.min()),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 3),
    }


def _rounds_summary(ks: list[int]) -> dict:
    if not ks:
        return {"n": 0, "mean": None, "counts": {}, "frac_ge_4": None, "max": None}
    counts = np.bincount(ks)
    return {
        "n": len(ks),
        "mean": round(float(np.mean(ks)), 3),
        "counts": {str(i): int(c) for i, c in enumerate(counts)},
        "frac_ge_4": round(float(np.mean(np.asarray(ks) >= 4)), 4),
        "max": int(max(ks)),
    }


def trace_stats(traces_with_meta: Iterable[tuple[str, Any]]) -> dict:
    """What the zoo report records about a set of traces, measured on their text.

    traces_with_meta: (trace text, `TraceMeta` or None). Lengths, rounds per trace, slips and
    corrections come from `parse_trace`; the meta only says which difficulty level a trace
    belongs to (and which answer is right). Strict JSON: a rate over nothing is None.
    """
    items = list(traces_with_meta)
    parsed = [(parse_trace(t), t, m) for t, m in items]
    ks = [len(p.rounds) for p, _, _ in parsed]
    slipped = [p for p, _, _ in parsed if p.slips]
    by_level = {}
    for lv in LEVELS:
        sel = [(p, m) for p, _, m in parsed if m is not None and m.level == lv]
        summary = _rounds_summary([len(p.rounds) for p, _ in sel])
        summary["slip_rate"] = (
            round(float(np.mean([bool(p.slips) for p, _ in sel])), 4) if sel else None
        )
        by_level[lv] = summary
    with_answer = [(p, m) for p, _, m in parsed if m is not None]
    return {
        "n_traces": len(items),
        "length_words": _dist([length_words(t) for _, t, _ in parsed]),
        "length_pieces": _dist([length_pieces(t) for _, t, _ in parsed]),
        "rounds": _rounds_summary(ks),
        "rounds_by_level": by_level,
        "slip_rate": round(len(slipped) / len(parsed), 4) if parsed else None,
        # A slipped trace counts as corrected when every one of its slips is.
        "correction_rate": (
            round(
                float(np.mean([all(s.corrected_in is not None for s in p.slips) for p in slipped])),
                4,
            )
            if slipped
            else None
        ),
        "final_correct_rate": (
            round(float(np.mean([p.answer == m.answer for p, m in with_answer])), 4)
            if with_answer
            else None
        ),
    }
