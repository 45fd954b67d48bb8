"""Steering and ablation hooks on a micro pair, bad inputs, and the steering stage end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import micro_pipeline_config, strict_loads
from xcoder_jax import checkpoint as ckpt
from xcoder_jax import pipeline, site, steering
from xcoder_jax import workdir as wd
from xcoder_jax.exported import CONVENTIONS
from xcoder_jax.stats import excludes_zero
from xcoder_jax.steering import stats
from xcoder_jax.steering.generation import check_lengths
from xcoder_jax.steering.report import plot_steering

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


def _added_at_site(model, ids, intervention):
    """(what `intervention()` adds to block L's input [seq, d], the clean input [seq, d])."""
    seen = {}

    def keep(key):
        return lambda hidden: seen.__setitem__(key, hidden.detach().clone())

    # Pre-hooks run in registration order: the outer one sees the clean input, the inner one
    # (registered after the steering hook) the steered input of the same forward pass.
    with site.block_input_hook(model, LAYER, keep("before")), intervention():
        with site.block_input_hook(model, LAYER, keep("after")):
            _logits(model, ids)
    return (seen["after"] - seen["before"])[0], seen["before"][0]


@pytest.mark.parametrize("convention", ["norm", "raw"])
def test_steering_adds_the_models_own_decoder_row(pair, xcoder, convention):
    models, _, ids = pair
    rows = xcoder.W_dec[2]  # [m, d] raw: latent 2's base and distilled rows
    cos = float(rows[0] @ rows[1] / (rows[0].norm() * rows[1].norm()))
    assert cos < 0.9  # the rows differ, so adding the other model's row would be caught
    alpha = 0.5
    for m in (0, 1):
        added, clean = _added_at_site(
            models[m], ids, lambda m=m: steering.steer(models[m], xcoder, [2], alpha, m, convention)
        )
        # "raw" adds alpha * W_dec[i, m]; "norm" rescales the row to alpha mean norms.
        scale = alpha if convention == "raw" else alpha * xcoder.mean_norms[m] / rows[m].norm()
        expected = scale * rows[m]
        # Float32 rounding of (x + v) - x is relative to the residual's size as well as v's.
        tol = 1e-5 * float(expected.norm() + clean.norm(dim=-1).max())
        assert float((added - expected).norm(dim=-1).max()) <= tol  # at every position
    assert _no_hooks(models[0]) and _no_hooks(models[1])


def test_steering_vector_conventions_for_a_latent_set(xcoder):
    rows = xcoder.W_dec[[1, 3], 1]  # [2, d] raw, the distilled rows of latents 1 and 3
    raw = xcoder.steering_vector([1, 3], 1, -0.7, "raw")
    torch.testing.assert_close(raw, -0.7 * rows.sum(0), rtol=1e-5, atol=1e-6)
    # "norm": rows are unit-normalised one by one and summed, the sum is not renormalised.
    unit = rows / rows.norm(dim=-1, keepdim=True)
    norm = xcoder.steering_vector([1, 3], 1, -0.7, "norm")
    torch.testing.assert_close(
        norm, -0.7 * xcoder.mean_norms[1] * unit.sum(0), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="convention"):
        xcoder.steering_vector([1], 1, 1.0, "unit")


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
    # Samples are averaged within a prompt before the interval is taken over prompts:
    # prompt means 2 and 4, so 3 +- t_{0.975, 1} * sqrt(2) / sqrt(2).
    agg = stats.summarize(
        stats.per_prompt(
            [{"prompt_id": p, "metrics": {"t": v}} for p, v in [(0, 1), (0, 3), (1, 4)]]
        )
    )
    half = scipy_stats.t.ppf(0.975, 1)
    assert agg["t"]["n"] == 2 and agg["t"]["mean"] == pytest.approx(3.0, abs=1e-12)
    assert [agg["t"]["lo"], agg["t"]["hi"]] == pytest.approx([3 - half, 3 + half], abs=1e-9)


def _rows(values: dict[str, np.ndarray], seed: int = 0) -> list[dict]:
    """Sample rows from {metric: [prompts, samples]}, shuffled: pairing must go by prompt id."""
    n, k = next(iter(values.values())).shape
    rows = [
        {"prompt_id": p, "metrics": {name: float(v[p, s]) for name, v in values.items()}}
        for p in range(n)
        for s in range(k)
    ]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def test_paired_comparison_against_a_hand_computation():
    rng = np.random.default_rng(1)
    n, k = 7, 3
    clean = {"tokens": rng.normal(60, 15, (n, k)), "words": rng.normal(40, 5, (n, k))}
    steered = {"tokens": clean["tokens"] + rng.normal(8, 2, (n, k)), "words": clean["words"]}
    steered["accuracy"] = rng.integers(0, 2, (n, k)).astype(float)
    clean_rows, steered_rows = _rows(clean, 2), _rows(steered, 3)
    del steered_rows[0]["metrics"]["accuracy"]  # missing for one sample: left out
    clean_means = stats.per_prompt(clean_rows)
    entry = stats.condition(stats.per_prompt(steered_rows), clean_means, 0.4)

    diff = steered["tokens"].mean(1) - clean["tokens"].mean(1)  # per prompt [n]
    half = scipy_stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)
    got = entry["vs_clean"]["tokens"]
    assert got["n"] == n and got["mean"] == pytest.approx(diff.mean(), abs=1e-9)
    assert [got["lo"], got["hi"]] == pytest.approx([diff.mean() - half, diff.mean() + half])
    # The per-condition interval is over per-prompt means as well.
    means = steered["tokens"].mean(1)
    half = scipy_stats.t.ppf(0.975, n - 1) * means.std(ddof=1) / np.sqrt(n)
    m = entry["metrics"]["tokens"]
    assert [m["mean"], m["lo"], m["hi"]] == pytest.approx(
        [means.mean(), means.mean() - half, means.mean() + half]
    )
    # Unchanged words: every difference is 0, so is the interval, and it is not a change.
    assert entry["vs_clean"]["words"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert entry["vs_clean"]["words"]["hi"] == pytest.approx(0.0, abs=1e-12)
    assert entry["changed"] == ["tokens"]
    assert sorted(entry["metrics"]) == sorted(entry["vs_clean"]) == ["tokens", "words"]
    assert stats.condition(clean_means, clean_means, 0.0) == {
        "metrics": stats.summarize(clean_means), "vs_clean": None, "changed": []
    }  # fmt: skip


def test_one_prompt_has_no_interval_and_stays_strict_json(tmp_path):
    clean = stats.per_prompt(_rows({"tokens": np.array([[10.0, 12.0]])}))
    steered = stats.per_prompt(_rows({"tokens": np.array([[20.0, 25.0]])}))
    entry = stats.condition(steered, clean, 0.5)
    ci = entry["vs_clean"]["tokens"]
    assert ci["mean"] == pytest.approx(11.5, abs=1e-12) and ci["n"] == 1
    assert ci["lo"] is None and ci["hi"] is None and "one value" in ci["reason"]
    assert entry["metrics"]["tokens"]["lo"] is None and entry["changed"] == []
    base = {"model": "distilled", "set": "7", "latents": [7], "nrn": [0.9]}
    results = {
        "metrics": ["tokens"], "convention": "norm", "n_prompts": 1,
        "skipped_sets": {"deductive:1": "too few latents"},
        "conditions": [
            base | {"alpha": 0.0} | stats.condition(clean, clean, 0.0),
            base | {"alpha": 0.5} | entry,
        ],
    }  # fmt: skip
    assert json.loads(json.dumps(results, allow_nan=False)) == results
    assert steering.summarize_steering(results) == (
        "steering vs clean (paired over 1 prompts): distilled 7 alpha +0.5: "
        "tokens +11.5 (no CI: one value: no spread to estimate); "
        "deductive:1 not steered (too few latents)"
    )
    plot_steering(results, str(tmp_path / "steering.png"))
    assert os.path.getsize(tmp_path / "steering.png") > 0


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
    return c, workdir, steering.run_steering(c, workdir)


def test_steering_stage(run):
    config, workdir, res = run
    out = wd.stage_dir(workdir, "steering")
    assert {"results.json", "samples.jsonl", "steering.png"} <= set(os.listdir(out))
    assert [(c["set"], c["alpha"]) for c in res["conditions"]] == [
        ("0", 0.0), ("0", 0.5), ("1+2", 0.0), ("1+2", 0.5)
    ]  # fmt: skip
    with open(os.path.join(out, "samples.jsonl")) as f:
        assert sum(1 for _ in f) == 3 * 4 * 2  # clean + 2 steered conditions
    m = res["conditions"][0]["metrics"]
    assert m["tokens"]["n"] == 4 and m["tokens"]["lo"] <= m["tokens"]["mean"] <= m["tokens"]["hi"]
    assert "accuracy" in m and res["convention"] == "norm"
    assert CONVENTIONS["norm"][1] in res["steering_vector"]

    with open(os.path.join(out, "results.json")) as f:
        assert strict_loads(f.read()) == res
    # vs_clean recomputed from the samples: per prompt, steered mean minus clean mean.
    with open(os.path.join(out, "samples.jsonl")) as f:
        lines = [strict_loads(line) for line in f]

    def prompt_means(spec, alpha, name):
        rows = [r for r in lines if r["set"] == spec and r["alpha"] == alpha]
        return np.array([np.mean([r["metrics"][name] for r in rows if r["prompt_id"] == p])
                         for p in range(4)])  # fmt: skip

    for c in res["conditions"]:
        if c["alpha"] == 0:
            assert c["vs_clean"] is None and c["changed"] == []
            continue
        assert sorted(c["vs_clean"]) == sorted(res["metrics"])
        for name in ("tokens", "self_reflection_per_100", "accuracy"):
            diff = prompt_means(c["set"], 0.5, name) - prompt_means("clean", 0.0, name)
            assert c["vs_clean"][name]["mean"] == pytest.approx(diff.mean(), abs=1e-9)
        assert c["changed"] == [k for k in res["metrics"] if excludes_zero(c["vs_clean"][k])]
    t = res["conditions"][3]["vs_clean"]["tokens"]
    tokens = f"tokens {t['mean']:+.1f} [{t['lo']:+.1f}, {t['hi']:+.1f}]"
    tokens += "" if "tokens" in res["conditions"][3]["changed"] else " (n.s.)"
    assert f"distilled 1+2 alpha +0.5: {tokens}" in steering.summarize_steering(res)


def test_reruns_skip(run):
    config, workdir, _ = run
    path = os.path.join(wd.stage_dir(workdir, "steering"), "results.json")
    before = os.path.getmtime(path)
    steering.run_steering(config, workdir)
    assert os.path.getmtime(path) == before
