"""The zoo's documents (`make_texts`): base and distilled training texts, extraction texts and
held-out problems, seeded by `config.seed`, and what the teacher's traces are like.

`zoo.teacher` picks the teacher (`TEACHERS`): "rounds", reflection in rounds with slips a later
round corrects (`zoo.rounds`), or "no_loop", at most one reflection in one fixed order
(`zoo.teacher`); `zoo.control_teacher` the negative-control pair's ("" for none).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np

from xcoder_jax.lexicon import has_marker
from xcoder_jax.zoo import corpus, rounds, teacher
from xcoder_jax.zoo.trace_reading import trace_stats

TEACHERS = {"no_loop": teacher.teacher_trace, "rounds": rounds.teacher_trace}


def make_texts(config) -> dict[str, list]:
    """All of the zoo's documents, seeded, drawn from disjoint sets of problems.

    Training corpora, one per model the zoo trains from the base (`workdir.ARMS`):
    "train_base" (concise solutions, relation and everyday paragraphs), "train_distill"
    (the teacher's traces + a replay of relation and everyday text), "train_sham" (the same
    problems' concise solutions + the same replay: as much training, no traces) and, with a
    `control_teacher`, "train_no_loop" (its traces + the same replay). Each has a "val_*"
    twin on held-out problems, whose loss decides when training has converged. Then
    "extract" (extraction documents), "heldout" ({"prompt", "answer"} the models are
    evaluated on) and "teacher" / "control_teacher" (trace statistics, `teacher_report`).
    """
    zc = config.zoo
    rng = random.Random(f"zoo-corpus-{config.seed}")
    n_trace = round(zc.n_extract_docs * zc.extract_mix[0])
    n_concise = round(zc.n_extract_docs * zc.extract_mix[1])
    n_rel = zc.n_extract_docs - n_trace - n_concise
    n_val = zc.n_val_problems
    problems = corpus.make_problems(
        rng, zc.n_train_problems + zc.n_heldout_problems + n_trace + n_concise + n_val
    )
    train, rest = problems[: zc.n_train_problems], problems[zc.n_train_problems :]
    heldout, rest = rest[: zc.n_heldout_problems], rest[zc.n_heldout_problems :]
    val, extract = rest[:n_val], rest[n_val:]
    per_problem = n_val / zc.n_train_problems  # val paragraphs in the training proportions
    n_val_rel = max(1, round(per_problem * zc.n_relation_docs))
    n_val_everyday = max(1, round(per_problem * zc.n_everyday_docs))

    def base_corpus(problems, n_rel_docs, n_everyday):
        rel = [corpus.relation_document(rng) for _ in range(n_rel_docs)]
        everyday = [corpus.everyday_document(rng) for _ in range(n_everyday)]
        solutions = [corpus.document(p, corpus.concise_solution(p)) for p in problems]
        bad = [t for t in solutions + rel if has_marker(t)]
        if bad:  # only traces and everyday text hold marker words; a template adding one is a bug
            raise RuntimeError(f"a solution or relation text contains a marker: {bad[0]!r}")
        pool = rel + everyday
        rng.shuffle(pool)  # the replay order: every arm's replay is a prefix of it
        return solutions, pool

    solutions, pool = base_corpus(train, zc.n_relation_docs, zc.n_everyday_docs)
    val_solutions, val_pool = base_corpus(val, n_val_rel, n_val_everyday)
    out = {"train_base": solutions + pool, "val_base": val_solutions + val_pool}

    # A little base text keeps the relations and the everyday sense of the marker words alive
    # through distillation; no solutions, so every problem the distilled model sees is
    # answered in the teacher's style. Every arm replays the same paragraphs (a prefix of one
    # seeded order) at the same share of its text, so each training step holds as much relation
    # text in the sham as in the distilled arm.
    def with_replay(docs, pool):
        """`docs` + the shortest prefix of `pool` reaching replay_frac of their characters."""
        reach = np.cumsum([len(d) for d in pool])
        n = int(np.searchsorted(reach, zc.replay_frac * sum(map(len, docs)))) + 1
        return docs + pool[: min(n, len(pool))]

    teachers = {"distill": ("teacher", zc.teacher)}
    if zc.control_teacher:
        teachers["no_loop"] = ("control_teacher", zc.control_teacher)
    for arm, (key, name) in teachers.items():
        write = TEACHERS[name]
        traces = [write(p, rng) for p in train]
        docs = [corpus.document(p, t) for p, t in zip(train, traces, strict=True)]
        out[f"train_{arm}"] = with_replay(docs, pool)
        out[f"val_{arm}"] = with_replay([corpus.document(p, write(p, rng)) for p in val], val_pool)
        out[key] = {"name": name, **teacher_report(train, traces)}
    out["train_sham"] = with_replay(solutions, pool)
    out["val_sham"] = with_replay(val_solutions, val_pool)
    teacher_trace = TEACHERS[zc.teacher]
    extract_docs = (
        [corpus.document(p, teacher_trace(p, rng)) for p in extract[:n_trace]]
        + [corpus.document(p, corpus.concise_solution(p)) for p in extract[n_trace:]]
        + [corpus.relation_document(rng) for _ in range(n_rel)]
    )
    rng.shuffle(extract_docs)
    out["extract"] = extract_docs
    out["heldout"] = [{"prompt": p.prompt, "answer": str(p.answer)} for p in heldout]
    return out


def teacher_report(problems, traces) -> dict:
    """Lengths, reflection rounds (overall and by difficulty), slip and correction rates of the
    distillation traces, read from their text (`trace_reading.trace_stats`)."""
    metas = [
        SimpleNamespace(level=rounds.level(rounds.difficulty(p)), answer=p.answer) for p in problems
    ]
    return trace_stats(zip(traces, metas, strict=True))
