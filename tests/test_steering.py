"""Steering and ablation hooks on a micro pair, bad inputs, the steering sweep's controls, cap
and metrics, and the steering stage end to end."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import micro_pipeline_config, strict_loads
from xcoder_jax import export, pipeline, site, steering
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, UsageError
from xcoder_jax.exported import CONVENTIONS
from xcoder_jax.stats import excludes_zero
from xcoder_jax.steering import controls as ctl
from xcoder_jax.steering import stats
from xcoder_jax.steering.generation import check_lengths, sample
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
    export.export(str(directory), weights, np.array([1.0, 2.0]), meta)
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
    with steering.steer(models[1], xcoder, [0, 3], 0.0, model_index=1):
        assert torch.equal(_logits(models[1], ids), clean)


def test_steer_changes_logits_then_restores_the_model(pair, xcoder):
    models, _, ids = pair
    clean = _logits(models[1], ids)
    with steering.steer(models[1], xcoder, [2], 0.5, model_index=1) as vector:
        assert not torch.allclose(_logits(models[1], ids), clean)
    # alpha is in units of the model's mean activation norm (sqrt(d) / scale).
    assert float(vector.norm()) == pytest.approx(0.5 * np.sqrt(D) / 2.0, rel=1e-5)
    assert torch.equal(_logits(models[1], ids), clean) and _no_hooks(models[1])


def test_hooks_are_removed_after_an_exception(pair, xcoder):
    models, _, ids = pair
    with pytest.raises(RuntimeError), steering.steer(models[0], xcoder, [1], 1.0, model_index=0):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), steering.ablate(models, 1, xcoder, [1], input_ids=ids):
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
            models[m],
            ids,
            lambda m=m: steering.steer(
                models[m], xcoder, [2], alpha, model_index=m, convention=convention
            ),
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


def test_ablating_no_latent_is_refused(pair, xcoder):
    models, _, ids = pair
    with pytest.raises(UsageError, match="no latents given: pass at least one latent id"):
        with steering.ablate(models, 1, xcoder, [], input_ids=ids, check_model=False):
            pass
    assert _no_hooks(models[1])


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
    with steering.ablate(models, 1, xcoder, [0], input_ids=ids, x=x):
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
        steering.steer(models[1], xcoder, [H], 1.0, model_index=1),
    ):
        pass
    with pytest.raises(ValueError, match="out of range"):
        steering.select_latents("3+99", np.zeros(H), None, 0.5)
    assert _no_hooks(models[1])


@pytest.mark.parametrize("kw, match", [({"d": 8}, "d_model 8"), ({"layer": 5}, "block 5")])
def test_export_of_another_model(pair, tmp_path, kw, match):
    models, _, ids = pair
    other = _make_export(tmp_path, **kw)
    with pytest.raises(export.ExportError, match=match):
        with steering.steer(models[1], other, [0], 1.0, model_index=1):
            pass
    with pytest.raises(export.ExportError, match=match):
        with steering.ablate(models, 1, other, [0], input_ids=ids):
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
    # The cap derived from the clean length is checked too, and the message says so.
    with pytest.raises(ConfigError, match="cap_factor"):
        check_lengths(tok, models[1], ["Question:"], 600, why="steering.cap_factor (cap 600)")


def test_metrics_and_intervals():
    m = stats.text_metrics(" Wait, 2. Thus, 4. The answer is 4. But no.", 20, "4")
    assert m["self_reflection_per_100"] == 5.0 and m["deductive_per_100"] == 5.0
    assert m["contrastive_per_100"] == 5.0 and m["reflection_rounds"] == 1.0
    assert m["accuracy"] == 1.0 and m["has_answer"] == 1.0 and m["truncated"] == 0.0
    assert sorted(m) == sorted(stats.metric_names(True))
    # Markers count only as reasoning moves; the same words otherwise count as everyday.
    everyday = stats.text_metrics("Wait for me, said Tom. Thus he ran.", 10, None, truncated=True)
    assert everyday["self_reflection_per_100"] == everyday["deductive_per_100"] == 0.0
    assert everyday["self_reflection_everyday_per_100"] == 10.0
    assert everyday["deductive_everyday_per_100"] == 10.0
    assert everyday["reflection_rounds"] == 0.0 and everyday["truncated"] == 1.0
    assert "accuracy" not in everyday
    move = stats.text_metrics("Wait, let me check.", 5, None)
    assert move["reflection_rounds"] == 1.0 and move["self_reflection_per_100"] == 20.0
    assert move["verification_per_100"] == 20.0 and move["self_reflection_everyday_per_100"] == 0
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
        "metrics": stats.summarize(clean_means), "vs_clean": None, "changed": [],
        "vs_random_direction": None, "vs_random_latent": None, "controls": None,
        "censoring": None,
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


def test_pairing_with_controls_averages_their_draws_per_prompt():
    rng = np.random.default_rng(4)
    n, k = 6, 2
    clean = {"tokens": rng.normal(60, 9, (n, k)), "truncated": np.zeros((n, k))}
    steered = {"tokens": clean["tokens"] + 20, "truncated": np.eye(n, k)}  # 2 samples cut
    draws = [{"tokens": clean["tokens"] + rng.normal(5, 3, (n, k)), "truncated": np.zeros((n, k))}
             for _ in range(2)]  # fmt: skip
    pp = lambda v, seed=0: stats.per_prompt(_rows(v, seed))
    ctrl = stats.mean_over_draws([pp(d, i) for i, d in enumerate(draws)])
    entry = stats.condition(pp(steered), pp(clean), 0.4, {"random_direction": ctrl,
                                                          "random_latent": None})  # fmt: skip
    # Steered minus the mean of the two draws, prompt by prompt.
    control = (draws[0]["tokens"].mean(1) + draws[1]["tokens"].mean(1)) / 2
    diff = steered["tokens"].mean(1) - control
    half = scipy_stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)
    got = entry["vs_random_direction"]["tokens"]
    assert got["n"] == n and got["mean"] == pytest.approx(diff.mean(), abs=1e-9)
    assert [got["lo"], got["hi"]] == pytest.approx([diff.mean() - half, diff.mean() + half])
    assert entry["vs_random_direction"]["truncated"]["mean"] == pytest.approx(2 / (n * k))
    ctl_vs_clean = entry["controls"]["random_direction"]["vs_clean"]["tokens"]["mean"]
    assert ctl_vs_clean == pytest.approx((control - clean["tokens"].mean(1)).mean(), abs=1e-9)
    # A control that could not be drawn compares as nothing, never as a made-up number.
    assert entry["vs_random_latent"] == {} and entry["controls"]["random_latent"] is None
    # More truncation in the steered condition: its tokens difference is a lower bound.
    assert entry["censoring"]["vs_clean"].startswith("lower bound")
    assert entry["censoring"]["vs_random_direction"].startswith("lower bound")
    back = stats.condition(pp(clean), pp(steered), 0.4, {"random_direction": pp(clean)})
    assert back["censoring"]["vs_clean"].startswith("upper bound")
    assert back["censoring"]["vs_random_direction"].startswith("exact")


def test_random_direction_has_the_steered_norm_and_differs_between_draws(xcoder):
    v = xcoder.steering_vector([1, 3], 1, 0.7, "norm")
    seqs = [ctl.draw_seed(0, "direction", "distilled", spec, draw=j)
            for spec, j in [("1+3", 0), ("1+3", 1), ("5", 0)]]  # fmt: skip
    units = [ctl.random_unit(D, q) for q in seqs]
    vecs = [ctl.rescaled(u, v, 0.7) for u in units]
    for vec in vecs:
        assert vec.dtype == v.dtype and vec.shape == v.shape
        assert float(vec.norm()) == pytest.approx(float(v.norm()), rel=1e-6)
        assert abs(float(vec @ v) / float(v.norm()) ** 2) < 0.9  # not the steered direction
    # Draws differ between draws and sets, and repeat exactly for the same (seed, set, draw).
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    assert max(abs(cos(vecs[0], vecs[1])), abs(cos(vecs[0], vecs[2]))) < 0.99
    again = ctl.random_unit(D, ctl.draw_seed(0, "direction", "distilled", "1+3", draw=0))
    assert torch.equal(again, units[0])
    other = ctl.random_unit(D, ctl.draw_seed(1, "direction", "distilled", "1+3", draw=0))
    assert not torch.equal(other, units[0])
    # -alpha pushes the opposite way along the same random direction, with -alpha's norm.
    neg = ctl.rescaled(units[0], xcoder.steering_vector([1, 3], 1, -0.7, "norm"), -0.7)
    torch.testing.assert_close(neg, -vecs[0])


def test_random_latent_is_matched_on_nrn_and_frequency():
    rng = np.random.default_rng(0)
    h = 400
    nrn = rng.uniform(0, 1, h)
    freq = 10 ** rng.uniform(-5, -1, h)
    freq[:50] = 0.0  # dead latents are never drawn
    targets = [60, 61]
    draws = [
        ctl.match_latents(targets, nrn, freq, pool=10, rng=np.random.default_rng(s))
        for s in range(20)
    ]
    z = np.stack([nrn, np.log10(np.maximum(freq, 1e-7))], 1)[50:]
    z = (z - z.mean(0)) / z.std(0)
    for t_pos, t in enumerate(targets):
        # Hand computation: the 10 alive non-target latents nearest in standardised space.
        d = np.linalg.norm(z - z[t - 50], axis=1)
        ids = np.arange(50, h)
        keep = ~np.isin(ids, targets)
        pool = set(ids[keep][np.argsort(d[keep])[:10]].tolist())
        picked = [dr[t_pos] for dr in draws]
        assert set(picked) <= pool | {dr[0] for dr in draws}  # the 2nd avoids the 1st pick
        assert all(p not in targets and p >= 50 for p in picked)
        assert len(set(picked)) > 3  # random within the pool, not always the nearest
        near = np.array(picked)
        assert np.abs(nrn[near] - nrn[t]).max() < 0.15
        assert np.abs(np.log10(freq[near]) - np.log10(freq[t])).max() < 0.6
    assert all(dr[0] != dr[1] for dr in draws)
    # Pool of 1: exactly the nearest.
    first = ctl.match_latents([60], nrn, freq, pool=1, rng=np.random.default_rng(0))[0]
    d = np.linalg.norm(z - z[10], axis=1)
    d[10] = np.inf
    assert first == 50 + int(np.argmin(d))


class _Scripted(torch.nn.Module):
    """A model whose generate() appends fixed continuations (one row per prompt)."""

    def __init__(self, new):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.new = new

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, **kw):
        return torch.cat([input_ids, self.new[: len(input_ids), :max_new_tokens]], 1)


def test_samples_that_hit_the_cap_are_recorded_as_truncated(pair):
    _, tok, _ = pair
    eos, cap = tok.eos_token_id, 10
    fill = tok.encode(" 1")[:1]  # one token
    piece = tok.decode(fill)

    def row(text, pad):
        ids = tok.encode(text)
        return (ids + pad * cap)[:cap]

    new = torch.tensor([
        fill * 6 + [eos] * (cap - 6),  # ended with end-of-text after 6 tokens
        row(" 7. Question: 9", fill),  # ran on, but reached the stop string
        row("", fill),  # ran to the cap: censored
    ])  # fmt: skip
    sc = SimpleNamespace(samples=1, batch_size=8, temperature=0.0, seed=0, stop="Question:",
                         max_new_tokens=4)  # fmt: skip
    out = sample(_Scripted(new), tok, ["a", "b", "c"], sc, max_new_tokens=cap)
    assert [o[4] for o in out] == [False, False, True]
    assert out[1][2] == " 7. " and out[2][3] >= cap - 1
    assert out[0][2] == piece * 6
    # With the run's own cap (4) the first row is cut before its end-of-text: censored too.
    short = sample(_Scripted(new), tok, ["a", "b", "c"], sc)
    assert short[0][4] and short[2][4] and short[0][2] == piece * 4


# --- Both stages end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("steer_run"))
    c = micro_pipeline_config()
    c.train.eval_shards = 3  # enough held-out documents to hold markers
    s = c.steering
    s.latents, s.alphas = ("0", "1+2"), (0.0, 0.5)
    s.n_prompts, s.samples, s.max_new_tokens, s.batch_size = 4, 2, 12, 8
    s.n_control_draws = 2  # control values are means over draws
    pipeline.run(c, workdir)  # the analysis before steering: firing frequencies
    return c, workdir, steering.run_steering(c, workdir)


def _lines(workdir):
    with open(os.path.join(wd.stage_dir(workdir, "steering"), "samples.jsonl")) as f:
        return [strict_loads(line) for line in f]


def test_steering_stage(run):
    config, workdir, res = run
    out = wd.stage_dir(workdir, "steering")
    assert {"results.json", "samples.jsonl", "steering.png"} <= set(os.listdir(out))
    assert [(c["set"], c["alpha"]) for c in res["conditions"]] == [
        ("0", 0.0), ("0", 0.5), ("1+2", 0.0), ("1+2", 0.5)
    ]  # fmt: skip
    lines = _lines(workdir)
    # clean + per set: steered, 2 random directions, 2 random latents.
    kinds = [(r["set"], r["condition"], r["draw"]) for r in lines]
    assert len(lines) == (1 + 2 * 5) * 4 * 2 and kinds.count(("clean", "clean", None)) == 8
    assert kinds.count(("1+2", "random_latent", 1)) == 8
    m = res["conditions"][0]["metrics"]
    assert m["tokens"]["n"] == 4 and m["tokens"]["lo"] <= m["tokens"]["mean"] <= m["tokens"]["hi"]
    assert "accuracy" in m and res["convention"] == "norm"
    assert CONVENTIONS["norm"][1] in res["steering_vector"]

    with open(os.path.join(out, "results.json")) as f:
        assert strict_loads(f.read()) == res

    def prompt_means(spec, kind, name, draw=None):
        rows = [r for r in lines if r["set"] == spec and r["condition"] == kind
                and (draw is None or r["draw"] == draw)]  # fmt: skip
        return np.array([np.mean([r["metrics"][name] for r in rows if r["prompt_id"] == p])
                         for p in range(4)])  # fmt: skip

    for c in res["conditions"]:
        if c["alpha"] == 0:
            assert c["vs_clean"] is None and c["changed"] == [] and c["controls"] is None
            continue
        assert sorted(c["vs_clean"]) == sorted(res["metrics"])
        for name in ("tokens", "truncated", "self_reflection_per_100", "accuracy"):
            steered = prompt_means(c["set"], "steered", name)
            diff = steered - prompt_means("clean", "clean", name)
            assert c["vs_clean"][name]["mean"] == pytest.approx(diff.mean(), abs=1e-9)
            for kind in ("random_direction", "random_latent"):
                # Paired with the control's per-prompt mean over its two draws.
                control = np.mean([prompt_means(c["set"], kind, name, j) for j in (0, 1)], 0)
                got = c[f"vs_{kind}"][name]["mean"]
                assert got == pytest.approx((steered - control).mean(), abs=1e-9)
        assert c["changed"] == [k for k in res["metrics"] if excludes_zero(c["vs_clean"][k])]
        assert set(c["censoring"]) == {"vs_clean", "vs_random_direction", "vs_random_latent"}
    t = res["conditions"][3]["vs_clean"]["tokens"]
    tokens = f"tokens {t['mean']:+.1f} [{t['lo']:+.1f}, {t['hi']:+.1f}]"
    tokens += "" if "tokens" in res["conditions"][3]["changed"] else " (n.s.)"
    assert f"distilled 1+2 alpha +0.5: {tokens}" in steering.summarize_steering(res)


def test_the_cap_comes_from_the_clean_length_and_truncation_is_recorded(run):
    config, workdir, res = run
    gen = res["generation"]["distilled"]
    # The micro zoo's models rarely end within 12 tokens: most clean samples hit that cap.
    assert gen["max_new_tokens"] == 12 and gen["clean_truncated_at_max_new_tokens"] >= 0.5
    cap = max(12, math.ceil(4.0 * gen["clean_mean_tokens_at_max_new_tokens"]))
    assert gen["cap"] == cap >= 4.0 * gen["clean_mean_tokens_at_max_new_tokens"]
    assert gen["clean_resampled_at_cap"] and all(c["cap"] == cap for c in res["conditions"])
    lines = _lines(workdir)
    clean = [r["metrics"] for r in lines if r["condition"] == "clean"]
    # The clean condition in the results is the one sampled again with the shared cap.
    assert max(m["tokens"] for m in clean) > 12
    assert res["conditions"][0]["metrics"]["tokens"]["mean"] == pytest.approx(
        np.mean([m["tokens"] for m in clean])
    )
    assert {m["truncated"] for r in lines for m in [r["metrics"]]} <= {0.0, 1.0}
    share = np.mean([m["truncated"] for m in clean])
    # Some micro samples loop past even the larger cap: they are the ones recorded truncated.
    assert share > 0 and res["conditions"][0]["metrics"]["truncated"]["mean"] == share
    assert all(m["tokens"] > 12 for m in clean if m["truncated"])


def test_controls_are_recorded_random_and_matched(run):
    config, workdir, res = run
    with open(os.path.join(wd.stage_dir(workdir, "analysis"), "latents.jsonl")) as f:
        freq = {(ln := json.loads(line))["id"]: ln["firing_freq_store"] for line in f}
    nrn_all = {i: v for i, v in enumerate(steering.ExportedCrosscoder.load(
        wd.export_dir(workdir)).nrn(config.analysis.norm))}  # fmt: skip
    for spec, ids in res["sets"].items():
        rec = res["controls"]["distilled"][spec]
        assert rec["latents"] == ids and rec["firing_freq"] == [freq[i] for i in ids]
        assert rec["nrn"] == [round(float(nrn_all[i]), 4) for i in ids]
        draws = rec["random_latent"]["draws"]
        assert len(draws) == 2 and rec["random_latent"]["reason"] is None
        alive = [i for i, f in freq.items() if f > 0]
        for d in draws:
            assert len(d["latents"]) == len(ids) and not set(d["latents"]) & set(ids)
            assert len(set(d["latents"])) == len(ids)
            assert d["firing_freq"] == [freq[i] for i in d["latents"]]
            assert all(freq[i] > 0 for i in d["latents"])
            # Among the alive latents, each match is one of the 10 nearest to its target.
            for t, got in zip(ids, d["latents"], strict=True):
                z = lambda i: np.array([nrn_all[i], np.log10(max(freq[i], 1e-7))])
                pts = np.array([z(i) for i in alive])
                sd = pts.std(0)
                dist = {i: np.linalg.norm((z(i) - z(t)) / sd) for i in alive if i not in ids}
                assert sorted(dist.values()).index(dist[got]) < 10
    c = res["conditions"][1]
    vec_norm = c["vector_norm"]
    assert vec_norm == pytest.approx(0.5 * res["mean_norms"]["distilled"], rel=1e-5)


def test_headline_has_the_replication_shape(run):
    config, workdir, res = run
    assert sorted(res["headline"]) == ["0", "1+2"] and res["headline_skipped"] == {}
    for spec, h in res["headline"].items():
        # The stage writes sorted keys: compare the key sets.
        shape = ["model", "alpha", "latents", "nrn", "vs_clean", "vs_random_direction",
                 "vs_random_latent", "truncated"]  # fmt: skip
        assert sorted(h) == sorted(shape)
        cond = next(c for c in res["conditions"] if c["set"] == spec and c["alpha"] == 0.5)
        assert h["model"] == "distilled" and h["alpha"] == 0.5
        assert h["latents"] == res["sets"][spec] and h["nrn"] == cond["nrn"]
        need = ["tokens", "truncated", "reflection_rounds", "self_reflection_per_100",
                "deductive_per_100", "accuracy"]  # fmt: skip
        for key in ("vs_clean", "vs_random_direction", "vs_random_latent"):
            assert set(need) <= set(h[key])
            for name, ci in h[key].items():
                assert ci == cond[key][name]
                assert {"mean", "lo", "hi", "n", "method"} <= set(ci)
        shares = h["truncated"]
        assert sorted(shares) == ["clean", "random_direction", "random_latent", "steered"]
        assert shares["steered"] == cond["metrics"]["truncated"]["mean"]
        assert shares["clean"] == res["conditions"][0]["metrics"]["truncated"]["mean"]
        for kind in ("random_direction", "random_latent"):
            assert shares[kind] == cond["controls"][kind]["metrics"]["truncated"]["mean"]
        assert all(0.0 <= v <= 1.0 for v in shares.values())


def test_frequencies_computed_from_the_store_match_the_analysis(run, monkeypatch):
    from xcoder_jax.activations import ActivationStore

    config, workdir, res = run
    xcoder = steering.ExportedCrosscoder.load(wd.export_dir(workdir))
    refuse = lambda: pytest.fail("the analysis' frequencies need no store")
    from_analysis, fp = ctl.firing_frequencies(workdir, lambda: xcoder, refuse)
    assert fp["source"] == "analysis/latents.jsonl" and res["fingerprint"]["firing_freq"] == fp
    # Without an analysis of this export they are counted over every store row.
    monkeypatch.setattr(ctl, "_analysis_summary", lambda workdir: None)
    store = ActivationStore(wd.activations_dir(workdir), verify=False)
    computed = ctl.frequencies_from_store(store, xcoder, block=100)
    assert computed.shape == from_analysis.shape and (computed > 0).any()
    np.testing.assert_allclose(computed, from_analysis, atol=2e-3)
    got, fp = ctl.firing_frequencies(workdir, lambda: xcoder, lambda: store)
    assert fp["source"] == "store" and np.array_equal(got, computed)

    def missing():
        raise FileNotFoundError("no store here")

    with pytest.raises(Exception, match="firing frequencies"):
        ctl.firing_frequencies(workdir, lambda: xcoder, missing)


def test_reruns_skip(run):
    config, workdir, _ = run
    path = os.path.join(wd.stage_dir(workdir, "steering"), "results.json")
    before = os.path.getmtime(path)
    steering.run_steering(config, workdir)
    assert os.path.getmtime(path) == before
