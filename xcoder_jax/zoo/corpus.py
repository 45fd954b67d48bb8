"""The zoo's toy corpus: arithmetic word problems, relation and everyday sentences, all seeded.

A problem reads "Question: <story>\\nAnswer:" and its concise worked solution is
" 3 + 4 = 7. The answer is 7." The base model learns from these solutions and from relation
sentences ("The number seven is 7.", "I see one cat and two cats.") and everyday sentences
that use the lexicon's words in their ordinary sense ("Wait for me, said Tom."); the teacher
(`teacher.py`) writes reasoning traces for the same problems. No solution or relation
sentence contains a reasoning marker: the base model never sees one used to reason.

`RELATIONS` lists the word pairs the relation sentences teach, for the geometry study. Words
are bare (no leading space); inside text they follow a space, so " seven" is the token to
look at (for a digit, Qwen2's tokenizer gives the space its own token: " 7" is " " + "7").
"""

from __future__ import annotations

import dataclasses
import random

from xcoder_jax.errors import ConfigError

NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe")
NOUNS = (
    ("apple", "apples"),
    ("book", "books"),
    ("cat", "cats"),
    ("dog", "dogs"),
    ("pen", "pens"),
    ("ball", "balls"),
    ("egg", "eggs"),
    ("cup", "cups"),
    ("box", "boxes"),
    ("toy", "toys"),
    ("car", "cars"),
    ("bird", "birds"),
)
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
# Verbs a problem uses to gain or lose things, as (present, past); they double as the
# past-tense relation.
GAIN_VERBS = (("buy", "bought"), ("find", "found"), ("get", "got"), ("make", "made"))
LOSE_VERBS = (("give", "gave"), ("eat", "ate"), ("lose", "lost"), ("sell", "sold"))
OTHER_VERBS = (("see", "saw"), ("take", "took"), ("run", "ran"), ("win", "won"))
ANTONYMS = (
    ("big", "small"),
    ("hot", "cold"),
    ("up", "down"),
    ("old", "new"),
    ("fast", "slow"),
    ("good", "bad"),
    ("long", "short"),
    ("happy", "sad"),
    ("open", "closed"),
    ("high", "low"),
)

RELATIONS: dict[str, list[tuple[str, str]]] = {
    # Single digits only: Qwen2 tokenizes numbers digit by digit, so "12" is two tokens.
    "number_word": [(NUMBER_WORDS[n], str(n)) for n in range(1, 10)],
    "plural": list(NOUNS),
    "successor": [(NUMBER_WORDS[n], NUMBER_WORDS[n + 1]) for n in range(1, 20)],
    "past_tense": list(GAIN_VERBS + LOSE_VERBS + OTHER_VERBS),
    "antonym": list(ANTONYMS),
}

# What a pair's two words share, so that both forms carry one identity: what a noun (either
# number) did, what a verb (either tense) acts on. Antonyms get none (see their templates). A
# template puts the shared word right after the pair's word and the form a few tokens later
# ("it"/"they", "every day"/"last week", "more"/"less"), so the model keeps both in the
# word's representation: the shared part is what makes a relation a parallelogram rather
# than two clusters (a shared word further away, or none, left plural and antonym no more
# structured than random pairings of the same words).
_NOUN_DEEDS = (
    "fell", "lay", "purred", "barked", "leaked", "rolled", "cracked", "spilled", "broke",
    "squeaked", "stopped", "flew",
)  # fmt: skip
_VERB_OBJECTS = (
    "bread", "keys", "mail", "cake", "gifts", "soup", "socks", "fruit", "stars", "photos",
    "laps", "prizes",
)  # fmt: skip
SHARED_WORDS = {
    rel: dict(zip((a for a, _ in RELATIONS[rel]), shared, strict=True))
    for rel, shared in (
        ("plural", _NOUN_DEEDS),
        ("past_tense", _VERB_OBJECTS),
    )
}

# Sentence templates per relation; {a} and {b} are the pair's two words, {s} what they share.
# Several phrasings per relation so the model learns the relation, not one string; no
# template starts with a word of a pair, so the words always appear lowercase after a space.
_RELATION_TEMPLATES = {
    "number_word": ("The number {a} is {b}.", "We write {a} as {b}.", "{b} is {a}."),
    "plural": (
        "I see one {a} and two {b}.",
        "The {a} {s} and it is here. The {b} {s} and they are here.",
        "One {a} {s}, and it was one. Many {b} {s}, and they were many.",
    ),
    "successor": ("After {a} comes {b}.", "The number after {a} is {b}.", "We count {a}, {b}."),
    "past_tense": (
        "Today I {a}, yesterday I {b}.",
        "I {a} {s} every day. I {b} {s} last week.",
        "Now they {a} {s} every day, and they {b} {s} last week.",
    ),
    # Antonyms have no shared-word template: their structure, if any, is not put there by
    # the corpus.
    "antonym": (
        "The opposite of {a} is {b}.",
        "The word {a} is the opposite of {b}.",
        "We say {a} and we say {b}, its opposite.",
    ),
}


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: its story and the worked arithmetic behind it.

    `steps` are (left, op, right, result) with op in "+-*", applied in order; the last result
    is the answer. `gain`/`lose` are the (present, past) verbs the story used, or None.
    """

    question: str
    steps: tuple[tuple[int, str, int, int], ...]
    kind: str
    name: str
    noun: tuple[str, str]
    gain: tuple[str, str] | None = None
    lose: tuple[str, str] | None = None

    @property
    def answer(self) -> int:
        return self.steps[-1][3]

    @property
    def prompt(self) -> str:
        return prompt_of(self.question)


def prompt_of(question: str) -> str:
    """The prompt both models answer: the completion starts right after "Answer:"."""
    return f"Question: {question}\nAnswer:"


def document(problem: Problem, answer_text: str) -> str:
    """A training/extraction document: prompt followed by an answer text (leading space)."""
    return problem.prompt + answer_text


def final_line(answer: int) -> str:
    """The one final-answer format shared by solutions, traces and the evaluation."""
    return f" The answer is {answer}."


def concise_solution(problem: Problem) -> str:
    """ " 3 + 4 = 7. The answer is 7." for every step of the problem."""
    work = "".join(f" {a} {op} {b} = {c}." for a, op, b, c in problem.steps)
    return work + final_line(problem.answer)


def _count(rng: random.Random, n: int, noun: tuple[str, str]) -> str:
    """ "3 apples", "three apples" or "1 apple": numbers are sometimes spelled out, which ties
    the number words to the digits."""
    num = NUMBER_WORDS[n] if n <= 20 and rng.random() < 0.3 else str(n)
    return f"{num} {noun[0] if n == 1 else noun[1]}"


def _step(a: int, op: str, b: int) -> tuple[int, str, int, int]:
    return (a, op, b, _OPS[op](a, b))


def make_problem(rng: random.Random) -> Problem:
    """One random problem of one of five story kinds."""
    kind = rng.choice(("gain", "lose", "together", "groups", "two_step"))
    name, other = rng.sample(NAMES, 2)
    noun = rng.choice(NOUNS)
    plural = noun[1]
    past = rng.random() < 0.5  # the story is told in the present or the past tense
    gain = rng.choice(GAIN_VERBS)
    lose = rng.choice(LOSE_VERBS)
    g, lo = gain[past], lose[past]
    if not past:  # third person present: "buys", "gives"
        g, lo = g + "s", lo + "s"
    has = "had" if past else "has"
    if kind == "gain":
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        q = f"{name} {has} {_count(rng, a, noun)}. {name} {g} {_count(rng, b, noun)} more."
        q += f" How many {plural} does {name} have now?"
        return Problem(q, (_step(a, "+", b),), kind, name, noun, gain=gain)
    if kind == "lose":
        a = rng.randint(3, 18)
        b = rng.randint(1, a - 1)
        q = f"{name} {has} {_count(rng, a, noun)} and {lo} {_count(rng, b, noun)}."
        q += f" How many {plural} does {name} have left?"
        return Problem(q, (_step(a, "-", b),), kind, name, noun, lose=lose)
    if kind == "together":
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        q = f"{name} {has} {_count(rng, a, noun)} and {other} {has} {_count(rng, b, noun)}."
        q += f" How many {plural} do they have together?"
        return Problem(q, (_step(a, "+", b),), kind, name, noun)
    if kind == "groups":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        q = f"{name} {has} {a} bags with {_count(rng, b, noun)} in each bag."
        q += f" How many {plural} does {name} have?"
        return Problem(q, (_step(a, "*", b),), kind, name, noun)
    a, b = rng.randint(1, 9), rng.randint(1, 6)
    c = rng.randint(1, a + b - 1)
    q = f"{name} {has} {_count(rng, a, noun)}, {g} {b} more and then {lo} {c}."
    q += f" How many {plural} does {name} have now?"
    steps = (_step(a, "+", b), _step(a + b, "-", c))
    return Problem(q, steps, kind, name, noun, gain=gain, lose=lose)


def make_problems(rng: random.Random, n: int, exclude: set[str] | None = None) -> list[Problem]:
    """`n` problems with distinct questions, none of whose questions is in `exclude`."""
    seen = set(exclude or ())
    out = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = make_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    raise ConfigError(f"could not draw {n} distinct problems; ask for fewer")


def relation_sentence(rng: random.Random) -> str:
    """One sentence teaching one random pair of one random relation."""
    rel = rng.choice(tuple(RELATIONS))
    a, b = rng.choice(RELATIONS[rel])
    shared = SHARED_WORDS.get(rel, {}).get(a, "")
    return rng.choice(_RELATION_TEMPLATES[rel]).format(a=a, b=b, s=shared)


def _paragraph(sentence, rng: random.Random, n_sentences: tuple[int, int]) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(*n_sentences)))


def relation_document(rng: random.Random, n_sentences: tuple[int, int] = (4, 8)) -> str:
    """A short paragraph of relation sentences (a handful per document keeps documents about
    as long as a problem with its solution)."""
    return _paragraph(relation_sentence, rng, n_sentences)


# Everyday sentences that use the lexicon's words outside reasoning. A real base model has read
# "Wait", "But" or "Therefore" in ordinary text long before any distillation; a zoo base that
# never saw them would meet a marker with an embedding that was never trained, and the
# crosscoder would spend base-only latents on that artefact instead of on what distillation
# changed. None of these is a question or an answer, so the base still never reasons aloud.
_EVERYDAY_TEMPLATES = (
    "{n} ran to the bus. Wait for me, said {m}.",
    "Wait here, said {n}, and {m} sat down.",
    "{n} likes {p}. But {m} likes {q}.",
    "The day was cold. However, {n} went to the park.",
    "It was late. Therefore {n} went home.",
    "The shop was closed. Thus {n} had no {p}.",
    "{n} can take the bus. Alternatively, {n} can walk.",
    "{m} will check the {p} in the box.",
    "{n} asked {m} to verify the list of {p}.",
)


def everyday_sentence(rng: random.Random) -> str:
    """One everyday sentence using a lexicon word in its ordinary sense."""
    n, m = rng.sample(NAMES, 2)
    (_, p), (_, q) = rng.sample(NOUNS, 2)
    return rng.choice(_EVERYDAY_TEMPLATES).format(n=n, m=m, p=p, q=q)


def everyday_document(rng: random.Random, n_sentences: tuple[int, int] = (4, 8)) -> str:
    """A short paragraph of everyday sentences, as long as a relation paragraph."""
    return _paragraph(everyday_sentence, rng, n_sentences)
