"""The reflective teacher (`zoo.rounds`): rounds, slips and corrections, checked on the text.

Thousands of seeded traces, no models. Distributions are measured by parsing the traces
(`parse_trace`), not read from the teacher's own record of what it drew; where both exist they
must agree. Today's teacher (`zoo.teacher`) is the no-loop control.
"""

from __future__ import annotations

import inspect
import json
import random
import re

import numpy as np
import pytest

from xcoder_jax.lexicon import (
    CATEGORIES,
    count_everyday_markers,
    count_markers,
    count_reasoning_markers,
)
from xcoder_jax.zoo import corpus, rounds
from xcoder_jax.zoo.corpus import Problem, final_line, make_problems
from xcoder_jax.zoo.evaluation import final_answer
from xcoder_jax.zoo.rounds import (
    MAX_WORDS,
    TraceMeta,
    difficulty,
    teacher_trace,
    teacher_trace_meta,
)
from xcoder_jax.zoo.teacher import teacher_trace as no_loop_trace
from xcoder_jax.zoo.trace_reading import (
    LEVELS,
    length_words,
    parse_rounds,
    parse_trace,
    trace_stats,
)

N = 3000
_THUS = re.compile(r"Thus, [^.\d]*(\d+)[^.\d]*\.")  # "Thus, Tom has 7 apples." -> 7


def _traces(seed, n=N):
    rng = random.Random(seed)
    problems = make_problems(rng, n)
    return [(p, *teacher_trace_meta(p, rng)) for p in problems]


@pytest.fixture(scope="module")
def rows():
    """(problem, trace, meta, parsed) for N seeded problems."""
    return [(p, t, m, parse_trace(t)) for p, t, m in _traces("teacher-test-0")]


@pytest.fixture(scope="module")
def stats(rows):
    return trace_stats([(t, m) for _, t, m, _ in rows])


def _problem(steps, kind):
    gain = ("buy", "bought") if kind in ("gain", "two_step") else None
    lose = ("give", "gave") if kind in ("lose", "two_step") else None
    return Problem("q", steps, kind, "Tom", ("apple", "apples"), gain=gain, lose=lose)


def test_difficulty_orders_problems_and_drives_the_draws():
    easy = _problem(((3, "+", 4, 7),), "gain")
    small_product = _problem(((2, "*", 2, 4),), "groups")
    carry = _problem(((8, "+", 7, 15),), "gain")
    two_step = _problem(((9, "+", 6, 15), (15, "-", 8, 7)), "two_step")
    big_product = _problem(((5, "*", 5, 25),), "groups")
    ds = [difficulty(p) for p in (easy, small_product, carry, two_step, big_product)]
    assert ds == sorted(ds) and len(set(ds)) == 5, ds
    assert ds[0] == pytest.approx(0.07) and ds[-1] == pytest.approx(0.75)
    assert [rounds.level(d) for d in ds] == ["easy", "medium", "medium", "hard", "hard"]
    for f in (rounds.p_first, rounds.p_more, rounds.p_slip):
        values = [f(d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
        assert values == sorted(values) and values[0] < values[-1] and 0 < min(values)
        assert max(values) <= 1
    assert rounds.p_more(1.0) < 1  # the tail ends


def test_same_seed_same_traces_and_the_entry_mirrors_todays_teacher():
    a, b = _traces(5, 300), _traces(5, 300)
    assert [(t, m) for _, t, m in a] == [(t, m) for _, t, m in b]
    assert [t for _, t, _ in _traces(6, 300)] != [t for _, t, _ in a]
    # teacher_trace makes the same draws as the meta variant, so the same text.
    rng1, rng2 = random.Random(9), random.Random(9)
    for p in make_problems(random.Random(1), 200):
        assert teacher_trace(p, rng1) == teacher_trace_meta(p, rng2)[0]
    # Same signature as today's teacher, so texts.py can switch with one import.
    assert list(inspect.signature(teacher_trace).parameters) == list(
        inspect.signature(no_loop_trace).parameters
    )
    p = a[0][0]
    doc = corpus.document(p, teacher_trace(p, random.Random(0)))
    assert doc.startswith(p.prompt + " ") and final_answer(doc) == str(p.answer)


def test_rounds_parse_with_the_declared_distributions(rows, stats):
    ks = np.array([len(parsed.rounds) for _, _, _, parsed in rows])
    assert all(len(parsed.rounds) == m.rounds for _, _, m, parsed in rows)
    assert stats["rounds"]["mean"] == pytest.approx(ks.mean(), abs=1e-3)
    # Most traces reflect; the count has a geometric-like tail: each count from 1 on is rarer
    # than the one before, and a long tail of 4+ rounds exists.
    assert 0.75 <= np.mean(ks >= 1) <= 0.95
    counts = np.bincount(ks)
    assert all(counts[i] > counts[i + 1] for i in range(1, 7)), counts
    assert np.mean(ks >= 4) >= 0.08 and ks.max() >= 10
    # Harder problems reflect more (per level, and along the difficulty score).
    by = stats["rounds_by_level"]
    means = [by[lv]["mean"] for lv in LEVELS]
    assert means[0] < means[1] < means[2] and means[2] - means[0] >= 1.0, means
    tails = [by[lv]["frac_ge_4"] for lv in LEVELS]
    assert tails[0] < tails[1] < tails[2] and tails[2] >= 0.2, tails
    assert all(by[lv]["n"] >= 300 for lv in LEVELS)
    d = np.array([m.difficulty for _, _, m, _ in rows])
    assert np.corrcoef(np.argsort(np.argsort(d)), np.argsort(np.argsort(ks)))[0, 1] > 0.2
    # Lengths in words (whitespace split): from about 40 to about 400, with a tail.
    words = stats["length_words"]
    assert 25 <= words["min"] and words["max"] <= MAX_WORDS
    assert 55 <= words["median"] <= 110 and 110 <= words["p90"] <= 220, words
    lengths = np.array([length_words(t) for _, t, _, _ in rows])
    assert words["median"] == np.median(lengths) and np.mean(lengths >= 200) >= 0.01
    assert stats["length_pieces"]["median"] > words["median"]  # digits count singly there
    json.dumps(stats, allow_nan=False)  # strict JSON for the zoo report


def test_slips_are_caught_later_and_the_answer_is_always_right(rows, stats):
    n_slipped = n_late = 0
    for p, t, m, parsed in rows:
        assert t.endswith(final_line(p.answer)) and final_answer(t) == str(p.answer)
        assert parsed.answer == p.answer and t.count("The answer is") == 1
        assert bool(parsed.slips) == m.slip and len(parsed.slips) <= 1
        corrections = [(r, c) for r, rd in enumerate(parsed.rounds) for c in rd.corrections]
        if not m.slip:
            assert not corrections  # nothing is "corrected" that was right
            assert all(e.true for rd in parsed.rounds for e in rd.equations)
            assert all(e.true for e in parsed.work_equations)
            continue
        n_slipped += 1
        (slip,) = parsed.slips
        a, op, b, c = p.steps[m.slip_step]
        # The slip is in the work: the step's own operands with a wrong result...
        assert slip.where == -1 and slip.equation.lhs == f"{a} {op} {b}"
        assert slip.equation.value == m.slip_value != c
        # ...corrected by a later round, the one the teacher meant, and by that round only.
        assert slip.corrected_in == m.caught_round - 1
        assert [(r, x.lhs, x.right, x.wrong) for r, x in corrections] == [
            (slip.corrected_in, f"{a} {op} {b}", c, m.slip_value)
        ]
        # Rounds before the catch found nothing and never redid the slipped step; every other
        # equation in the trace is true.
        before = parsed.rounds[: slip.corrected_in]
        assert not any(e.lhs == slip.equation.lhs for rd in before for e in rd.equations)
        n_late += slip.corrected_in > 0
        others = [e for e in parsed.work_equations if e != slip.equation]
        assert all(e.true for e in others + [e for rd in parsed.rounds for e in rd.equations])
        # The wrong value is carried into the next step and into what the rounds before the
        # catch conclude; right after the correction the right value is carried forward.
        caught = parsed.rounds[slip.corrected_in].text
        fix = caught.index(f"{a} {op} {b} is {c}, not {m.slip_value}.")
        wrong_final = parsed.work_equations[-1].value
        if m.slip_step + 1 < len(p.steps):
            _, op2, b2, c2 = p.steps[m.slip_step + 1]
            assert parsed.work_equations[-1].lhs == f"{m.slip_value} {op2} {b2}"
            assert caught.index(f"{c} {op2} {b2} = {c2}.") > fix
        assert wrong_final != p.answer
        for r, rd in enumerate(parsed.rounds):
            said = [int(x) for x in _THUS.findall(rd.text)]
            assert all(v == (wrong_final if r < slip.corrected_in else p.answer) for v in said)
    # Slips are common, more so for hard problems; some are found only after a round that
    # found nothing.
    assert 0.12 <= n_slipped / len(rows) <= 0.3
    assert n_late >= 0.2 * n_slipped
    slip_rates = [stats["rounds_by_level"][lv]["slip_rate"] for lv in LEVELS]
    assert slip_rates == sorted(slip_rates) and slip_rates[2] >= 2 * slip_rates[0], slip_rates
    assert stats["slip_rate"] == pytest.approx(n_slipped / len(rows), abs=1e-4)
    assert stats["correction_rate"] == 1.0 and stats["final_correct_rate"] == 1.0


_REDERIVES = re.compile(r"so I (add|subtract|multiply)")


def test_every_round_opens_with_a_reasoning_wait_and_no_marker_is_everyday(rows):
    used = dict.fromkeys(CATEGORIES, 0)
    for p, t, m, parsed in rows:
        moves = count_reasoning_markers(t)
        assert moves["self_reflection"] == len(parsed.rounds) == len(parse_rounds(t))
        assert count_markers(t) == moves  # every marker word is a reasoning move...
        assert not any(count_everyday_markers(t).values())  # ...none an everyday use
        for r, rd in enumerate(parsed.rounds):
            assert rd.text.startswith(" Wait,") and rd.moves["self_reflection"] == 1
            # A real re-derivation: something computed (an equation, a correction, counting on
            # or down or by a number), or, only while a one-step problem's slip awaits its
            # catch, the question re-read and the operation chosen again.
            for seq in rd.counts:
                steps = set(np.diff(seq).tolist())
                assert len(steps) == 1 and 0 not in steps, seq
            if not rd.computes:
                assert m.slip and len(p.steps) == 1 and r < m.caught_round - 1
                assert _REDERIVES.search(rd.text)
        rereads = [rd.text for rd in parsed.rounds if not rd.computes]
        assert len(set(rereads)) == len(rereads)  # never the same re-reading twice
        # "Therefore," is the conclusion, once, right before the final line.
        assert t.count("Therefore") == 1 and parsed.conclusion.startswith(" Therefore,")
        assert "Wait" not in parsed.work + parsed.conclusion
        for c in CATEGORIES:
            used[c] += moves[c] > 0
    assert all(n >= 0.2 * len(rows) for n in used.values()), used


def _sentence_categories(text):
    """The reasoning-move categories of each sentence, in order ("Wait" left out)."""
    out = []
    for s in re.split(r"(?<=[.?!])\s+", text.strip()):
        cats = [c for c, n in count_reasoning_markers(s).items() if n and c != "self_reflection"]
        out += cats
    return tuple(out)


def test_pieces_come_in_varied_order_unlike_the_no_loop_teacher(rows):
    round_orders, trace_orders = set(), set()
    thus_mid_trace = 0
    for _, t, _, parsed in rows:
        trace_orders.add(_sentence_categories(t))
        for rd in parsed.rounds:
            round_orders.add(_sentence_categories(rd.text))
        thus_mid_trace += any("Thus," in rd.text for rd in parsed.rounds[:-1])
    # Contrast before and after a re-derivation, a deduction inside a round, and a deduction
    # followed by more reflection.
    for order in [("contrastive", "verification"), ("verification", "contrastive")]:
        assert order in round_orders
    assert ("contrastive", "alternative") in round_orders
    assert ("alternative", "contrastive") in round_orders
    assert ("verification", "deductive") in round_orders
    assert ("alternative", "deductive", "contrastive") in round_orders
    assert thus_mid_trace >= 0.1 * len(rows)
    assert len(trace_orders) >= 300
    # Today's teacher: one fixed order in every trace.
    fixed = ["self_reflection", "verification", "alternative", "contrastive", "deductive"]
    rng = random.Random(0)
    old = [no_loop_trace(p, rng) for p in make_problems(rng, 500)]
    for t in old:
        order = [fixed.index(c) for c in _sentence_categories(t)]
        assert order == sorted(order), t


def test_the_no_loop_teacher_reflects_at_most_once(rows):
    rng = random.Random("no-loop")
    problems = make_problems(rng, 2000)
    old = [no_loop_trace(p, rng) for p in problems]
    ks = np.array([len(parse_rounds(t)) for t in old])
    assert ks.max() == 1 and 0.8 <= ks.mean() <= 0.97
    for t in old:
        assert count_reasoning_markers(t)["self_reflection"] == len(parse_rounds(t))
    s = trace_stats([(t, None) for t in old])
    assert s["rounds"]["max"] == 1 and s["rounds"]["frac_ge_4"] == 0.0
    assert s["slip_rate"] == 0.0 and s["correction_rate"] is None
    assert s["final_correct_rate"] is None  # no meta, no answer to compare with
    assert s["length_words"]["max"] < 70
    assert all(v["n"] == 0 and v["mean"] is None for v in s["rounds_by_level"].values())
    json.dumps(s, allow_nan=False)
    # The reflective teacher on the same kind of problems loops.
    assert max(len(parsed.rounds) for *_, parsed in rows) >= 10


def _meta(answer, lv="easy"):
    return TraceMeta(difficulty=0.1, level=lv, rounds=0, slip=False, answer=answer)


def test_stats_and_parsing_of_hand_written_traces():
    caught = (
        " 7 + 5 = 13. Wait, let me check: 13 - 5 = 8, not 7. So 7 + 5 is 12, not 13."
        " Therefore, it is 12. The answer is 12."
    )
    plain = " 3 + 4 = 7. Therefore, it is 7. The answer is 7."
    missed = " 3 + 4 = 8. Wait, hmm. Let me check: 8 - 4 = 4. The answer is 8."
    looped = (
        " 2 * 3 = 6. Wait, let me check: 6 / 3 = 2. Yes. Wait, is 6 right? Alternatively,"
        " 3 * 2 = 6. Thus, it is 6. Therefore, the result is 6. The answer is 6."
    )
    # A correction must come later, name the false equation and be right itself.
    early = " Wait, 3 + 4 is 7, not 8. 3 + 4 = 8. Wait, hmm. The answer is 7."
    false_fix = " 3 + 4 = 8. Wait, 3 + 4 is 6, not 8. The answer is 6."
    chain = " Wait, 4 + 4 + 4 = 12 and 10 - 3 = 7. 20 / 5 = 4. The answer is 4."

    p = parse_trace(looped)
    assert [r.text for r in p.rounds] == [
        " Wait, let me check: 6 / 3 = 2. Yes.",
        " Wait, is 6 right? Alternatively, 3 * 2 = 6. Thus, it is 6.",
    ]
    assert p.work == " 2 * 3 = 6." and p.answer == 6 and not p.slips
    assert p.conclusion == " Therefore, the result is 6. The answer is 6."
    assert p.rounds[1].moves["alternative"] == 1 and p.rounds[1].moves["deductive"] == 1
    (s,) = parse_trace(caught).slips
    assert (s.equation.lhs, s.equation.value, s.where, s.corrected_in) == ("7 + 5", 13, -1, 0)
    assert parse_trace(missed).slips[0].corrected_in is None
    assert parse_trace(early).slips[0].corrected_in is None
    assert parse_trace(false_fix).slips[0].corrected_in is None
    eqs = parse_rounds(chain)[0].equations
    assert [(e.lhs, e.value, e.true) for e in eqs] == [
        ("4 + 4 + 4", 12, True),
        ("10 - 3", 7, True),
        ("20 / 5", 4, True),
    ]

    s = trace_stats(
        [(caught, _meta(12)), (plain, _meta(7)), (missed, _meta(7, "hard")), (looped, _meta(6))]
    )
    assert s["n_traces"] == 4
    assert s["rounds"]["counts"] == {"0": 1, "1": 2, "2": 1} and s["rounds"]["mean"] == 1.0
    assert s["slip_rate"] == 0.5 and s["correction_rate"] == 0.5
    assert s["final_correct_rate"] == 0.75
    lengths = sorted(len(t.split()) for t in (caught, plain, missed, looped))
    assert s["length_words"]["max"] == lengths[-1] and s["length_words"]["min"] == lengths[0]
    assert s["length_words"]["median"] == (lengths[1] + lengths[2]) / 2
    assert s["rounds_by_level"]["easy"]["counts"] == {"0": 1, "1": 1, "2": 1}
    assert s["rounds_by_level"]["hard"]["slip_rate"] == 1.0
    assert s["rounds_by_level"]["medium"]["n"] == 0
    assert trace_stats([])["slip_rate"] is None


def test_a_trace_out_of_room_still_catches_its_slip(monkeypatch):
    # With no room for any round, a trace concludes at once, unless a slip awaits its catch:
    # then the catch comes first, in round 1.
    monkeypatch.setattr(rounds, "_BUDGET", 0)
    rows = _traces(11, 600)
    assert any(m.slip for *_, m in rows) and not all(m.slip for *_, m in rows)
    for p, t, m in rows:
        parsed = parse_trace(t)
        assert len(parsed.rounds) == m.rounds == int(m.slip)
        assert parsed.answer == p.answer
        if m.slip:
            assert m.caught_round == 1 and parsed.slips[0].corrected_in == 0


@pytest.mark.parametrize("name", ["no_loop", "rounds"])
def test_the_zoo_config_picks_the_teacher_and_reports_its_traces(name):
    from configs import tiny
    from xcoder_jax.zoo.build_config import config_hash
    from xcoder_jax.zoo.texts import make_texts

    c = tiny.get_config()
    default_hash = config_hash(c)
    c.zoo.n_train_problems, c.zoo.n_relation_docs, c.zoo.n_everyday_docs = 400, 20, 20
    c.zoo.n_extract_docs, c.zoo.n_heldout_problems, c.zoo.n_val_problems = 20, 5, 10
    c.zoo.teacher = name
    c.zoo.control_teacher = "no_loop"
    texts = make_texts(c)
    report = texts["teacher"]
    assert report["name"] == name and report["n_traces"] == 400
    traces = [parse_rounds(t) for t in texts["train_distill"][:400]]
    if name == "no_loop":
        assert report["rounds"]["max"] <= 1 and report["slip_rate"] == 0
        assert max(len(r) for r in traces) <= 1
    else:
        assert report["rounds"]["max"] >= 4 and 0 < report["slip_rate"] < 0.5
        assert report["correction_rate"] == 1.0 and report["final_correct_rate"] == 1.0
        by = report["rounds_by_level"]
        assert by["easy"]["mean"] < by["hard"]["mean"]
    # The negative-control pair's teacher writes at most one reflection per trace, on the
    # same problems (the documents' questions match one for one).
    control = [parse_rounds(t) for t in texts["train_no_loop"][:400]]
    assert max(len(r) for r in control) <= 1 and texts["control_teacher"]["rounds"]["max"] <= 1
    question = lambda doc: doc.split("\nAnswer:")[0]
    assert list(map(question, texts["train_no_loop"][:400])) == list(
        map(question, texts["train_distill"][:400])
    )
    # The sham arm sees no trace text: its problems are the base's concise solutions (no
    # marker used to reason), and the rest is the replay every distilled arm also gets.
    sham, base = texts["train_sham"], set(texts["train_base"])
    problems = [d for d in sham if d.startswith("Question:")]
    assert len(problems) == 400 and all(d in base for d in problems)
    assert not any(sum(count_reasoning_markers(d).values()) for d in problems)
    # Every arm replays a prefix of one order of paragraphs, at the same share of its text.
    replays = {}
    for arm in ("sham", "distill", "no_loop"):
        docs = texts[f"train_{arm}"]
        replays[arm] = [d for d in docs if not d.startswith("Question:")]
        own = sum(len(d) for d in docs if d.startswith("Question:"))
        got = sum(map(len, replays[arm]))
        longest = max(map(len, replays[arm]))
        assert c.zoo.replay_frac * own <= got < c.zoo.replay_frac * own + longest, arm
    longest = max(replays.values(), key=len)
    assert all(r == longest[: len(r)] for r in replays.values())
    assert not any(count_reasoning_markers(d)["self_reflection"] for d in longest)
    # Held-out problems for the convergence check are none of the training ones.
    val_q = {question(d) for d in texts["val_base"] if d.startswith("Question:")}
    assert val_q and not val_q & set(map(question, texts["train_base"]))
    if name == "rounds":  # re-reading retells the question's events in words
        retold = [m for d in texts["train_distill"] for m in re.findall(r"again\. ([^.]*)", d)]
        retold = [t for t in retold if t.startswith(("There were", *corpus.NAMES))]
        spelled = [t for t in retold if set(t.split()) & set(corpus.NUMBER_WORDS)]
        assert len(retold) >= 20 and len(spelled) >= 0.8 * len(retold)
    # The default teacher is the reflective one; another one is a new zoo.
    c2 = tiny.get_config()
    c2.zoo.teacher = name
    assert (config_hash(c2) == default_hash) == (name == "rounds")
