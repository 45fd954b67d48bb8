"""Steering and ablation hooks on a micro pair, bad inputs, and both stages end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import micro_pipeline_config
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import pipeline, site, steering
from xcoder_jax import workdir as wd
from xcoder_jax.steering import stats
from xcoder_jax.steering.ablation import marker_positions
from xcoder_jax.steering.sweep import check_lengths

D, H, LAYER = 16, 8, 1


def _make_export(directory, d=D, h=H, layer=LAYER, seed=0, b_enc=None):
    rng = np.random.default_rng(seed)
    weights = {
        "W_enc": rng.normal(size=(2, d, h)).astype(np.float32) * 0.3,
        "b_enc": np.zeros(h, np.float32) if b_enc is None else np.asarray(b_enc, np.float32),
        "W_dec": rng.normal(size=(h, 2, d)).astype(np.float32) * 0.3,
        "b_dec": np.zeros((2, d), np.float32),
    }
    meta = {"layer": layer, "d_model": d, "n_latents": h, "models": []}
    ckpt.export(str(directory), weights, np.array([1.0, 2.0]), meta)
    return steering.ExportedCrosscoder.load(str(directory))


@pytest.fixture(scope="module")
def pair(micro_pair):
    models = [AutoModelForCausalLM.from_pretrained(micro_pair[r]).eval() for r in wd.ROLES]
    tok = AutoTokenizer.from_pretrained(micro_pair["base"])
    ids = tok(["Question: Tom has 3 apples. Wait, let me check."], return_tensors="pt")
    return models, tok, ids["input_ids"]


@pytest.fixture(scope="module")
def xcoder(tmp_path_factory):
    return _make_export(tmp_path_factory.mktemp("export"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _no_hooks(model):
    return all(not b._forward_pre_hooks for b in site.decoder_layers(model))


# --- Steering --------------------------------------------------------------------------------


def test_alpha_zero_is_bit_identical(pair, xcoder):
    models, _, ids = pair
    clean = _logits(models[1], ids)
    with steering.steer(models[1], xcoder, [0, 3], 0.0, 1):
        assert torch.equal(_logits(models[1], ids), clean)


def test_steer_changes_logits_then_restores_the_model(pair, xcoder):
    models, _, ids = pair
    clean = _logits(models[1], ids)
    with steering.steer(models[1], xcoder, [2], 0.5, 1) as vector:
        assert not torch.allclose(_logits(models[1], ids), clean)
    # alpha is in units of the model's mean activation norm (sqrt(d) / scale).
    assert float(vector.norm()) == pytest.approx(0.5 * np.sqrt(D) / 2.0, rel=1e-5)
    assert torch.equal(_logits(models[1], ids), clean) and _no_hooks(models[1])


def test_hooks_are_removed_after_an_exception(pair, xcoder):
    models, _, ids = pair
    with pytest.raises(RuntimeError), steering.steer(models[0], xcoder, [1], 1.0, 0):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), steering.ablate(models, 1, xcoder, [1], ids):
        raise RuntimeError("boom")
    assert _no_hooks(models[0]) and _no_hooks(models[1])


# --- Ablation --------------------------------------------------------------------------------


def test_ablating_no_latent_leaves_logits_unchanged(pair, xcoder):
    models, _, ids = pair
    clean = _logits(models[1], ids)
    with steering.ablate(models, 1, xcoder, [], ids) as delta:
        assert torch.equal(_logits(models[1], ids), clean)
    assert not delta.any() and _no_hooks(models[1])


def test_an_inactive_latent_leaves_its_positions_unchanged(pair, tmp_path):
    models, _, ids = pair
    x = steering.site_inputs(models, LAYER, ids)  # [1, T, 2, d]
    pre = (x.reshape(*x.shape[:2], -1) @ _make_export(tmp_path / "a").W_enc.reshape(2 * D, H))[
        0, 1:, 0
    ]
    # Latent 0 fires on about half of the positions.
    xcoder = _make_export(tmp_path / "b", b_enc=[-float(pre.median())] + [0.0] * (H - 1))
    f = xcoder.latent_acts(x, [0])[0, :, 0]
    seen = {}
    with steering.ablate(models, 1, xcoder, [0], ids, x=x):
        fn = lambda hidden: seen.setdefault("hidden", hidden.clone())
        with site.block_input_hook(models[1], LAYER, fn):
            _logits(models[1], ids)
    after, before = seen["hidden"][0], x[0, :, 1]
    off = (f == 0).nonzero().flatten()
    on = (f > 0).nonzero().flatten()
    on = on[on >= 1]
    assert len(off) and len(on)
    assert torch.equal(after[off], before[off])
    expected = before[on] - f[on, None] * xcoder.W_dec[0, 1]
    torch.testing.assert_close(after[on], expected)
    assert torch.equal(after[0], before[0])  # the attention sink is never touched


def test_marker_positions_point_before_the_marker():
    docs = [np.array([5, 1, 7, 9, 7]), np.array([7, 2])]
    assert marker_positions(docs, [(7,)], first_position=1) == [(0, 1, 7), (0, 3, 7)]


def test_targeted_latents_keep_top_firing_with_high_nrn():
    counts = np.array([0, 9, 8, 7, 1, 0, 0, 0, 0, 0])
    nrn = np.array([0.9, 0.9, 0.2, 0.6, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5])
    assert steering.targeted_latents(counts, nrn, 0.3, 0.5).tolist() == [1, 3]
    assert steering.targeted_latents(counts, nrn, 0.1, 0.5).tolist() == [1]
    assert steering.select_latents("4+1", nrn, None, 0.5) == [4, 1]


# --- Bad inputs --------------------------------------------------------------------------------


def test_latent_out_of_range(pair, xcoder):
    models, _, ids = pair
    with (
        pytest.raises(ValueError, match="out of range"),
        steering.steer(models[1], xcoder, [H], 1.0, 1),
    ):
        pass
    with pytest.raises(ValueError, match="out of range"):
        steering.select_latents("3+99", np.zeros(H), None, 0.5)
    assert _no_hooks(models[1])


@pytest.mark.parametrize("kw, match", [({"d": 8}, "d_model 8"), ({"layer": 5}, "block 5")])
def test_export_of_another_model(pair, tmp_path, kw, match):
    models, _, ids = pair
    other = _make_export(tmp_path, **kw)
    with pytest.raises(ckpt.ExportError, match=match):
        with steering.steer(models[1], other, [0], 1.0, 1):
            pass
    with pytest.raises(ckpt.ExportError, match=match):
        with steering.ablate(models, 1, other, [0], ids):
            pass


def test_prompt_file_checks(pair, tmp_path):
    models, tok, _ = pair
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        steering.read_prompts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="'prompt'"):
        steering.read_prompts(str(bad))
    with pytest.raises(ValueError, match="context"):
        check_lengths(tok, models[1], ["Question: " + "apples " * 300], max_new_tokens=64)


def test_metrics_and_intervals():
    m = stats.text_metrics(" Wait, 2. Thus The answer is 4. But no.", 20, "4")
    assert m["self_reflection_per_100"] == 5.0 and m["deductive_per_100"] == 5.0
    assert m["accuracy"] == 1.0 and m["has_answer"] == 1.0
    ci = stats.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["lo"] < 2.0 < ci["hi"]
    # Samples are averaged within a prompt before the interval is taken over prompts.
    agg = stats.aggregate(
        [{"prompt_id": p, "metrics": {"t": v}} for p, v in [(0, 1), (0, 3), (1, 4)]]
    )
    assert agg["t"]["n"] == 2 and agg["t"]["mean"] == 3.0


# --- Both stages end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("steer_run"))
    c = micro_pipeline_config()
    c.train.eval_shards = 3  # enough held-out documents to hold markers
    pipeline.run(c, workdir)
    s = c.steering
    s.latents, s.alphas = ("0", "1+2"), (0.0, 0.5)
    s.n_prompts, s.samples, s.max_new_tokens, s.batch_size = 4, 2, 12, 8
    a = c.ablation
    a.fracs, a.n_random, a.n_docs, a.batch_size = (0.5, 0.1), 2, 8, 8
    return c, workdir, steering.run_steering(c, workdir), steering.run_ablation(c, workdir)


def test_steering_stage(run):
    config, workdir, res, _ = run
    out = wd.stage_dir(workdir, "steering")
    assert {"results.json", "samples.jsonl", "steering.png"} <= set(os.listdir(out))
    assert [(c["set"], c["alpha"]) for c in res["conditions"]] == [
        ("0", 0.0), ("0", 0.5), ("1+2", 0.0), ("1+2", 0.5)
    ]  # fmt: skip
    with open(os.path.join(out, "samples.jsonl")) as f:
        assert sum(1 for _ in f) == 3 * 4 * 2  # clean + 2 steered conditions
    m = res["conditions"][0]["metrics"]
    assert m["tokens"]["n"] == 4 and m["tokens"]["lo"] <= m["tokens"]["mean"] <= m["tokens"]["hi"]
    assert "accuracy" in m and isinstance(steering.summarize_steering(res), str)


def test_ablation_stage(run):
    config, workdir, _, res = run
    assert os.path.exists(os.path.join(wd.stage_dir(workdir, "ablation"), "ablation.png"))
    assert list(res["categories"]) == list(config.ablation.categories)
    assert any(e["occurrences"] and e["by_frac"] for e in res["categories"].values())
    for entry in res["categories"].values():
        for row in entry["by_frac"]:
            for role in res["roles"]:
                assert np.isfinite(row[role]["targeted"])
                assert len(row[role]["random_draws"]) == (2 if row["n_latents"] else 0)
    assert steering.summarize_ablation(res).startswith("ablation")


def test_reruns_skip(run):
    config, workdir, _, _ = run
    paths = [
        os.path.join(wd.stage_dir(workdir, s), "results.json") for s in ("steering", "ablation")
    ]
    before = [os.path.getmtime(p) for p in paths]
    steering.run_steering(config, workdir)
    steering.run_ablation(config, workdir)
    assert [os.path.getmtime(p) for p in paths] == before
