"""The lexicon's rules: where a marker occurrence is read in a token stream (and the counts
built on it), and when a marker in text is used as a reasoning move."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xcoder_jax.analysis import categories as cats
from xcoder_jax.errors import ConfigError
from xcoder_jax.lexicon import (
    ANCHORS,
    CATEGORY_NAMES,
    anchor_lag,
    count_everyday_markers,
    count_markers,
    count_reasoning_markers,
    marker_carry,
    marker_read_rows,
)
from xcoder_jax.specificity import specificity_scores

WAIT, ALT = (7,), (5, 6)  # a one-token and a two-token marker form
FORMS = [WAIT, ALT]

# One document: WAIT at rows 1 and 6, ALT at rows 3-4.
TOKENS = np.array([1, 7, 2, 5, 6, 3, 7])
DOCS = np.zeros(7, np.int64)


@pytest.mark.parametrize(
    "anchor, rows",
    [
        ("read", [1, 4, 6]),  # last token: ALT is read at 4
        ("first", [1, 3, 6]),
        ("predict", [0, 2, 5]),  # the token before each marker
        (0, [1, 3, 6]),  # offsets count from the first token: 0 is "first"
        (-1, [0, 2, 5]),  # -1 is "predict", the configs' fire_offset
        (-2, [1, 4]),  # WAIT at 1 would be read at -1: outside the array
    ],
)
def test_rows_of_one_and_two_token_markers(anchor, rows):
    assert marker_read_rows(TOKENS, DOCS, FORMS, anchor).tolist() == rows


def test_the_configs_fire_offset_is_the_predict_anchor():
    from configs import tiny

    c = tiny.get_config()
    for offset in (c.selection.fire_offset,):
        assert [anchor_lag(offset, n) for n in (1, 2, 3)] == [1, 2, 3]
        assert [anchor_lag("predict", n) for n in (1, 2, 3)] == [1, 2, 3]


def test_a_marker_opening_a_document_is_not_read_in_the_previous_one():
    # ALT opens document 1 at rows 3-4; WAIT opens document 0 at row 0 and sits in it at 2;
    # ALT at rows 6-7 straddles documents 1 and 2, so it is no occurrence at all.
    tokens = np.array([7, 1, 7, 5, 6, 1, 5, 6])
    docs = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    assert marker_read_rows(tokens, docs, FORMS, "read").tolist() == [0, 2, 4]
    assert marker_read_rows(tokens, docs, FORMS, "first").tolist() == [0, 2, 3]
    # Row 2 predicts ALT's row 3 only inside one text: it is document 0's last token.
    assert marker_read_rows(tokens, docs, FORMS, "predict").tolist() == [1]
    assert marker_read_rows(tokens, docs, [ALT], "predict").tolist() == []


# A stream with ALT at 1-2 and 5-6, WAIT at 4, 7 and 9. Unsplit, it is read at these rows:
STREAM = np.array([1, 5, 6, 2, 7, 5, 6, 7, 3, 7])
STREAM_ROWS = {"read": [2, 4, 6, 7, 9], "predict": [0, 3, 4, 6, 8]}


def _split_rows(cut: int, anchor: str) -> list[int]:
    """Stream rows read in shard [0, cut) then in shard [cut, 10) with its carry."""
    docs = np.zeros(len(STREAM), np.int64)
    first = marker_read_rows(STREAM[:cut], docs[:cut], FORMS, anchor)
    carry = min(marker_carry(FORMS, anchor), cut)
    ctx = slice(cut - carry, len(STREAM))
    second = marker_read_rows(STREAM[ctx], docs[ctx], FORMS, anchor, carry) + cut
    return first.tolist() + second.tolist()


def test_a_marker_split_across_shards_is_found_once_via_the_carry():
    assert marker_carry(FORMS, "read") == 1
    assert marker_carry(FORMS, "predict") == 2  # ALT's last token and the one before ALT
    # Cut at 6: ALT (rows 5-6) is split. "read": found in the second shard at its row 0.
    ctx = STREAM[5:]
    assert marker_read_rows(ctx, np.zeros(5), FORMS, "read", carry=1).tolist() == [0, 1, 3]
    # "predict": read at row 4 of the first shard, two rows back into the carry (-2); WAIT at
    # row 4 ends inside the carry, so the first shard has already counted it.
    ctx = STREAM[4:]
    assert marker_read_rows(ctx, np.zeros(6), FORMS, "predict", carry=2).tolist() == [-2, 0, 2]
    # Without the carry, the split occurrence is lost in both shards.
    assert marker_read_rows(STREAM[:6], np.zeros(6), FORMS, "predict").tolist() == [0, 3]
    assert marker_read_rows(STREAM[6:], np.zeros(4), FORMS, "predict").tolist() == [0, 2]
    # Cut at 7: WAIT opens the second shard and is predicted by the first shard's last row.
    ctx = STREAM[5:]
    assert marker_read_rows(ctx, np.zeros(5), FORMS, "predict", carry=2).tolist() == [-1, 1]


@pytest.mark.parametrize("anchor", ["read", "predict"])
@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_every_cut_reads_the_rows_of_the_unsplit_stream_once(anchor, cut):
    assert marker_read_rows(STREAM, np.zeros(10), FORMS, anchor).tolist() == STREAM_ROWS[anchor]
    assert _split_rows(cut, anchor) == STREAM_ROWS[anchor]


def test_the_analysis_reads_markers_at_the_read_anchor():
    assert cats.ANCHOR == "read" and "read" in ANCHORS
    assert cats.marker_rows(TOKENS, DOCS, FORMS, carry=0).tolist() == [1, 4, 6]


@pytest.mark.parametrize("bad", ["later", 1, True, 1.5, None])
def test_unknown_anchors_and_offsets_inside_the_marker_are_refused(bad):
    with pytest.raises(ValueError):
        marker_read_rows(TOKENS, DOCS, FORMS, bad)
    with pytest.raises(ValueError):
        marker_carry([], bad)


# --- Marker rows of a store, as latent selection reads them (specificity) ----------------


class _Store:
    """STREAM in shards cut at `cuts`; activation row r is e_r (latent r fires on row r only)."""

    def __init__(self, cuts, docs=None):
        self.bounds = [0, *cuts, len(STREAM)]
        self.docs = np.zeros(len(STREAM), np.int64) if docs is None else np.asarray(docs)
        self.acts = np.eye(len(STREAM), dtype=np.float32)[:, None, :]  # [rows, 1, h]

    def _rows(self, k):
        return slice(self.bounds[k], self.bounds[k + 1])

    def shard_tokens(self, k):
        return STREAM[self._rows(k)]

    def shard_index(self, k):
        rows = np.arange(len(STREAM))[self._rows(k)]
        return np.stack([self.docs[rows], rows], 1)

    def shard_rows(self, k, idx):
        return self.acts[self._rows(k)][idx]


class _Identity:
    """A crosscoder whose latent j is the activation's coordinate j."""

    n_latents = len(STREAM)
    W_dec = torch.zeros(1)

    def encode_t(self, x):
        return torch.as_tensor(x)[:, 0, :].T


def _fired(store, anchor, shards):
    spec = specificity_scores(store, _Identity(), {"c": FORMS}, ["c"], anchor, shards)
    counts = np.rint(spec.marker_rate[0] * spec.n_marker[0])
    assert counts.shape == (len(STREAM),) and counts.max() <= 1
    assert counts.sum() == spec.n_marker[0]
    return np.flatnonzero(counts).tolist()  # rows at which an occurrence is read


@pytest.mark.parametrize("cuts", [[6], [7], [3, 6], [5, 7]])
@pytest.mark.parametrize("anchor", ["read", "predict", -1])
def test_marker_rows_read_every_occurrence_once_across_shards(cuts, anchor):
    name = "predict" if anchor == -1 else anchor
    store = _Store(cuts)
    assert _fired(store, anchor, range(len(cuts) + 1)) == STREAM_ROWS[name]


def test_marker_rows_never_read_a_shard_not_listed():
    # Cut at 6 and 7: the middle shard is row 6 alone. Without it, ALT at 5-6 (ends in it) and
    # WAIT at 7 (predicted by it) are not counted.
    store = _Store([6, 7])
    assert _fired(store, "predict", [0, 2]) == [0, 3, 8]
    assert _fired(store, "predict", [2]) == [8]


def test_marker_rows_respect_documents_across_the_carry():
    # A new document starts at row 5: ALT there is read at "predict" only inside it (never).
    store = _Store([6], docs=[0] * 5 + [1] * 5)
    assert _fired(store, "predict", [0, 1]) == [0, 3, 6, 8]
    assert _fired(store, "read", [0, 1]) == [2, 4, 6, 7, 9]


def test_marker_rows_refuse_a_bad_offset():
    with pytest.raises(ConfigError, match="fire_offset"):
        _fired(_Store([6]), 1, [0, 1])


def test_stretches_keep_markers_off_excluded_tokens():
    """Stored rows of one document with position 3 excluded (e.g. a `<think>` token)."""
    from xcoder_jax.lexicon import marker_read_rows, stretches

    index = np.array([[0, 1], [0, 2], [0, 4], [0, 5], [1, 1], [1, 2], [1, 3]])
    np.testing.assert_array_equal(stretches(index), [1, 1, 2, 2, 3, 3, 3])
    tokens = np.array([5, 7, 9, 8, 7, 9, 8])
    # Without a gap in positions the stretches are the documents: nothing changes.
    full = np.array([[0, 1], [0, 2], [0, 3], [1, 1], [1, 2]])
    np.testing.assert_array_equal(stretches(full), [1, 1, 1, 2, 2])
    docs = stretches(index)
    # Marker (9, 8): at rows 2-3 (positions 4-5) and rows 5-6 (document 1).
    np.testing.assert_array_equal(marker_read_rows(tokens, docs, [(9, 8)], "read"), [3, 6])
    # "predict": row 1 is position 2, not the token before position 4, so that occurrence is
    # not read; in document 1 the row before is position 1, really next to it.
    np.testing.assert_array_equal(marker_read_rows(tokens, docs, [(9, 8)], "predict"), [4])
    # Read by documents alone, row 1 would wrongly count.
    np.testing.assert_array_equal(
        marker_read_rows(tokens, index[:, 0], [(9, 8)], "predict"), [1, 4]
    )
    # A marker does not span the gap: (7, 9) at rows 1-2 straddles positions 2 and 4.
    np.testing.assert_array_equal(marker_read_rows(tokens, docs, [(7, 9)], "read"), [5])


# --- Markers used as reasoning moves ---------------------------------------------------------


def _only(**n) -> dict[str, int]:
    return {c: n.get(c, 0) for c in CATEGORY_NAMES}


def test_wait_for_me_is_no_self_reflection_but_wait_comma_is():
    everyday, move = "Wait for me, said Tom.", "Wait, let me check."
    assert count_markers(everyday)["self_reflection"] == 1  # the bare word is there
    assert count_reasoning_markers(everyday) == _only()
    assert count_everyday_markers(everyday) == _only(self_reflection=1)
    assert count_reasoning_markers(move) == _only(self_reflection=1, verification=1)
    assert count_everyday_markers(move) == _only()


@pytest.mark.parametrize(
    "text, moves, everyday",
    [
        # Sentence-initial after . ! ? : or a newline, then whitespace; not mid-sentence.
        ("3 + 4 = 7. Wait, no. Is it? Wait: yes!\nWait... 7", {"self_reflection": 3}, {}),
        ("I said wait, then Wait here, said Ann. Wait! Wait.", {}, {"self_reflection": 3}),
        ("x = 3.Wait, no", {}, {}),  # no space after the full stop: neither
        (
            "Therefore, 7. Thus, 7. It was late. Therefore Ann went home.",
            {"deductive": 2},
            {"deductive": 1},
        ),
        (
            "Alternatively, swap. However, not 8. But the answer is 7. ok, But then",
            {"alternative": 1, "contrastive": 2},
            {"contrastive": 1},
        ),
        (
            "Let me verify: 4. I can check the result. To check it, 3. LET ME CHECK.",
            {"verification": 4},
            {},
        ),
        ("Bo will check the box. Ann asked Bo to verify the list.", {}, {"verification": 2}),
        ("Let me double-check the sum.", {"verification": 1}, {}),
    ],
)
def test_reasoning_and_everyday_uses(text, moves, everyday):
    assert count_reasoning_markers(text) == _only(**moves)
    assert count_everyday_markers(text) == _only(**everyday)


def test_every_marker_the_teacher_writes_is_a_reasoning_move():
    import random

    from xcoder_jax.zoo import teacher_trace
    from xcoder_jax.zoo.corpus import make_problems

    rng = random.Random(0)
    traces = [teacher_trace(p, rng) for p in make_problems(rng, 300)]
    bare = {c: sum(count_markers(t)[c] for t in traces) for c in CATEGORY_NAMES}
    moves = {c: sum(count_reasoning_markers(t)[c] for t in traces) for c in CATEGORY_NAMES}
    assert all(bare[c] > 50 for c in CATEGORY_NAMES)
    # Verification also has the form "To check it," and "I can check", so every form counts.
    assert moves == bare
    assert not any(sum(count_everyday_markers(t).values()) for t in traces)


def test_everyday_sentences_of_the_zoo_are_mostly_not_moves():
    import random

    from xcoder_jax.zoo.corpus import everyday_sentence

    rng = random.Random(1)
    sentences = [everyday_sentence(rng) for _ in range(400)]
    moves = {c: sum(count_reasoning_markers(s)[c] for s in sentences) for c in CATEGORY_NAMES}
    everyday = {c: sum(count_everyday_markers(s)[c] for s in sentences) for c in CATEGORY_NAMES}
    # "Wait for me" / "Wait here", "Therefore Ann went home", "will check", "to verify":
    # never a move. "However, ...", "Alternatively, ..." and "But ..." open sentences in the
    # form reasoning uses, so form alone cannot tell them apart; they count as moves.
    for c in ("self_reflection", "deductive", "verification"):
        assert moves[c] == 0 and everyday[c] > 20
    for c in ("alternative", "contrastive"):
        assert moves[c] > 20 and everyday[c] == 0
