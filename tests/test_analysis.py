"""Analysis: relative norms, marker ids, streaming top-k, latent scaling, splice-in, the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.conftest import CORPUS, make_tokenizer, micro_config, store_writer, strict_loads
from xcoder_jax import export, split, stage
from xcoder_jax import strict_json as strict
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore, extract
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.analysis import (
    CLASSES,
    LatentScaling,
    classify,
    decoder_cosine,
    decoder_norms,
    firing_latents,
    fit_betas,
    gather_windows,
    relative_norms,
    run_analysis,
    scaling,
    scan_store,
    splice_ce,
    stream,
)
from xcoder_jax.analysis import categories as cats
from xcoder_jax.analysis.histogram import ActivationHistogram
from xcoder_jax.analysis.report import render_html
from xcoder_jax.documents import pad_documents
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.lexicon import CATEGORIES, CATEGORY_NAMES, find_marker, marker_token_ids
from xcoder_jax.marker_tokens import marker_groups
from xcoder_jax.stage_inputs import check_pair, load_inputs

CHROMIUM = "/usr/bin/chromium"


def sps_t_ppf(q, dof):
    from scipy.stats import t

    return float(t.ppf(q, dof))


# --- Helpers -------------------------------------------------------------------------------


def _write_store(directory, x, tokens, docs, shard_rows, dtype="bfloat16"):
    """A store from rows x [N, m, d] (raw), tokens [N] and doc ids [N] (contiguous docs)."""
    m, d = x.shape[1:]
    writer = store_writer(
        directory,
        {"test": 1},
        n_models=m,
        d=d,
        shard_rows=shard_rows,
        dtype=dtype,
        tokenizer_sha256="test",
    )
    for doc in np.unique(docs):
        sel = docs == doc
        writer.add(x[sel], tokens[sel], int(doc), np.arange(1, sel.sum() + 1))
    writer.close()
    return ActivationStore(directory)


def _pre_activation(enc, acts):
    """x W_enc + b_enc before the ReLU, float64: [h, N] for rows acts [N, m, d] (raw)."""
    w = enc.w_enc_t.double().numpy()  # [h, m*d]
    return (
        w @ acts.reshape(len(acts), -1).T.astype(np.float64) + enc.b_enc.double().numpy()[:, None]
    )


def _random_export(m, d, h, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(m, d, h)).astype(np.float32) / np.sqrt(d),
        "b_enc": rng.normal(size=h).astype(np.float32) * 0.1 - 0.3,
        "W_dec": rng.normal(size=(h, m, d)).astype(np.float32) * 0.1,
        "b_dec": np.zeros((m, d), np.float32),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(CORPUS)


# --- Relative norms ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_nrn_and_classes_on_hand_made_decoders(kind):
    # Latents: base-only, distilled-only, equal rows, distilled row 3x the base row.
    row = np.array([1.0, -2.0, 2.0], np.float32)
    w = np.stack(
        [
            np.stack([row, 0 * row]),
            np.stack([0 * row, row]),
            np.stack([row, -row]),
            np.stack([row, 3 * row]),
        ]
    )
    nrn = relative_norms(decoder_norms(w, kind))
    np.testing.assert_allclose(nrn, [0.0, 1.0, 0.5, 0.75], atol=1e-7)
    assert classify(nrn, 0.1, 0.9).tolist() == [0, 2, 1, 1]
    np.testing.assert_allclose(decoder_cosine(w), [0.0, 0.0, -1.0, 1.0], atol=1e-7)
    norms = decoder_norms(w, kind)
    expected = 5.0 if kind == "l1" else 3.0
    # The zero row's norm is 0: an absolute tolerance, not a relative one, applies there.
    np.testing.assert_allclose(norms[0], [expected, 0.0], rtol=1e-6, atol=1e-7)


def test_nrn_is_measured_in_normalised_units():
    # Equal raw rows, but the distilled model's scale is 3x: its normalised row is 3x longer.
    raw = {"W_dec": np.ones((1, 2, 4), np.float32)}
    w = export.normalised_decoder(raw, {"scales": [1.0, 3.0]})
    assert relative_norms(decoder_norms(w))[0] == pytest.approx(0.75)


def test_dead_latents_are_their_own_class():
    # NRN base-only, shared, distilled-only, shared; the last two never fired on held-out rows.
    nrn = np.array([0.05, 0.5, 0.95, 0.5, 0.99])
    alive = np.array([True, True, True, False, False])
    assert classify(nrn, 0.1, 0.9).tolist() == [0, 1, 2, 1, 2]  # the bands alone
    classes = classify(nrn, 0.1, 0.9, alive)
    assert [CLASSES[k] for k in classes] == [
        "base_only", "shared", "distilled_only", "dead", "dead"
    ]  # fmt: skip


def test_bands_must_be_ordered():
    with pytest.raises(ValueError, match="bands"):
        classify(np.array([0.5]), 0.9, 0.1)


# --- Markers -------------------------------------------------------------------------------


def test_marker_token_ids_on_a_real_tokenizer(tokenizer):
    forms = marker_token_ids(tokenizer)
    assert set(forms) == set(CATEGORY_NAMES)
    for category, markers in CATEGORIES.items():
        decoded = [tokenizer.decode(list(ids)) for ids in forms[category]]
        assert decoded == list(markers)
    (alt,) = forms["alternative"]
    assert len(alt) > 2  # " Alternatively" never occurs in the corpus: many tokens
    text = "So 3 + 4 = 7. Alternatively, count on. Wait, Alternatively is long."
    ids = np.asarray(tokenizer(text)["input_ids"])
    starts = find_marker(ids, alt)
    assert len(starts) == 2
    for s in starts:
        assert tokenizer.decode(ids[s : s + len(alt)].tolist()) == " Alternatively"
    # In running text the marker has the ids it has alone.
    (wait,) = forms["self_reflection"]
    doc = np.asarray(tokenizer(CORPUS[0])["input_ids"])
    assert len(find_marker(doc, wait)) == CORPUS[0].count(" Wait") == 1
    # A bare form (start of a line) is added only where its ids differ.
    bare = marker_token_ids(tokenizer, bare=True)
    assert [tokenizer.decode(list(i)) for i in bare["self_reflection"]] == [" Wait", "Wait"]


def test_markers_are_found_across_shards_but_not_across_documents():
    seq = (5, 6, 7)
    tokens = np.array([5, 6, 7, 1, 5, 6, 7, 5, 6, 7])
    docs = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])  # the second occurrence spans two docs
    assert cats.marker_rows(tokens, docs, [seq], carry=0).tolist() == [2, 9]
    # With the first 5 rows as the previous shard's carry, the marker ending at row 6 of a
    # single document is found at local row 1.
    docs1 = np.zeros(10, np.int64)
    assert cats.marker_rows(tokens, docs1, [seq], carry=5).tolist() == [1, 4]


def _category_stats(groups, group_rows, group_fire, group_act, fire_count, nrn, classes,
                    top_n=5):  # fmt: skip
    """`cats.category_stats` on hand-made counts (firing share 0.1, 10 NRN bins)."""
    scan = SimpleNamespace(group_rows=group_rows, group_fire=group_fire, group_act=group_act,
                           fire_count=np.asarray(fire_count))  # fmt: skip
    facts = SimpleNamespace(nrn=np.asarray(nrn), classes=np.asarray(classes))
    ac = SimpleNamespace(firing_share=0.1, top_latents=top_n, nrn_bins=10)
    return cats.category_stats(groups, scan, facts, ac)


def test_category_without_occurrences_is_reported_as_zero(tokenizer):
    groups = marker_groups(tokenizer)
    g, h = len(groups.groups), 8
    stats, tags = _category_stats(
        groups, np.zeros(g, np.int64), np.zeros((g, h)), np.zeros((g, h)),
        np.ones(h, np.int64), np.full(h, 0.5), np.ones(h, np.int8),
    )  # fmt: skip
    for c in stats.values():
        assert c["occurrences"] == 0 and c["n_firing_latents"] == 0
        assert c["mean_nrn"] is None and c["top_latents"] == []
    assert tags == {}
    assert firing_latents(np.array([0, 10, 2, 1]), 0.1).tolist() == [1, 2]
    for c in stats.values():
        assert c["nrn_minus_alive"]["mean"] is None and c["nrn_minus_alive"]["reason"]
        assert c["top_distilled_only"]["excess"]["mean"] is None


def _one_category(tokenizer, nrn, fire_count, fire, top_n=2):
    """category_stats with `fire` [h] as the self-reflection firing counts (10 occurrences),
    every other category without occurrences."""
    groups = marker_groups(tokenizer)
    g, h = len(groups.groups), len(nrn)
    k = CATEGORY_NAMES.index("self_reflection")
    group_rows = np.zeros(g, np.int64)
    group_rows[k] = 10
    group_fire = np.zeros((g, h))
    group_fire[k] = fire
    classes = classify(np.asarray(nrn), 0.1, 0.9)
    out, _ = _category_stats(
        groups, group_rows, group_fire, group_fire.copy(), fire_count, nrn, classes, top_n
    )
    return out["self_reflection"]


def test_category_baseline_is_the_alive_latents(tokenizer):
    # Latents 0-2 fire on the markers; 3-6 are alive elsewhere; 7 is dead with NRN 1.0.
    nrn = [0.95, 0.8, 0.7, 0.5, 0.4, 0.3, 0.6, 1.0]
    fire_count = [20, 30, 40, 5, 5, 5, 5, 0]
    fire = [10, 9, 8, 0, 0, 0, 0, 0]
    c = _one_category(tokenizer, nrn, fire_count, fire)
    assert c["firing_latents"] == [0, 1, 2]
    # Baseline over the 7 alive latents: 4.25 / 7. With the dead latent it would be 5.25 / 8.
    assert c["mean_nrn_alive"] == pytest.approx(4.25 / 7, abs=1e-12)
    assert c["mean_nrn"] == pytest.approx(0.8166666666666667, abs=1e-12)
    # Welch by hand: firing a = [0.95, 0.8, 0.7], other alive b = [0.5, 0.4, 0.3, 0.6].
    # mean(a) = 49 / 60: deviations 8, -1, -7 (/ 60), so s_a^2 = 114 / 3600 / 2 (ddof 1);
    # mean(b) = 0.45: deviations 0.05, -0.05, -0.15, 0.15, so s_b^2 = 0.05 / 3.
    va, vb = 114 / 3600 / 2 / 3, 0.05 / 3 / 4  # squared standard errors
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = sps_t_ppf(0.975, dof) * np.sqrt(va + vb)
    diff = 2.45 / 3 - 0.45
    ci = c["nrn_minus_alive"]
    assert ci["mean"] == pytest.approx(diff, abs=1e-12)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(diff - half, abs=1e-9),
                                    pytest.approx(diff + half, abs=1e-9))  # fmt: skip
    assert ci["n"] == 7
    # Top 2 latents by marker share: 0 (10/20, distilled-only) and 1 (9/30, shared). The
    # alive distilled-only share is 1/7; counting the dead latent 7 it would be 2/8.
    td = c["top_distilled_only"]
    assert (td["count"], td["n_top"]) == (1, 2)
    assert td["alive_share"] == pytest.approx(1 / 7, abs=1e-12)
    # Wilson interval of 1/2 at z = 1.96: centre 0.5, half-width 0.40549 (by hand).
    assert td["excess"]["lo"] == pytest.approx(0.5 - 0.40549 - 1 / 7, abs=1e-4)
    assert td["excess"]["hi"] == pytest.approx(0.5 + 0.40549 - 1 / 7, abs=1e-4)
    assert td["excess"]["mean"] == pytest.approx(0.5 - 1 / 7, abs=1e-12)
    assert "nrn_gap" not in c and "mean_nrn_all" not in c


def test_dead_latent_does_not_move_the_category_difference(tokenizer):
    # The same alive latents with and without a dead one of extreme NRN: same answer; the
    # dead latent's NRN would have moved the other-alive mean from 0.45 to 0.56.
    alive = dict(nrn=[0.95, 0.8, 0.7, 0.5, 0.4, 0.3, 0.6], fire_count=[20, 30, 40, 5, 5, 5, 5],
                 fire=[10, 9, 8, 0, 0, 0, 0])  # fmt: skip
    with_dead = {k: v + [1.0 if k == "nrn" else 0] for k, v in alive.items()}
    a = _one_category(tokenizer, **alive)
    b = _one_category(tokenizer, **with_dead)
    assert b["nrn_minus_alive"] == a["nrn_minus_alive"]
    assert b["mean_nrn_alive"] == a["mean_nrn_alive"]
    assert b["top_distilled_only"] == a["top_distilled_only"]


# --- Streaming statistics ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, m, d = 1500, 2, 16
    x = rng.normal(size=(n, m, d)).astype(np.float32)
    tokens = rng.integers(0, 6, size=n).astype(np.int32)
    docs = np.repeat(np.arange(n // 50), 50)
    store = _write_store(str(tmp_path_factory.mktemp("small")), x, tokens, docs, shard_rows=256)
    return store


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_streaming_topk_and_counts_equal_brute_force(small_store, path, monkeypatch):
    monkeypatch.setattr(stream, "SPARSE_DENSITY", 1.0 if path == "sparse" else -1.0)
    store = small_store
    enc = ExportedCrosscoder(_random_export(2, 16, 40))
    groups = [[(1, 2)], [(3,), (4, 5)]]
    hist = ActivationHistogram(40, lo=1e-2, hi=10.0, per_decade=4)
    res = scan_store(
        store, enc, groups=groups, heldout={5}, top_k=5, batch_rows=100, progress=False, hist=hist
    )
    acts = np.concatenate([a for _, a in store.iter_shards()]).astype(np.float32)
    f_t = enc.encode_t(torch.from_numpy(acts)).numpy()  # [h, N], all rows at once
    vals = -np.sort(-f_t, axis=1)[:, :5]
    # The scan encodes batches of 100 rows, the brute force all rows at once: the matmuls
    # may round differently (~1e-7 relative on O(1) activations), so values are compared
    # with a tolerance, and rows through the activation they point at (ties may pick either).
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.top_values, vals, **tol)
    has_row = res.top_rows >= 0
    picked = np.take_along_axis(f_t, np.where(has_row, res.top_rows, 0), axis=1)
    np.testing.assert_allclose(np.where(has_row, picked, 0.0), res.top_values, **tol)
    assert (has_row == (vals > 0))[vals > tol["atol"]].all()
    # Counts may differ only where a pre-activation is within rounding of the ReLU's 0; such
    # entries must be rare, or the allowance below would hide a real miscount.
    fired = f_t > 0
    near = np.abs(_pre_activation(enc, acts)) < 1e-5  # [h, N]
    assert near.sum() <= 1e-3 * near.size
    held = slice(int(store.shard_offsets[5]), int(store.shard_offsets[6]))
    assert (np.abs(res.fire_count - fired.sum(1)) <= near.sum(1)).all()
    assert (np.abs(res.fire_heldout - fired[:, held].sum(1)) <= near[:, held].sum(1)).all()
    # The histogram: every nonzero activation once, in its bin (the outer bins open-ended).
    assert (hist.counts.sum(1) == res.fire_count).all()
    edges = hist.edges.copy()
    edges[0], edges[-1] = 0.0, np.inf
    brute = np.stack([np.histogram(v[v > 0], edges)[0] for v in f_t])
    # A value within rounding of a bin edge may land on either side of it.
    assert np.abs(hist.counts - brute).sum() <= 2 + near.sum()
    assert brute[:, 0].sum() > 0 and brute[:, -1].sum() > 0  # both open ends are exercised
    # Marker groups: brute force over the whole token stream.
    tokens = np.concatenate([store.shard_tokens(k) for k in range(len(store.shards))])
    docs = np.concatenate([store.shard_index(k)[:, 0] for k in range(len(store.shards))])
    for g, seqs in enumerate(groups):
        member = np.zeros(len(tokens), bool)
        for ids in seqs:
            member[find_marker(tokens, ids, docs) + len(ids) - 1] = True
        assert res.group_rows[g] == member.sum()
        assert (np.abs(res.group_fire[g] - fired[:, member].sum(1)) <= near[:, member].sum(1)).all()


def test_context_windows_stay_in_their_document(small_store):
    store = small_store
    rows = np.array([0, 49, 50, 260, 1499, 53, 54])
    win = gather_windows(store, rows, before=3, after=2)
    tokens = np.concatenate([store.shard_tokens(k) for k in range(len(store.shards))])
    assert win["doc"].tolist() == [0, 0, 1, 5, 29, 1, 1]
    assert win["position"].tolist() == [1, 50, 1, 11, 50, 4, 5]
    # Row 53's window reaches back to row 50, document 1's first; row 54's does not.
    assert win["doc_start"].tolist() == [True, False, True, False, False, True, False]
    assert win["tokens"].shape == (7, 6)
    assert win["tokens"][0, :3].tolist() == [-1, -1, -1]  # nothing before the first row
    assert win["tokens"][1, 4:].tolist() == [-1, -1]  # row 49 ends document 0
    assert win["tokens"][3].tolist() == tokens[257:263].tolist()


# --- Latent scaling ------------------------------------------------------------------------


def test_latent_scaling_recovers_planted_scales(tmp_path):
    rng = np.random.default_rng(1)
    n, d = 3000, 8
    # Two distilled-only latents along e0 and e1; the base model carries the first with
    # scale 0 (truly exclusive) and the second with scale 0.8 (complete shrinkage).
    beta = np.array([[0.0, 2.0], [0.8, 1.0]])  # [latent, model]
    c = rng.uniform(0.5, 2.0, size=(n, 2)) * (rng.random((n, 2)) < 0.3)
    x = np.zeros((n, 2, d), np.float32)
    for j in range(2):
        x[:, :, j] = c[:, j : j + 1] * beta[j][None, :]
    x[:, :, 2:] = rng.normal(size=(n, 2, d - 2))  # other directions: noise
    store = _write_store(
        str(tmp_path / "s"), x, np.zeros(n, np.int32), np.arange(n) // 100, 500, "float32"
    )
    eye = np.eye(d, dtype=np.float32)
    tensors = {
        "W_enc": np.zeros((2, d, 2), np.float32),
        "b_enc": np.zeros(2, np.float32),
        "W_dec": np.zeros((2, 2, d), np.float32),
        "b_dec": np.zeros((2, d), np.float32),
    }
    for j in range(2):
        tensors["W_enc"][1, :, j] = eye[j] / beta[j, 1]  # f_j = c_j, read from distilled
        tensors["W_dec"][j, 1] = beta[j, 1] * eye[j]
    s = store.scales
    w_norm = export.normalised_decoder(tensors, {"scales": s.tolist()})
    fitter = LatentScaling([0, 1], [1, 1], w_dec=w_norm, b_dec=tensors["b_dec"], scales=s)
    all_shards = set(range(len(store.shards)))
    scan_store(
        store, ExportedCrosscoder(tensors), groups=[], heldout=all_shards, top_k=2,
        batch_rows=256, scaling=fitter, progress=False,
    )  # fmt: skip
    fits = fitter.result()
    # In normalised units beta_m = s_m beta[j, m] / (s_distilled beta[j, distilled]).
    expected = beta * s[None, :] / (s[1] * beta[:, 1:2])
    np.testing.assert_allclose(fits["beta_activation"], expected, atol=1e-4)
    np.testing.assert_allclose(fits["beta_error"], expected, atol=1e-4)
    # The closed form agrees with the streamed sums.
    xs = x * s[None, :, None]
    for j in range(2):
        b = fit_betas(c[:, j], xs, w_norm[j, 1])
        np.testing.assert_allclose(b, fits["beta_activation"][j], rtol=1e-4, atol=1e-6)
    # A latent that never fires has no fit: None, not NaN.
    assert fit_betas(np.zeros(n), xs, w_norm[0, 1]) is None


def _decoupling_crosscoder(d=6):
    """A hand-made crosscoder (model 0 base, 1 distilled; raw = normalised, scales 1) whose
    latents each read one coordinate of one model, so f_j is that coordinate exactly:

      0: base-only, reads/writes e0 in base. The distilled model carries e0 at 0.9 of the
         base's scale, but no latent writes e0 there (complete shrinkage).
      1: base-only, reads/writes e1 in base; latent 3 is its distilled twin (decoupling).
      2: base-only, reads/writes e2 in base; the distilled model has only noise along e2.
      3: distilled-only, reads/writes e1 in the distilled model.
      4: base-only, never fires (bias far below 0).
    """
    t = {
        "W_enc": np.zeros((2, d, 5), np.float32),
        "b_enc": np.zeros(5, np.float32),
        "W_dec": np.zeros((5, 2, d), np.float32),
        "b_dec": np.zeros((2, d), np.float32),
    }
    eye = np.eye(d, dtype=np.float32)
    for j, (model, axis) in enumerate([(0, 0), (0, 1), (0, 2), (1, 1), (0, 3)]):
        t["W_enc"][model, :, j] = eye[axis]
        t["W_dec"][j, model] = eye[axis]
    t["b_enc"][4] = -1e6
    return t


def test_latent_scaling_ratios_on_both_sides():
    rng = np.random.default_rng(3)
    n, d = 4000, 6
    c = rng.uniform(0.5, 2.0, size=(n, 3)) * (rng.random((n, 3)) < 0.3)  # concepts e0, e1, e2
    noise = rng.normal(scale=0.5, size=n)
    x = np.zeros((n, 2, d), np.float32)
    x[:, 0, :3] = c  # base: all three concepts
    x[:, 1, 0] = 0.9 * c[:, 0]  # distilled: e0 at 0.9 (no latent writes it there)
    x[:, 1, 1] = c[:, 1]  # e1, written by latent 3
    x[:, 1, 2] = noise  # e2: independent of concept 2 (truly absent)
    x[:, :, 3:] = rng.normal(size=(n, 2, d - 3))  # other directions
    tensors = _decoupling_crosscoder(d)
    nrn = relative_norms(decoder_norms(tensors["W_dec"]))
    classes = classify(nrn, 0.1, 0.9)
    assert classes.tolist() == [0, 0, 0, 2, 0]
    ids, owner = scaling.select_latents(nrn, classes, 10, base=0, distilled=1)
    assert ids.tolist() == [0, 1, 2, 3, 4] and owner.tolist() == [0, 0, 0, 1, 0]
    fitter = LatentScaling(
        ids, owner, w_dec=tensors["W_dec"], b_dec=tensors["b_dec"], scales=np.ones(2)
    )
    enc = ExportedCrosscoder(tensors)
    for lo in range(0, n, 1000):  # the sums accumulate over batches
        xb = torch.from_numpy(x[lo : lo + 1000])
        f_t = enc.encode_t(xb)
        fitter.update(f_t, xb, enc.decode_t(f_t))
    fits = fitter.result(min_rows=5)
    lines, summary = scaling.report(
        ids, owner, classes, fits, roles={"base": 0, "distilled": 1}, false_ratio=0.5, min_rows=5
    )
    # Hand-computed: beta_m = sum f <u, y_m> / sum f^2 with u a unit axis and f = c_j.
    #  latent 0: error targets base c0, distilled 0.9 c0 -> 0.9; reconstruction base c0,
    #            distilled 0 (nothing writes e0 there) -> 0.
    #  latent 1: error base c1 - c1 + c1, distilled c1 - c1 (latent 3) -> 0; reconstruction
    #            base c1, distilled c1 (latent 3) -> 1.
    #  latent 2: error base c2, distilled the noise -> sum c2 noise / sum c2^2, which is 0
    #            within 4 of its standard deviations 0.5 / sqrt(sum c2^2); reconstruction 0.
    #  latent 3: the mirror image of latent 1 with the distilled model as owner.
    tight = 1e-5  # float32 sums of exact products
    sd2 = 0.5 / np.sqrt(np.sum(c[:, 2] ** 2))
    for i, err, rec, atol_err in [
        (0, 0.9, 0.0, tight), (1, 0.0, 1.0, tight), (2, 0.0, 0.0, 4 * sd2), (3, 0.0, 1.0, tight)
    ]:  # fmt: skip
        assert lines[i]["ratio_error"] == pytest.approx(err, abs=atol_err), i
        assert lines[i]["ratio_reconstruction"] == pytest.approx(rec, abs=tight), i
        assert lines[i]["false_exclusive"] is (err > 0.5)
        # The owner carries its own latent fully on both targets.
        own = owner[i]
        assert lines[i]["beta_error"][own] == pytest.approx(1.0, abs=tight)
        assert lines[i]["beta_reconstruction"][own] == pytest.approx(1.0, abs=tight)
    assert lines[0]["owner"] == "base" and lines[3]["owner"] == "distilled"
    assert lines[3]["side"] == "distilled_only"
    # The latent that never fires: no fit, None with a reason.
    assert lines[4]["rows"] == 0 and lines[4]["ratio_error"] is None
    assert lines[4]["beta_error"] is None and "reason" in lines[4]
    b, dist = summary["base_only"], summary["distilled_only"]
    assert (b["n_latents"], b["n_selected"], b["n_fitted"], b["n_false_exclusive"]) == (4, 4, 3, 1)
    assert b["ratio_error"]["n"] == 3 and b["ratio_reconstruction"]["median"] == pytest.approx(
        0.0, abs=tight
    )
    assert b["share_false_exclusive"]["mean"] == pytest.approx(1 / 3)
    assert (dist["n_fitted"], dist["n_false_exclusive"]) == (1, 0)
    assert dist["ratio_reconstruction"]["median"] == pytest.approx(1.0, abs=tight)
    assert set(summary) == {"base_only", "distilled_only", "false_ratio", "targets"}
    strict.dumps([lines, summary])  # no NaN anywhere


def test_scaling_budget_is_split_between_sides():
    nrn = np.array([0.0, 0.01, 0.02, 0.03, 0.04, 1.0, 0.5])
    classes = classify(nrn, 0.1, 0.9)
    ids, owner = scaling.select_latents(nrn, classes, 3, base=0, distilled=1)
    # One distilled-only latent: it is kept, and the base side takes the rest of the budget.
    assert ids.tolist() == [0, 1, 5] and owner.tolist() == [0, 0, 1]
    ids, _ = scaling.select_latents(nrn, classes, 1, base=0, distilled=1)
    assert ids.tolist() == [5]


# --- Splice-in -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_models(micro_pair):
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    return [load(micro_pair[r]).eval() for r in ("base", "distilled")]


def test_splice_with_perfect_reconstruction_equals_clean(micro_models, tokenizer):
    docs = [np.asarray(tokenizer(t)["input_ids"], np.int64) for t in CORPUS[:5]]
    out = splice_ce(micro_models, 1, docs, reconstruct=lambda x: x.clone(), batch_size=2)
    for r in out.values():
        assert r["spliced_ce"] == pytest.approx(r["clean_ce"], abs=1e-6)
        assert r["zero_ce"] != pytest.approx(r["clean_ce"], abs=1e-3)
        assert r["fraction_recovered"] == pytest.approx(1.0, abs=1e-5)
        assert r["tokens"] == sum(len(d) - 2 for d in docs)


def test_splice_leaves_position_zero_alone(micro_models, tokenizer):
    # A reconstruction that only differs at position 0 must not change anything.
    def corrupt_first(x):
        y = x.clone()
        y[:, 0] = 100.0
        return y

    docs = [np.asarray(tokenizer(t)["input_ids"], np.int64) for t in CORPUS[:3]]
    out = splice_ce(micro_models, 1, docs, reconstruct=corrupt_first, batch_size=3)
    for r in out.values():
        assert r["spliced_ce"] == pytest.approx(r["clean_ce"], abs=1e-6)


def test_splice_leaves_excluded_tokens_alone(micro_models, tokenizer):
    # A reconstruction wrong only at the excluded token "?" and at positions < 2 changes
    # nothing when the store excludes them, and those predictions are not scored.
    (mark,) = tokenizer.encode("?", add_special_tokens=False)
    exclusion = Exclusion(first=2, token_ids=(mark,))
    docs = [np.asarray(tokenizer(t)["input_ids"], np.int64) for t in CORPUS[:3]]
    assert all(mark in d[2:-1] for d in docs)

    def corrupt_excluded(x):
        ids, _ = pad_documents(docs, 0)
        bad = ~exclusion.keep(ids)
        return torch.where(bad[..., None, None], torch.full_like(x, 100.0), x)

    out = splice_ce(micro_models, 1, docs, corrupt_excluded, batch_size=3, exclusion=exclusion)
    scored = sum(int(exclusion.keep(d)[:-1].sum()) for d in docs)
    for r in out.values():
        assert r["spliced_ce"] == pytest.approx(r["clean_ce"], abs=1e-6)
        assert r["tokens"] == scored == sum(int((d[2:-1] != mark).sum()) for d in docs)
    # The same reconstruction does change the CE where those positions are not excluded.
    out = splice_ce(micro_models, 1, docs, corrupt_excluded, batch_size=3)
    for r in out.values():
        assert abs(r["spliced_ce"] - r["clean_ce"]) > 1e-3


# --- Bad inputs ----------------------------------------------------------------------------


def test_export_and_store_from_different_sites(small_store):
    config = {
        "layer": 1,
        "d_model": 16,
        "n_models": 2,
        "tokenizer_sha256": "test",
        "models": [{"role": "base"}, {"role": "distilled"}],
    }
    check_pair(small_store, config)  # the matching pair passes
    with pytest.raises(export.ExportError, match="layer: export 3, store 1"):
        check_pair(small_store, {**config, "layer": 3})
    other = [{"role": "base", "source": "other/model"}, {"role": "distilled"}]
    with pytest.raises(export.ExportError, match="models"):
        check_pair(small_store, {**config, "models": other})


def test_export_with_missing_tensors(analysed, tmp_path):
    config, workdir, _ = analysed
    broken = str(tmp_path / "w")
    shutil.copytree(workdir, broken, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    path = os.path.join(wd.export_dir(broken), export.EXPORT_WEIGHTS)
    tensors, _ = export.load_export(wd.export_dir(broken))
    save_file({k: v for k, v in tensors.items() if k != "W_dec"}, path)
    # An export written without W_dec (its recorded hash updated to match: a complete file
    # that lacks a tensor, not a damaged one).
    cpath = os.path.join(wd.export_dir(broken), export.EXPORT_CONFIG)
    meta = json.load(open(cpath))
    meta[export.WEIGHTS_SHA256] = stage.file_sha(path)
    json.dump(meta, open(cpath, "w"))
    with pytest.raises(export.ExportError, match="lacks tensors \\['W_dec'\\]"):
        run_analysis(config, broken, progress=False)


def _record_split(workdir: str, eval_shards: int, heldout: list[int]) -> None:
    """Records in the export's config the split training used, as training records it."""
    cpath = os.path.join(wd.export_dir(workdir), export.EXPORT_CONFIG)
    with open(cpath) as f:
        meta = json.load(f)
    meta[split.KEY] = {"eval_shards": eval_shards, "heldout_shards": heldout, "group_shards": 1}
    with open(cpath, "w") as f:
        json.dump(meta, f)


def test_no_heldout_shards_is_a_clear_error(analysed, tmp_path):
    """Without held-out shards the analysis stops instead of reporting training rows as
    held-out ones."""
    config, workdir, _ = analysed
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    _record_split(copy, 0, [])  # trained without held-out shards
    c = config.copy_and_resolve_references()
    c.train.eval_shards = 0
    with pytest.raises(ConfigError, match=r"no held-out shards \(train.eval_shards = 0\)"):
        run_analysis(c, copy, progress=False)
    assert not os.path.exists(os.path.join(wd.stage_dir(copy, "analysis"), "summary.json"))


def test_a_split_other_than_trainings_is_refused(analysed, tmp_path):
    """The held-out shards are those training recorded: a config whose train.eval_shards
    differs is refused with one line, by the shared inputs of the analysis, steering and the
    ablation, before any output is touched."""
    config, workdir, _ = analysed
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    n = len(ActivationStore(wd.activations_dir(copy)).shards)
    k = int(config.train.eval_shards)
    _record_split(copy, k, list(range(n - k, n)))
    inputs = load_inputs(config, copy)  # the recorded split, as training used it
    assert (inputs.train, inputs.heldout) == (list(range(n - k)), list(range(n - k, n)))
    c = config.copy_and_resolve_references()
    c.train.eval_shards = k + 1
    summary = os.path.join(wd.stage_dir(copy, "analysis"), "summary.json")
    before = os.path.getmtime(summary)
    for run in (lambda: load_inputs(c, copy), lambda: run_analysis(c, copy, progress=False)):
        with pytest.raises(ConfigError, match=f"trained with train.eval_shards = {k}") as e:
            run()
        assert "\n" not in str(e.value)
    assert os.path.getmtime(summary) == before  # the analysis of the recorded split stays


# --- End to end on the micro pair ------------------------------------------------------------


@pytest.fixture(scope="module")
def analysed(micro_pair, tmp_path_factory):
    from xcoder_jax.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("analysis_run"))
    c = micro_config(micro_pair)
    c.crosscoder.d_model = 16
    c.crosscoder.n_latents = 64
    c.train.steps, c.train.batch_size, c.train.lr = 40, 64, 1e-2
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 20
    c.analysis.splice_docs = 4
    c.analysis.top_latents = 5
    # 40 steps leave every NRN near 0.5: narrow bands give both sides exclusive latents, so
    # latent scaling runs on both sides end to end.
    c.analysis.base_only_max, c.analysis.distilled_only_min = 0.45, 0.55
    extract(c, workdir)
    train_and_evaluate(c, workdir)
    summary = run_analysis(c, workdir, progress=False)
    return c, workdir, summary


def test_summary_and_latents_follow_the_contract(analysed):
    config, workdir, summary = analysed
    for key in (
        "fve", "l0", "dead_fraction", "tokens_trained", "distinct_tokens_trained", "nrn_hist",
        "n_base_only", "n_shared", "n_distilled_only", "mean_nrn", "categories", "splice",
    ):  # fmt: skip
        assert key in summary, key
    h = config.crosscoder.n_latents
    n_classes = [summary[f"n_{c}"] for c in ("base_only", "shared", "distilled_only", "dead")]
    assert sum(n_classes) == h
    assert summary["n_dead"] == round(summary["dead_fraction"] * h)
    assert sum(summary["nrn_hist"]["counts"]) == h
    exported = json.load(open(os.path.join(wd.export_dir(workdir), "config.json")))
    # FVE is a share (it can sit near 0 in a short run): an absolute tolerance. The training
    # evaluation encodes in JAX, the analysis in PyTorch; an activation within rounding of
    # the ReLU's 0 may count in one and not the other, hence a few flips of 1 / rows in L0.
    np.testing.assert_allclose(summary["fve"], exported["eval"]["fve"], rtol=0, atol=1e-4)
    assert summary["l0"] == pytest.approx(exported["eval"]["l0"], abs=3 / summary["heldout_rows"])
    sr = summary["categories"]["self_reflection"]
    assert sr["occurrences"] == sum(t.count(" Wait") for t in CORPUS)
    assert summary["categories"]["alternative"]["occurrences"] == 0  # absent from CORPUS
    for role in ("base", "distilled"):
        s = summary["splice"][role]
        assert s["docs"] >= 1 and np.isfinite(s["spliced_ce"])
    with open(os.path.join(wd.stage_dir(workdir, "analysis"), "latents.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [ln["id"] for ln in lines] == list(range(h))
    # One classification: dead exactly when the latent never fired on a held-out row, else
    # its NRN band; the summary counts the lines' classes.
    bands = classify(np.array([ln["nrn"] for ln in lines]), config.analysis.base_only_max,
                     config.analysis.distilled_only_min)  # fmt: skip
    for ln, band in zip(lines, bands):
        assert ln["class"] == ("dead" if ln["firing_freq"] == 0 else CLASSES[band])
    for c in ("base_only", "shared", "distilled_only", "dead"):
        assert summary[f"n_{c}"] == sum(ln["class"] == c for ln in lines)
    firing = [ln for ln in lines if ln["top_examples"]]
    assert firing
    ex = firing[0]["top_examples"][0]
    assert set(ex) >= {"activation", "left", "token", "right", "doc", "position", "doc_start"}
    acts = [e["activation"] for e in firing[0]["top_examples"]]
    assert acts == sorted(acts, reverse=True)


def test_results_are_strict_json_with_alive_baselines_and_scaling(analysed):
    config, workdir, summary = analysed
    out = wd.stage_dir(workdir, "analysis")
    with open(os.path.join(out, "summary.json")) as f:
        on_disk = strict_loads(f.read())
    assert on_disk == summary
    with open(os.path.join(out, "latents.jsonl")) as f:
        lines = [strict_loads(line) for line in f]
    assert "scaling" not in summary and "alive" not in summary
    # The alive baseline is the mean NRN of the latents active on some store row.
    alive = [ln["nrn"] for ln in lines if ln["firing_freq_store"] > 0]
    assert summary["alive_latents"] == len(alive)
    assert summary["mean_nrn_alive"] == pytest.approx(np.mean(alive), abs=1e-5)  # rounded nrn
    assert sum(summary["nrn_hist_alive"]["counts"]) == len(alive)
    for c in summary["categories"].values():
        assert c["mean_nrn_alive"] == summary["mean_nrn_alive"]
        assert "nrn_gap" not in c and "mean_nrn_all" not in c
        assert set(c["nrn_minus_alive"]) >= {"mean", "lo", "hi", "n", "method"}
        assert c["top_distilled_only"]["n_top"] == len(c["top_latents"])
    # Latent scaling: both sides, each fitted latent with both named ratios.
    ls = summary["latent_scaling"]
    assert set(ls) == {"base_only", "distilled_only", "false_ratio", "targets"}
    fitted = {ln["id"]: ln["scaling"] for ln in lines if ln["scaling"] is not None}
    by_id = {ln["id"]: ln for ln in lines}
    for side in ("base_only", "distilled_only"):
        # Per NRN band: a dead latent of the band is selected but cannot be fitted.
        mine = [sc for sc in fitted.values() if sc["side"] == side]
        assert ls[side]["n_latents"] == ls[side]["n_selected"] == len(mine) > 0
        assert summary[f"n_{side}"] == sum(by_id[i]["class"] == side for i in fitted)
        dead = [i for i, sc in fitted.items() if sc["side"] == side and by_id[i]["class"] == "dead"]
        assert all(not fitted[i]["beta_error"] for i in dead)
        assert ls[side]["n_fitted"] == sum(sc["beta_error"] is not None for sc in mine)
        assert ls[side]["n_false_exclusive"] == sum(sc["false_exclusive"] is True for sc in mine)
        for sc in mine:
            assert {"ratio_error", "ratio_reconstruction"} <= set(sc)
            assert sc["owner"] == ("base" if side == "base_only" else "distilled")
            assert (sc["ratio_error"] is None) == (sc["false_exclusive"] is None)
        ratios = [sc["ratio_error"] for sc in mine if sc["ratio_error"] is not None]
        if ratios:
            assert ls[side]["ratio_error"]["median"] == pytest.approx(np.median(ratios), abs=1e-4)
    # Budget 4096: every latent of both bands is selected, dead or alive.
    assert ls["base_only"]["n_latents"] + ls["distilled_only"]["n_latents"] == len(fitted)


def test_strict_json_refuses_nan():
    with pytest.raises(ValueError):
        strict.dumps({"x": float("nan")})
    assert strict.finite_or_none({"a": [1.0, float("inf")], "b": (float("nan"), "s")}) == {
        "a": [1.0, None],
        "b": [None, "s"],
    }


def test_rerun_is_skipped(analysed):
    config, workdir, summary = analysed
    path = os.path.join(wd.stage_dir(workdir, "analysis"), "summary.json")
    before = os.path.getmtime(path)
    assert run_analysis(config, workdir, progress=False) == summary
    assert os.path.getmtime(path) == before


def test_report_escapes_text_and_handles_empty_values(analysed):
    _, _, summary = analysed
    line = {
        "nrn": 0.95,
        "firing_freq": 0.01,
        "cosine": 0.1,
        "label": "<b>x</b>",
        "categories": [],
        "top_examples": [
            {"left": "a<script>", "token": "&", "right": "</table>", "activation": 1.0,
             "doc": 0, "position": 3, "doc_start": True}
        ],
    }  # fmt: skip
    s = {**summary, "top_distilled_only": [7], "top_base_only": []}
    page = render_html(s, {7: line}, {})
    assert "<script>" not in page and "a&lt;script&gt;" in page and "<b>x</b>" not in page


def test_report_shows_alive_baseline_and_scaling_per_side(analysed):
    _, _, summary = analysed
    s = json.loads(json.dumps(summary))
    sr = s["categories"]["self_reflection"]
    sr["nrn_minus_alive"] = {"mean": 0.123, "lo": 0.045, "hi": 0.2, "n": 9, "method": "m"}
    s["latent_scaling"]["base_only"]["ratio_error"] = {
        "median": 0.777, "p10": 0.1, "p90": 0.9, "n": 3
    }  # fmt: skip
    page = render_html(s, {}, {})
    assert "0.123 [0.045, 0.200]" in page  # the category difference with its CI
    assert "0.777 [0.100, 0.900] (n 3)" in page  # a side's error ratio
    assert "reconstruction ratio" in page and "alive baseline" in page


def _chromium(*args: str) -> str:
    """Runs headless Chromium with a fresh profile and `args`; returns its stdout. Fails on
    a non-zero exit or on any console message (a script error in the page)."""
    profile = tempfile.mkdtemp()
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    return proc.stdout


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(analysed, tmp_path):
    _, workdir, _ = analysed
    report = os.path.join(wd.stage_dir(workdir, "analysis"), "report.html")
    shot = str(tmp_path / "report.png")
    _chromium(f"--screenshot={shot}", "--window-size=1280,2000", f"file://{report}")
    assert os.path.getsize(shot) > 50_000


# --- The feature browser -----------------------------------------------------------------------


def _browser_data(workdir) -> dict:
    """The JSON the page carries, read back from browser.html."""
    with open(os.path.join(wd.stage_dir(workdir, "analysis"), "browser.html")) as f:
        page = f.read()
    start = page.index('<script type="application/json" id="data">') + 42
    return strict_loads(page[start : page.index("</script>", start)].replace("<\\/", "</"))


def _context_f(store, tensors, latent, row, before, after):
    """Brute force: f of `latent` at rows row - before .. row + after of row's document,
    float64 from the export's raw tensors (no threshold: an l1 export)."""
    index = np.concatenate([store.shard_index(k) for k in range(len(store.shards))])
    rows = [r for r in range(row - before, row + after + 1)
            if 0 <= r < store.n_rows and index[r, 0] == index[row, 0]]  # fmt: skip
    x = store.rows(np.array(rows)).reshape(len(rows), -1).astype(np.float64)
    w = np.asarray(tensors["W_enc"], np.float64).reshape(-1, tensors["W_enc"].shape[-1])
    tokens = np.concatenate([store.shard_tokens(k) for k in range(len(store.shards))])[rows]
    return rows, tokens.tolist(), np.maximum(x @ w[:, latent] + tensors["b_enc"][latent], 0.0)


def test_browser_data_against_brute_force(analysed):
    config, workdir, _ = analysed
    ac = config.analysis
    data = _browser_data(workdir)
    store = ActivationStore(wd.activations_dir(workdir))
    tensors, export_config = export.load_export(wd.export_dir(workdir), "numpy")
    assert "threshold" not in tensors  # the brute force assumes a plain ReLU
    with open(os.path.join(wd.stage_dir(workdir, "analysis"), "latents.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [(r["id"], r["nrn"], r["class"]) for r in data["latents"]] == [
        (ln["id"], ln["nrn"], ln["class"]) for ln in lines
    ]
    alive = [ln["id"] for ln in lines if ln["top_examples"]]
    assert sorted(map(int, data["details"])) == alive  # 64 latents: under browser_latents
    dec_norm = np.linalg.norm(tensors["W_dec"], axis=-1)  # [h, m] raw
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(config.models[r]) for r in data["roles"]]
    for i in alive[:6]:
        d = data["details"][str(i)]
        np.testing.assert_allclose(d["dec_norm"], dec_norm[i], rtol=1e-5)
        for e, line_ex in zip(d["examples"], lines[i]["top_examples"]):
            rows, tokens, f = _context_f(store, tensors, i, line_ex["row"], ac.context_before,
                                         ac.context_after)  # fmt: skip
            assert e["tokens"] == tokens
            np.testing.assert_allclose(e["f"], f, rtol=1e-4, atol=1e-5)
            assert e["f"][e["centre"]] == pytest.approx(line_ex["activation"], rel=1e-4)
            assert rows[e["centre"]] == line_ex["row"]
        # Histogram: every nonzero activation of the store, once.
        n = round(lines[i]["firing_freq_store"] * store.n_rows)
        assert sum(d["hist"]["counts"]) == n
        # Promoted tokens: W_U (gamma * W_dec[i, m]) by hand.
        for m, model in enumerate(models):
            w_u = model.lm_head.weight.detach().double().numpy()
            gamma = model.model.norm.weight.detach().double().numpy()
            logits = w_u @ (gamma * tensors["W_dec"][i, m].astype(np.float64))
            top = np.argsort(-logits)[: ac.browser_promoted]
            assert [t for t, _ in d["promoted"][m]] == top.tolist()
            np.testing.assert_allclose([v for _, v in d["promoted"][m]], logits[top], atol=1e-4)


def _dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium; fails on a console
    message (a script error)."""
    return _chromium("--dump-dom", url)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless Chromium is not installed")
def test_browser_driven_in_headless_chromium(analysed):
    """Filters, sorts and clicks through the page's own controls (the URL fragment fires
    their events), then reads the listed rows and the shaded contexts from the DOM."""
    import html as htmlmod
    import re

    _, workdir, _ = analysed
    data = _browser_data(workdir)
    page = "file://" + os.path.join(wd.stage_dir(workdir, "analysis"), "browser.html")
    # A filter that lists some latents and hides others: the class and a top token (not
    # blank) of the most frequent latent that has one.
    by_freq = sorted(data["latents"], key=lambda r: (-r["freq_store"], r["id"]))
    cls, q = next((r["class"], t.strip()) for r in by_freq for t in r["top_tokens"] if t.strip())
    vocab = data["vocab"]

    def listed(r):
        prom = [vocab[str(t)] for ps in data["details"].get(str(r["id"]), {}).get("promoted", [])
                for t, _ in ps]  # fmt: skip
        return (
            r["class"] == cls
            and 0.3 <= r["nrn"] <= 0.9
            and any(q.lower() in w.lower() for w in r["top_tokens"] + prom)
        )

    want = sorted((r for r in data["latents"] if listed(r)), key=lambda r: (-r["nrn"], r["id"]))
    assert 0 < len(want) < len(data["latents"])
    frag = urllib.parse.urlencode({"class": cls, "nrn_min": 0.3, "nrn_max": 0.9, "q": q,
                                   "sort": "nrn", "dir": "desc", "open": "first"})  # fmt: skip
    dom = _dump_dom(f"{page}#{frag}")
    assert re.search(r'id="count"[^>]*data-n="(\d+)"', dom).group(1) == str(len(want))
    rows = [int(i) for i in re.findall(r'<tr data-id="(\d+)"', dom)]
    assert rows == [r["id"] for r in want]
    # The click opened the first listed latent: its contexts, side by side, each token's
    # contribution f * ||W_dec[i, m]|| and its shading on one scale for both models.
    first = want[0]["id"]
    assert re.search(r'id="detail" data-id="(\d+)"', dom).group(1) == str(first)
    d = data["details"][str(first)]
    sides = re.findall(r'<div class="side" data-role="(\w+)">(.*?)</div>', dom)
    assert [role for role, _ in sides] == data["roles"] * len(d["examples"])
    top = max(f * max(d["dec_norm"]) for e in d["examples"] for f in e["f"])
    # Chromium writes an opaque colour as rgb(...): alpha 1.
    tok_re = r'<span class="tok( centre)?" data-f="([^"]*)" data-c="([^"]*)"[^>]*' \
             r'background: rgba?\(255, 120, 0(?:, ([\d.]+))?\);">(.*?)</span>'  # fmt: skip
    for k, (role, body) in enumerate(sides):
        e, m = d["examples"][k // 2], data["roles"].index(role)
        spans = re.findall(tok_re, body)
        assert [htmlmod.unescape(s[4]) for s in spans] == [
            vocab[str(t)].replace("\n", "\u21b5") for t in e["tokens"]
        ]
        assert [bool(s[0]) for s in spans].index(True) == e["centre"]
        c = np.array([float(s[2]) for s in spans])
        np.testing.assert_allclose(c, np.array(e["f"]) * d["dec_norm"][m], rtol=1e-6)
        # Chromium keeps a colour's alpha in 8 bits: a step of 1/255.
        alpha = [float(s[3] or 1) for s in spans]
        np.testing.assert_allclose(alpha, c / top, atol=1 / 255 + 5e-4)
    proms = re.findall(r'<ol data-role="(\w+)">(.*?)</ol>', dom)
    for role, body in proms:
        ids = [int(t) for t in re.findall(r'data-token="(\d+)"', body)]
        assert ids == [t for t, _ in d["promoted"][data["roles"].index(role)]]
    bars = [int(c) for c in re.findall(r'<rect [^>]*data-count="(\d+)"', dom)]
    assert bars == d["hist"]["counts"]
    # A latent the filter hides cannot be clicked: nothing opens.
    hidden = next(r["id"] for r in data["latents"] if not listed(r))
    frag = urllib.parse.urlencode({"class": cls, "nrn_min": 0.3, "nrn_max": 0.9, "q": q,
                                   "open": hidden})  # fmt: skip
    dom = _dump_dom(f"{page}#{frag}")
    assert 'id="detail"><p class="muted">No latent selected.' in dom


def synthetic_browser_data(n: int, dead=(), detailed=()) -> dict:
    """`browser.browser_data`'s layout for `n` latents made up by hand (no store, no model):
    latent i has NRN i / n, its class by the 0.1 / 0.9 bands or "dead" for the ids in `dead`,
    the label "digit", and contexts (one example, tokens "a", " b", "c", firing on " b")
    for the ids in `detailed`."""
    nrn = np.round(np.arange(n) / n, 5)
    alive = ~np.isin(np.arange(n), list(dead))
    classes = classify(nrn, 0.1, 0.9, alive)
    latents = [
        {"id": i, "nrn": float(nrn[i]), "class": CLASSES[classes[i]], "cosine": 0.5,
         "freq": 0.01 * bool(alive[i]), "freq_store": 0.01 * bool(alive[i]),
         "ratio_error": None, "ratio_reconstruction": None, "categories": [], "label": "digit",
         "top_tokens": ["7"]}
        for i in range(n)
    ]  # fmt: skip
    example = {"tokens": [0, 1, 2], "centre": 1, "f": [0.0, 1.5, 0.25], "doc": 3,
               "position": 5, "doc_start": False}  # fmt: skip
    details = {
        str(i): {"dec_norm": [1.0, 2.0], "examples": [example],
                 "hist": {"first": 2, "counts": [1, 3]}}
        for i in detailed
    }  # fmt: skip
    return {
        "roles": ["base", "distilled"], "classes": list(CLASSES),
        "categories": list(CATEGORY_NAMES), "store_rows": 100, "first_position": 1,
        "hist_edges": [float(f"{v:.4g}") for v in ActivationHistogram(1).edges],
        "vocab": {"0": "a", "1": " b", "2": "c"}, "latents": latents, "details": details,
        "limits": {"browser_latents": 2048, "examples": 5},
    }  # fmt: skip


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless Chromium is not installed")
def test_browser_opens_any_latent_from_its_hash(tmp_path):
    """#latent=<id> opens a latent the table does not list (past its first 1,000 rows, or
    hidden by a filter); dead latents are a class of their own in the filter."""
    import re

    from xcoder_jax.analysis.browser import write_browser

    path = tmp_path / "browser.html"
    write_browser(str(path), synthetic_browser_data(1500, dead=(3, 1400), detailed=(1234,)))
    page = f"file://{path}"
    dom = _dump_dom(f"{page}#latent=1234")
    rows = [int(i) for i in re.findall(r'<tr data-id="(\d+)"', dom)]
    assert rows == list(range(1000))  # no filter typed: the first 1,000 rows only
    assert re.search(r'id="detail" data-id="(\d+)"', dom).group(1) == "1234"
    assert "<h2>Latent 1234</h2>" in dom and "NRN 0.823, shared" in dom
    # Its contexts, side by side: the firing token " b" centred in both models.
    assert re.findall(r'<span class="tok centre"[^>]*>(.*?)</span>', dom) == [" b", " b"]
    # Whatever the filters: a class that hides it.
    dom = _dump_dom(f"{page}#class=base_only&latent=1234")
    rows = [int(i) for i in re.findall(r'<tr data-id="(\d+)"', dom)]
    assert rows == [i for i in range(150) if i != 3]  # NRN < 0.1, latent 3 dead
    assert re.search(r'id="detail" data-id="(\d+)"', dom).group(1) == "1234"
    # Dead latents: their own class (NRN 0.002 and 0.933 would be shared and distilled-only).
    dom = _dump_dom(f"{page}#class=dead&latent=1500")
    assert [int(i) for i in re.findall(r'<tr data-id="(\d+)"', dom)] == [3, 1400]
    assert dom.count('<td class="cls-dead">dead</td>') == 2
    assert "No latent 1500: ids run from 0 to 1499." in dom  # an id past the last: said so
