"""Replication across seeds: the declared family, per-seed counts, random-effects pooling over
the confirmatory seeds, Holm over the family, and stale results refused."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import micro_pipeline_config
from xcoder_jax import family, replicate, stats
from xcoder_jax import workdir as wd
from xcoder_jax.lexicon import CATEGORY_NAMES

FIVE = ("self_reflection", "deductive", "alternative", "contrastive", "verification")


def _ci(mean, half=0.1):
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": 10, "method": "test"}


def _results(effect: float, half: float = 0.1) -> dict:
    """One seed's results in the stages' own layouts (written out by hand, with decoys at
    keys the family must not read); every finding's effect is expected sign x `effect`."""
    e = lambda sign: _ci(sign * effect, half)
    analysis = {
        "categories": {
            c: {"nrn_minus_alive": e(1), "top_distilled_only": {"excess": e(1), "n_top": 5}}
            for c in FIVE
        }
    }
    ablation = {
        "categories": {
            c: {
                "headline": {
                    "distilled": {"targeted_minus_random": e(-1),
                                  "targeted_minus_direction": e(-1)},
                    "base": {"targeted_minus_random": _ci(9.0)},  # decoy
                    "distilled_minus_base": e(-1),
                    "own_minus_others": {"distilled": e(-1), "base": _ci(9.0)},
                },
                "rules": {"attribution": {"by_frac": []}},
            }
            for c in FIVE
        }
    }  # fmt: skip
    sr = {"self_reflection_per_100": e(1), "reflection_rounds": e(1), "tokens": e(1)}
    steering = {
        "headline": {
            "self_reflection:1": {"vs_clean": {"self_reflection_per_100": _ci(9.0)},
                                  "vs_random_direction": sr, "vs_random_latent": dict(sr)},
            "deductive:1": {"vs_random_direction": {"tokens": e(-1)},
                            "vs_random_latent": {"tokens": e(-1)}},
        }
    }  # fmt: skip
    # The no-loop pair: no effect, so the loop pair's minus it is the loop pair's effect.
    zero = {"reflection_rounds": _ci(0.0, half), "tokens": _ci(0.0, half)}
    steering_no_loop = {
        "headline": {"self_reflection:1": {"vs_random_direction": zero},
                     "deductive:1": {"vs_random_direction": {"tokens": _ci(0.0, half)}}}
    }  # fmt: skip
    geometry = {
        "largest": "h128",
        "plot_n_components": 2,
        "pairs": {
            "h64": {"pooled": {"2": {"structure_gain": _ci(9.0)}}},  # not the largest
            "h128": {"pooled": {"2": {"structure_gain": e(-1), "sham_gain": e(-1)},
                                "3": {"structure_gain": _ci(9.0)}}},
        },
        "trend": {"slope": e(-1), "sham_gain_slope": e(-1)},
    }  # fmt: skip
    return {"analysis": analysis, "steering": steering, "ablation": ablation, "geometry": geometry,
            "steering_no_loop": steering_no_loop}  # fmt: skip


# --- The declared family ------------------------------------------------------------------


def test_the_family_is_pinned_and_tests_every_category_in_every_per_category_test():
    assert CATEGORY_NAMES == FIVE
    assert family.digest() == family.FAMILY_SHA256 and family.FAMILY_VERSION == 2
    assert family.EXPLORATORY_SEEDS == (0,)
    names = [f.name for f in family.FAMILY]
    assert len(set(names)) == len(names) == 5 * 5 + 8 + 3 + 1 + 4
    per_category = [
        ("analysis", ("nrn_minus_alive",)),
        ("analysis", ("top_distilled_only", "excess")),
        ("ablation", ("headline", "distilled", "targeted_minus_random")),
        ("ablation", ("headline", "distilled", "targeted_minus_direction")),
        ("ablation", ("headline", "distilled_minus_base")),
    ]
    for stage, tail in per_category:
        cats = [f.path[1] for f in family.FAMILY if f.stage == stage and f.path[2:] == tail]
        assert cats == list(FIVE), (stage, tail)
    keys = {f.key: f.sign for f in family.FAMILY if f.stage in ("steering", "geometry")}
    assert keys == {
        "steering: headline.self_reflection:1.vs_random_direction.self_reflection_per_100": 1,
        "steering: headline.self_reflection:1.vs_random_latent.self_reflection_per_100": 1,
        "steering: headline.self_reflection:1.vs_random_direction.reflection_rounds": 1,
        "steering: headline.self_reflection:1.vs_random_latent.reflection_rounds": 1,
        "steering: headline.self_reflection:1.vs_random_direction.tokens": 1,
        "steering: headline.self_reflection:1.vs_random_latent.tokens": 1,
        "steering: headline.deductive:1.vs_random_direction.tokens": -1,
        "steering: headline.deductive:1.vs_random_latent.tokens": -1,
        "steering: headline.self_reflection:1.vs_random_direction.reflection_rounds - "
        "steering_no_loop: headline.self_reflection:1.vs_random_direction.reflection_rounds": 1,
        "steering: headline.self_reflection:1.vs_random_direction.tokens - "
        "steering_no_loop: headline.self_reflection:1.vs_random_direction.tokens": 1,
        "steering: headline.deductive:1.vs_random_direction.tokens - "
        "steering_no_loop: headline.deductive:1.vs_random_direction.tokens": -1,
        "geometry: pairs.<largest>.pooled.<k>.structure_gain": -1,
        "geometry: trend.slope": -1,
        "geometry: pairs.<largest>.pooled.<k>.sham_gain": -1,
        "geometry: trend.sham_gain_slope": -1,
    }
    # An edit to the family (here: one sign) changes its digest.
    flipped = (family.FAMILY[0].__class__(**{**family.FAMILY[0].__dict__, "sign": -1}),)
    assert family.digest(flipped + family.FAMILY[1:]) != family.FAMILY_SHA256


def test_every_finding_reads_its_own_key_of_the_stage_layouts():
    results = _results(0.5)
    for f in family.FAMILY:
        if f.minus is None:
            assert f.read(results) == _ci(f.sign * 0.5), f.name
        else:  # two independent intervals of half-width 0.1: the difference's is 0.1 sqrt 2
            got = f.read(results)
            assert got["mean"] == pytest.approx(f.sign * 0.5), f.name
            assert got["hi"] - got["mean"] == pytest.approx(0.1 * 2**0.5)
            del_no_loop = {k: v for k, v in results.items() if k != "steering_no_loop"}
            assert f.read(del_no_loop) is None  # one side unmeasured: not measured
        assert f.read({}) is None
    del results["geometry"]["largest"]
    largest = [f for f in family.FAMILY if "<largest>" in f.path]
    assert len(largest) == 2 and all(f.read(results) is None for f in largest)


# --- The table ------------------------------------------------------------------------------


def test_counts_and_pooling_use_the_confirmatory_seeds_only():
    # Seed 0 is exploratory (any value); 1: excludes 0; 2: right sign, CI includes 0;
    # 3: wrong sign; 4: failed (nothing counted).
    per_seed = {0: _results(-3.0), 1: _results(0.5), 2: _results(0.05), 3: _results(-0.02), 4: {}}
    table = replicate.tabulate(per_seed)
    assert table["exploratory_seeds"] == [0] and table["confirmatory_seeds"] == [1, 2, 3, 4]
    assert len(table["findings"]) == len(family.FAMILY)
    minus = {f.name for f in family.FAMILY if f.minus is not None}
    for row in table["findings"]:
        sign = row["expected_sign"]
        assert row["seeds_confirmatory"] == 4 and row["seeds_measured"] == 3, row["name"]
        assert row["seeds_expected_sign"] == 2 and row["seeds_ci_excludes_zero"] == 1
        assert row["seeds_pooled"] == 3
        # A difference of two independent intervals is sqrt 2 wider.
        se = 0.2 / (2 * 1.959963984540054) * (2**0.5 if row["name"] in minus else 1)
        expected = stats.random_effects([sign * 0.5, sign * 0.05, sign * -0.02], [se] * 3)
        assert row["pooled"] == pytest.approx(expected)
        if row["name"] not in minus:
            assert row["exploratory"] == {"0": _ci(sign * -3.0)}
        assert set(row["per_seed"]) == {"1", "2", "3", "4"} and row["per_seed"]["4"] is None
    # The exploratory seed never moves the confirmatory statistics.
    other = replicate.tabulate({**per_seed, 0: _results(+7.0)})
    for a, b in zip(table["findings"], other["findings"], strict=True):
        assert a["pooled"] == b["pooled"] and a["holm_p"] == b["holm_p"]
    json.dumps(table, allow_nan=False)


def test_holm_runs_over_the_whole_family():
    effects = {1: 0.5, 2: 0.6, 3: 0.55, 4: 0.45}
    per_seed = {s: _results(e) for s, e in effects.items()}
    for s, r in per_seed.items():
        r["analysis"]["categories"]["alternative"]["nrn_minus_alive"] = _ci(-effects[s])
        del r["geometry"]["trend"]["slope"]  # the slope is never measured
        del r["steering_no_loop"]  # nor is the no-loop pair (its three contrasts)
    table = replicate.tabulate(per_seed)
    rows = {row["name"]: row for row in table["findings"]}
    m = len(family.FAMILY)
    p = [row["pooled"]["p"] for row in table["findings"]]
    assert p.count(None) == 1 + 3
    assert [row["holm_p"] for row in table["findings"]] == stats.holm_adjusted(p)
    # Every measured finding has the same |effects|, hence the same p: Holm multiplies it by
    # the whole family's size, the unmeasured finding included.
    p0 = rows["self_reflection_latents_lean_distilled"]["pooled"]["p"]
    assert 0 < p0 and m * p0 < family.ALPHA
    for row in table["findings"]:
        if row["pooled"]["p"] is not None:
            assert row["holm_p"] == pytest.approx(m * p0) and row["holm_rejects"]
    assert rows["alternative_latents_lean_distilled"]["verdict"] == "reversed"
    assert rows["geometry_structure_gain_grows_with_size"]["verdict"] == "not measured"
    assert rows["geometry_structure_gain_grows_with_size"]["holm_rejects"] is False
    verdicts = [row["verdict"] for row in table["findings"]]
    assert verdicts.count("confirmed") == m - 1 - 4
    # Seeds that disagree: nothing is confirmed.
    mixed = replicate.tabulate({1: _results(0.5), 2: _results(-0.5), 3: _results(0.1)})
    assert all(row["verdict"] == "not confirmed" for row in mixed["findings"])


def test_markdown_has_one_row_per_finding_and_the_exploratory_column():
    table = replicate.tabulate({0: _results(0.9), 1: _results(0.5), 2: _results(0.4), 3: {}})
    text = replicate.markdown(table)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(family.FAMILY)
    assert "seed 0 (exploratory)" in rows[0] and "expected sign (of 3 seeds)" in rows[0]
    first = rows[1].split(" | ")
    assert first[1] == "+0.9 [+0.8, +1]" and first[2] == "2 (of 2 measured)" and first[3] == "2"
    assert "confirmatory seeds: 1, 2, 3" in text and f"Family v{family.FAMILY_VERSION}" in text


# --- Stale results ---------------------------------------------------------------------------


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture()
def fake_fingerprints(monkeypatch):
    """Each stage's expected fingerprint is {"format": 1, "seed": config.seed}."""
    monkeypatch.setattr(
        replicate, "_expected_fingerprint", lambda name, c, w: {"format": 1, "seed": c.seed}
    )


def test_a_stale_stage_result_is_refused(tmp_path, fake_fingerprints):
    c = micro_pipeline_config()
    c.seed = 1
    w = str(tmp_path)
    _write(os.path.join(wd.stage_dir(w, "steering"), "results.json"),
           {"fingerprint": {"format": 1, "seed": 1}, "headline": {}})  # fmt: skip
    assert set(replicate.read_results(w, c)) == {"steering"}
    c.seed = 2  # the file was written by the run of seed 1
    with pytest.raises(replicate.StaleResultError, match=r"steering.*differs in: seed"):
        replicate.read_results(w, c)
    c.seed = 1
    _write(os.path.join(wd.stage_dir(w, "ablation"), "results.json"), {"categories": {}})
    with pytest.raises(replicate.StaleResultError, match=r"ablation.*differs in: format, seed"):
        replicate.read_results(w, c)


def test_a_result_whose_inputs_are_gone_is_refused(tmp_path, monkeypatch):
    def gone(name, c, w):
        raise FileNotFoundError("no store")

    monkeypatch.setattr(replicate, "_expected_fingerprint", gone)
    _write(os.path.join(wd.stage_dir(str(tmp_path), "analysis"), "summary.json"), {})
    with pytest.raises(replicate.StaleResultError, match="cannot be checked.*no store"):
        replicate.read_results(str(tmp_path), micro_pipeline_config())


def test_a_rerun_that_leaves_older_results_counts_nothing(tmp_path, monkeypatch, fake_fingerprints):
    """Seed 1's files come from a run with another config; its rerun "succeeds" without
    replacing them (a skipped stage), seed 2's rerun fails: neither is counted."""

    def run(config, workdir):
        if config.seed == 2:
            raise RuntimeError("boom")

    monkeypatch.setattr(replicate.pipeline, "run", run)
    for seed in (1, 2):
        path = os.path.join(wd.stage_dir(str(tmp_path / f"seed{seed}"), "analysis"))
        summary = _results(0.5)["analysis"] | {"fingerprint": {"format": 0, "seed": seed}}
        _write(os.path.join(path, "summary.json"), summary)
    with pytest.raises(replicate.ReplicationError, match=r"seeds \['1', '2'\] are not counted"):
        replicate.run_replication(micro_pipeline_config(), str(tmp_path), [1, 2], log=print)
    with open(tmp_path / replicate.JSON) as f:
        table = json.load(f)
    assert (
        table["errors"]["1"].startswith("StaleResultError: ") and "format" in table["errors"]["1"]
    )
    assert table["errors"]["2"] == "RuntimeError: boom"
    for row in table["findings"]:
        assert row["seeds_measured"] == 0 and row["verdict"] == "not measured"
    text = (tmp_path / replicate.MARKDOWN).read_text()
    assert "Seed 2 is not counted: RuntimeError: boom" in text


def test_an_edited_family_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(family, "FAMILY_SHA256", "0" * 64)
    with pytest.raises(replicate.ConfigError, match="FAMILY_VERSION"):
        replicate.run_replication(micro_pipeline_config(), str(tmp_path), [1], log=print)


# --- End to end --------------------------------------------------------------------------------


def test_replication_runs_each_seed_in_its_own_workdir(tmp_path):
    c = micro_pipeline_config()
    c.train.eval_shards = 3  # held-out documents with markers, for the ablation
    c.steering.n_prompts, c.steering.samples, c.steering.max_new_tokens = 4, 2, 8
    c.ablation.fracs, c.ablation.n_random, c.ablation.n_docs = (0.1,), 2, 8
    table = replicate.run_replication(c, str(tmp_path), [3, 4], log=lambda *_: None)
    assert table["seeds"] == table["confirmatory_seeds"] == [3, 4] and table["errors"] == {}
    for seed in (3, 4):
        with open(wd.zoo_report_path(str(tmp_path / f"seed{seed}"))) as f:
            assert json.load(f)["seed"] == seed
        for stage in ("steering", "ablation"):
            with open(tmp_path / f"seed{seed}" / stage / "results.json") as f:
                assert json.load(f)["fingerprint"]["params"][f"{stage}.seed"] == seed
    # The two seeds' crosscoders differ: nothing is shared between seeds.
    w = [(tmp_path / f"seed{s}" / "export" / "crosscoder.safetensors").read_bytes() for s in (3, 4)]
    assert w[0] != w[1]
    with open(tmp_path / replicate.JSON) as f:
        assert json.load(f) == json.loads(json.dumps(table))
    assert os.path.exists(tmp_path / replicate.MARKDOWN)
    rows = {row["name"]: row for row in table["findings"]}
    # Findings are read from the real results files, each accepted by its fingerprint.
    assert rows["self_reflection_latents_lean_distilled"]["seeds_measured"] == 2
    seed3 = str(tmp_path / "seed3")
    # The negative-control pair ran in its own workdir and its steering passed its fingerprint.
    results3 = replicate.read_results(seed3, replicate.with_seed(c, 3))
    assert set(results3) == {"analysis", "steering", "ablation", "geometry", "steering_no_loop"}
    assert results3["steering_no_loop"]["fingerprint"]["params"]["steering.seed"] == 3
    # (The micro pairs rarely have a latent passing the screen: a set without one is unmeasured.)
    for f in (f for f in family.FAMILY if f.minus is not None):
        assert rows[f.name]["per_seed"]["3"] == f.read(results3), f.name
    # Seed 3's files are not seed 4's results.
    with pytest.raises(replicate.StaleResultError, match="another run"):
        replicate.read_results(seed3, replicate.with_seed(c, 4))


def test_a_seed_reaches_every_section_that_follows_the_run_seed():
    from configs import tiny

    c = tiny.get_config()
    c.geometry.seed = 11  # set on purpose: kept
    seeded = [name for name, sec in c.items() if hasattr(sec, "keys") and "seed" in sec]
    assert {"selection", "steering", "ablation"} <= set(seeded)
    for config in (c, c.copy_and_resolve_references()):
        s = replicate.with_seed(config, 7)
        assert s.seed == 7
        for name in seeded:
            assert s[name].seed == (11 if name == "geometry" else 7), name
