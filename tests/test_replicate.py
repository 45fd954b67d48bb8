"""Replication across seeds: findings read from each seed's results, held counts, pooling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import micro_pipeline_config
from xcoder_jax import replicate, stats
from xcoder_jax import workdir as wd


def _ci(mean, half=0.1):
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": 10, "method": "test"}


def _results(effect: float) -> dict:
    """One seed's results in the stages' layouts, every finding's effect = +-effect."""
    cats = ("self_reflection", "deductive", "alternative", "contrastive", "verification")
    analysis = {
        "categories": {
            c: {"nrn_minus_alive": _ci(effect), "top_distilled_only": {"excess": _ci(effect)}}
            for c in cats
        }
    }
    steering = {
        "conditions": [
            {"model": "distilled", "set": s, "alpha": a, "vs_clean": v}
            for s, metric, sign in (
                ("self_reflection:1", "self_reflection_per_100", 1),
                ("deductive:1", "tokens", -1),
            )
            for a, v in (
                (0.0, None),
                (0.2, {metric: _ci(0.0)}),  # a smaller alpha: not the one read
                (0.4, {metric: _ci(sign * effect)}),
            )
        ]
    }
    row = {
        "frac": 0.1,
        "distilled": {"targeted_minus_matched": _ci(-effect)},
        "distilled_minus_base": _ci(-effect),
    }
    ablation = {"categories": {c: {"by_frac": [{"frac": 0.5}, row]} for c in cats[:4]}}
    pooled = {
        "base_minus_distilled": _ci(effect),
        "true_minus_shuffled": {"base": _ci(-effect), "distilled": _ci(-effect)},
    }
    geometry = {
        "largest": "h128",
        "plot_n_components": 2,
        "pairs": {"h128": {"pooled": {"2": pooled}}},
    }
    return {"analysis": analysis, "steering": steering, "ablation": ablation, "geometry": geometry}


def test_every_finding_is_read_and_held_counts_follow_the_cis():
    # Effects 0.5 (holds), 0.05 (CI includes 0), 0.3 (holds), and a seed without results.
    per_seed = {0: _results(0.5), 1: _results(0.05), 2: _results(0.3), 3: {}}
    table = replicate.tabulate(per_seed)
    assert table["seeds"] == [0, 1, 2, 3]
    assert len(table["findings"]) == len(replicate.findings())
    for row in table["findings"]:
        assert row["seeds_run"] == 4 and row["seeds_measured"] == 3, row["name"]
        assert row["seeds_held"] == 2, row["name"]
        sign = row["expected_sign"]
        expected = sign * np.mean([0.5, 0.05, 0.3])
        assert row["pooled"]["mean"] == pytest.approx(expected, abs=1e-12)
        assert row["pooled_holds"] == (stats.sign(row["pooled"]) == sign)
        assert row["per_seed"]["3"] == {"ci": None, "holds": False}
    json.dumps(table, allow_nan=False)


def test_pooled_effect_holds_only_on_the_expected_side():
    right = replicate.tabulate({0: _results(0.5), 1: _results(0.52), 2: _results(0.48)})
    for row in right["findings"]:
        assert row["seeds_held"] == 3 and row["pooled_holds"], row["name"]
        assert stats.sign(row["pooled"]) == row["expected_sign"]
    wrong = replicate.tabulate({0: _results(-0.5), 1: _results(-0.52), 2: _results(-0.48)})
    for row in wrong["findings"]:
        # The pooled CI excludes 0, but on the other side: the finding does not hold.
        assert stats.sign(row["pooled"]) == -row["expected_sign"]
        assert row["seeds_held"] == 0 and not row["pooled_holds"], row["name"]


def test_a_failed_seed_is_recorded_and_the_table_still_written(tmp_path, monkeypatch):
    def run(config, workdir):
        if config.seed == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(replicate.pipeline, "run", run)
    c = micro_pipeline_config()
    with pytest.raises(replicate.ReplicationError, match=r"seeds \['1'\] failed"):
        replicate.run_replication(c, str(tmp_path), [0, 1], log=lambda *_: None)
    with open(tmp_path / replicate.JSON) as f:
        table = json.load(f)
    assert table["errors"] == {"1": "RuntimeError: boom"} and table["seeds"] == [0, 1]
    assert "Seed 1 failed (RuntimeError: boom)" in (tmp_path / replicate.MARKDOWN).read_text()


def test_markdown_has_one_row_per_finding():
    table = replicate.tabulate({0: _results(0.5), 1: _results(0.4)})
    text = replicate.markdown(table)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(table["findings"])
    assert "| 2 |" in text and "of 2 seeds" in text


def test_replication_runs_each_seed_in_its_own_workdir(tmp_path):
    c = micro_pipeline_config()
    c.train.eval_shards = 3  # held-out documents with markers, for the ablation
    c.steering.n_prompts, c.steering.samples, c.steering.max_new_tokens = 4, 2, 8
    c.ablation.fracs, c.ablation.n_random, c.ablation.n_docs = (0.1,), 2, 8
    table = replicate.run_replication(c, str(tmp_path), [3, 4], log=lambda *_: None)
    assert table["seeds"] == [3, 4]
    for seed in (3, 4):
        with open(wd.zoo_report_path(str(tmp_path / f"seed{seed}"))) as f:
            assert json.load(f)["seed"] == seed
        for stage in ("steering", "ablation"):
            with open(tmp_path / f"seed{seed}" / stage / "results.json") as f:
                assert json.load(f)["fingerprint"][stage]["seed"] == seed
    # The two seeds' crosscoders differ: nothing is shared between seeds.
    w = [(tmp_path / f"seed{s}" / "export" / "crosscoder.safetensors").read_bytes() for s in (3, 4)]
    assert w[0] != w[1]
    with open(tmp_path / replicate.JSON) as f:
        assert json.load(f) == json.loads(json.dumps(table))
    assert os.path.exists(tmp_path / replicate.MARKDOWN)
    measured = [row["seeds_measured"] for row in table["findings"]]
    assert max(measured) == 2  # findings are read from the real results files
