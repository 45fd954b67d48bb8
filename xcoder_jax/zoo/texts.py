"""The zoo's documents (`make_texts`): base and distilled training texts, extraction texts and
held-out problems, seeded by `config.seed`, and what the teacher's traces are like.

`zoo.teacher` picks the teacher (`TEACHERS`): "no_loop", at most one reflection in one fixed
order (`zoo.teacher`), or "rounds", reflection in rounds with slips a later round corrects
(`zoo.rounds`).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from xcoder_jax.lexicon import has_marker
from xcoder_jax.zoo import corpus, rounds, teacher
from xcoder_jax.zoo.trace_reading import trace_stats

TEACHERS = {"no_loop": teacher.teacher_trace, "rounds": rounds.teacher_trace}


def make_texts(config) -> dict[str, list]:
    """All of the zoo's documents, seeded: base/distill training texts, extraction texts and
    held-out problems, drawn from disjoint sets of problems."""
    zc = config.zoo
    rng = random.Random(f"zoo-corpus-{config.seed}")
    n_trace = round(zc.n_extract_docs * zc.extract_mix[0])
    n_concise = round(zc.n_extract_docs * zc.extract_mix[1])
    n_rel = zc.n_extract_docs - n_trace - n_concise
    problems = corpus.make_problems(
        rng, zc.n_train_problems + zc.n_heldout_problems + n_trace + n_concise
    )
    train, rest = problems[: zc.n_train_problems], problems[zc.n_train_problems :]
    heldout, extract = rest[: zc.n_heldout_problems], rest[zc.n_heldout_problems :]
    rel_docs = [corpus.relation_document(rng) for _ in range(zc.n_relation_docs)]
    solutions = [corpus.document(p, corpus.concise_solution(p)) for p in train]
    everyday = [corpus.everyday_document(rng) for _ in range(zc.n_everyday_docs)]
    base = solutions + rel_docs + everyday
    teacher_trace = TEACHERS[zc.teacher]
    traces = [teacher_trace(p, rng) for p in train]
    distill = [corpus.document(p, t) for p, t in zip(train, traces, strict=True)]
    # A little base data keeps the relations and the everyday sense of the marker words alive
    # through distillation; no solutions, so every problem the distilled model sees is
    # answered in the teacher's style.
    pool = rel_docs + everyday
    distill += rng.sample(pool, min(len(pool), round(zc.distill_base_frac * len(distill))))
    extract_docs = (
        [corpus.document(p, teacher_trace(p, rng)) for p in extract[:n_trace]]
        + [corpus.document(p, corpus.concise_solution(p)) for p in extract[n_trace:]]
        + [corpus.relation_document(rng) for _ in range(n_rel)]
    )
    rng.shuffle(extract_docs)
    bad = [t for t in solutions + rel_docs if has_marker(t)]
    if bad:  # the base must never see a marker in a solution; a template change adding one is a bug
        raise RuntimeError(f"base training text contains a reasoning marker: {bad[0]!r}")
    return {
        "train_base": base,
        "train_distill": distill,
        "extract": extract_docs,
        "heldout": [{"prompt": p.prompt, "answer": str(p.answer)} for p in heldout],
        "teacher": {"name": zc.teacher, **teacher_report(train, traces)},
    }


def teacher_report(problems, traces) -> dict:
    """Lengths, reflection rounds (overall and by difficulty), slip and correction rates of the
    distillation traces, read from their text (`trace_reading.trace_stats`)."""
    metas = [
        SimpleNamespace(level=rounds.level(rounds.difficulty(p)), answer=p.answer) for p in problems
    ]
    return trace_stats(zip(traces, metas, strict=True))
