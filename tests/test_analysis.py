"""Analysis: relative norms, marker ids, streaming top-k, latent scaling, splice-in, the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.conftest import CORPUS, make_tokenizer, micro_config, store_writer
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore, extract
from xcoder_jax.analysis import (
    Encoder,
    LatentScaling,
    check_pair,
    classify,
    decoder_cosine,
    decoder_norms,
    firing_latents,
    fit_betas,
    gather_windows,
    relative_norms,
    run_analysis,
    scan_store,
    splice_ce,
    stream,
)
from xcoder_jax.analysis import categories as cats
from xcoder_jax.analysis.report import render_html
from xcoder_jax.lexicon import CATEGORIES, CATEGORY_NAMES, find_marker, marker_token_ids

CHROMIUM = "/usr/bin/chromium"


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
    np.testing.assert_allclose(norms[0], [expected, 0.0], rtol=1e-6)


def test_nrn_is_measured_in_normalised_units():
    # Equal raw rows, but the distilled model's scale is 3x: its normalised row is 3x longer.
    raw = {"W_dec": np.ones((1, 2, 4), np.float32)}
    w = ckpt.normalised_decoder(raw, {"scales": [1.0, 3.0]})
    assert relative_norms(decoder_norms(w))[0] == pytest.approx(0.75)


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


def test_category_without_occurrences_is_reported_as_zero(tokenizer):
    groups = cats.marker_groups(tokenizer)
    g, h = len(groups.groups), 8
    stats, tags = cats.category_stats(
        groups,
        np.zeros(g, np.int64),
        np.zeros((g, h)),
        np.zeros((g, h)),
        np.ones(h, np.int64),
        np.full(h, 0.5),
        np.ones(h, np.int8),
        0.1,
        5,
        10,
    )
    for c in stats.values():
        assert c["occurrences"] == 0 and c["n_firing_latents"] == 0
        assert c["mean_nrn"] is None and c["top_latents"] == []
    assert tags == {}
    assert firing_latents(np.array([0, 10, 2, 1]), 0.1).tolist() == [1, 2]


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
    enc = Encoder(_random_export(2, 16, 40))
    groups = [[(1, 2)], [(3,), (4, 5)]]
    res = scan_store(store, enc, groups, {5}, top_k=5, batch_rows=100, progress=False)
    acts = np.concatenate([a for _, a in store.iter_shards()]).astype(np.float32)
    f_t = enc.encode_t(torch.from_numpy(acts))  # [h, N], all rows at once
    vals, rows = torch.topk(f_t, 5, dim=1)
    np.testing.assert_allclose(res.top_values, vals.numpy(), rtol=1e-6)
    assert (res.top_rows == np.where(vals.numpy() > 0, rows.numpy(), -1)).all()
    fired = (f_t > 0).numpy()
    assert (res.fire_count == fired.sum(1)).all()
    held = slice(int(store.shard_offsets[5]), int(store.shard_offsets[6]))
    assert (res.fire_heldout == fired[:, held].sum(1)).all()
    # Marker groups: brute force over the whole token stream.
    tokens = np.concatenate([store.shard_tokens(k) for k in range(len(store.shards))])
    docs = np.concatenate([store.shard_index(k)[:, 0] for k in range(len(store.shards))])
    for g, seqs in enumerate(groups):
        member = np.zeros(len(tokens), bool)
        for ids in seqs:
            member[find_marker(tokens, ids, docs) + len(ids) - 1] = True
        assert res.group_rows[g] == member.sum()
        np.testing.assert_allclose(res.group_fire[g], fired[:, member].sum(1))


def test_context_windows_stay_in_their_document(small_store):
    store = small_store
    rows = np.array([0, 49, 50, 260, 1499])
    win = gather_windows(store, rows, before=3, after=2)
    tokens = np.concatenate([store.shard_tokens(k) for k in range(len(store.shards))])
    assert win["doc"].tolist() == [0, 0, 1, 5, 29]
    assert win["position"].tolist() == [1, 50, 1, 11, 50]
    assert win["doc_start"].tolist() == [True, False, True, False, False]
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
    w_norm = ckpt.normalised_decoder(tensors, {"scales": s.tolist()})
    fitter = LatentScaling([0, 1], [1, 1], w_norm, tensors["b_dec"], s)
    all_shards = set(range(len(store.shards)))
    scan_store(store, Encoder(tensors), [], all_shards, 2, 256, scaling=fitter, progress=False)
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
    with pytest.raises(ckpt.ExportError, match="layer: export 3, store 1"):
        check_pair(small_store, {**config, "layer": 3})
    other = [{"role": "base", "source": "other/model"}, {"role": "distilled"}]
    with pytest.raises(ckpt.ExportError, match="models"):
        check_pair(small_store, {**config, "models": other})


def test_export_with_missing_tensors(analysed, tmp_path):
    config, workdir, _ = analysed
    broken = str(tmp_path / "w")
    shutil.copytree(workdir, broken, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    path = os.path.join(wd.export_dir(broken), ckpt.EXPORT_WEIGHTS)
    tensors, _ = ckpt.load_export(wd.export_dir(broken))
    save_file({k: v for k, v in tensors.items() if k != "W_dec"}, path)
    with pytest.raises(ckpt.ExportError, match="W_dec"):
        run_analysis(config, broken, progress=False)


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
    assert summary["n_base_only"] + summary["n_shared"] + summary["n_distilled_only"] == h
    assert sum(summary["nrn_hist"]["counts"]) == h
    exported = json.load(open(os.path.join(wd.export_dir(workdir), "config.json")))
    np.testing.assert_allclose(summary["fve"], exported["eval"]["fve"], rtol=1e-4)
    assert summary["l0"] == pytest.approx(exported["eval"]["l0"], rel=1e-4)
    sr = summary["categories"]["self_reflection"]
    assert sr["occurrences"] == sum(t.count(" Wait") for t in CORPUS)
    assert summary["categories"]["alternative"]["occurrences"] == 0  # absent from CORPUS
    for role in ("base", "distilled"):
        s = summary["splice"][role]
        assert s["docs"] >= 1 and np.isfinite(s["spliced_ce"])
    with open(os.path.join(wd.stage_dir(workdir, "analysis"), "latents.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [ln["id"] for ln in lines] == list(range(h))
    firing = [ln for ln in lines if ln["top_examples"]]
    assert firing
    ex = firing[0]["top_examples"][0]
    assert set(ex) >= {"activation", "left", "token", "right", "doc", "position", "doc_start"}
    acts = [e["activation"] for e in firing[0]["top_examples"]]
    assert acts == sorted(acts, reverse=True)


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


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(analysed, tmp_path):
    _, workdir, _ = analysed
    report = os.path.join(wd.stage_dir(workdir, "analysis"), "report.html")
    shot = str(tmp_path / "report.png")
    profile = tempfile.mkdtemp()
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        f"--screenshot={shot}", "--window-size=1280,2000", f"file://{report}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    assert os.path.getsize(shot) > 50_000
