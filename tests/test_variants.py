"""The variant comparison's bookkeeping: configs, shared store links, the table over seeds."""

import json
import math
import os

import pytest

from configs import tiny
from xcoder_jax import config_check, variants
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError


def test_variant_config_sets_the_whole_recipe_and_seed():
    base = tiny.get_config()
    c = variants.variant_config(base, "batchtopk_anneal_center", 3, k=9)
    assert c.seed == 3 and c.crosscoder.loss == "batchtopk" and c.crosscoder.k == 9
    assert c.crosscoder.center is True and c.crosscoder.b_dec_init == "mean"
    assert c.crosscoder.k_anneal_steps == int(variants.ANNEAL_FRAC * c.train.steps) == 300
    assert c.crosscoder.n_latents == base.crosscoder.n_latents
    assert (c.ablation.rules, c.ablation.fracs) == (("specificity",), (0.1,))  # headline only
    assert c.train.to_dict() == variants.variant_config(base, "l1", 3, k=9).train.to_dict()
    assert base.crosscoder.loss == "l1" and base.seed == 0  # the caller's config is untouched
    # Nothing leaks from the config given: the recipe fields are reset for every variant.
    leaky = tiny.get_config("batchtopk")
    with leaky.unlocked():
        leaky.crosscoder.center, leaky.crosscoder.exclusive = True, (0.1, 0.1)
    plain = variants.variant_config(leaky, "batchtopk", 0, k=7).crosscoder
    assert (plain.center, tuple(plain.exclusive), plain.k_anneal_steps, plain.k) == (
        False,
        (0.0, 0.0),
        0,
        7,
    )
    runlocal = variants.variant_config(tiny.get_config("runlocal"), "batchtopk_anneal_center", 0, 4)
    assert 0 < runlocal.crosscoder.k_anneal_steps < runlocal.train.steps  # k reaches k


def test_matched_k_is_the_l1_runs_rounded_l0():
    assert variants.matched_k({"l0": 9.6}, None) == 10
    assert variants.matched_k({"l0": 0.2}, 5) == 1  # at least 1
    assert variants.matched_k(None, 12) == 12
    with pytest.raises(ConfigError, match="need k"):
        variants.matched_k({"l0": None}, None)


@pytest.mark.parametrize("variant", list(variants.VARIANTS))
def test_every_variant_is_a_valid_config(variant):
    config_check.check(variants.variant_config(tiny.get_config(), variant, 1, k=10))


def test_link_store_shares_models_and_activations(tmp_path):
    store = tmp_path / "store"
    for where in variants.LINKED:
        os.makedirs(where(str(store)))
    run = variants.run_dir(str(tmp_path / "out"), "l1", 2)
    variants.link_store(run, str(store))
    variants.link_store(run, str(store))  # a rerun keeps the links
    for where in variants.LINKED:
        assert not os.path.isabs(os.readlink(where(run)))
        assert os.path.samefile(where(run), where(str(store)))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        variants.link_store(str(tmp_path / "other"), str(tmp_path / "missing"))


def test_table_is_a_t_interval_over_seeds_and_paired_against_the_reference():
    empty = {c: None for c in variants.COLUMNS}
    rows = {v: {s: dict(empty) for s in (0, 1, 2)} for v in ("l1", variants.REFERENCE)}
    for s, v, r in zip((0, 1, 2), (0.90, 0.92, 0.97), (0.80, 0.83, 0.86)):
        rows["l1"][s]["fve_distilled"] = v
        rows[variants.REFERENCE][s]["fve_distilled"] = r
    del rows[variants.REFERENCE][2]["fve_distilled"]
    tab = variants.table(rows)
    ci = tab["l1"]["columns"]["fve_distilled"]
    mean, sd = 0.93, math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    assert ci["mean"] == pytest.approx(mean, abs=1e-12)
    assert (ci["lo"], ci["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-5)
    assert tab["l1"]["columns"]["l0"]["mean"] is None  # no seed measured it: a reason
    # Paired by seed over the seeds both measured (0 and 1): differences 0.10 and 0.09.
    paired = tab["l1"]["vs_reference"]["fve_distilled"]
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(0.095, abs=1e-12)
    assert tab[variants.REFERENCE]["vs_reference"] == {}
    md = variants.markdown(tab)
    lines = md.splitlines()
    assert lines[2].startswith("| L1 (the paper's loss) | 3 | n/a")
    assert "0.9300<br>[" in lines[2]
    assert "(n = 2)" in lines[3]  # the reference measured FVE at two of its three seeds
    assert any(line.startswith("| L1 (the paper's loss) | +0.0950") for line in lines[4:])
    with pytest.raises(ConfigError, match="unknown variants"):
        variants.run_variants(tiny.get_config(), "unused", "unused", ["l2"], [0])
    assert wd.ROLES == ("base", "distilled")  # row() reads FVE by these role names


def _ci(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi}


def test_row_and_collect_read_the_stages_results(tmp_path):
    out = str(tmp_path)
    run = variants.run_dir(out, "matryoshka", 1)
    summary = {
        "fve": [0.8, 0.9], "roles": {"base": 1, "distilled": 0}, "l0": 9.5, "n_dead": 64,
        "n_latents": 1024, "n_distilled_only": 40,
        "latent_scaling": {"distilled_only": {"share_false_exclusive": _ci(0.25, 0.1, 0.4)}},
        "half_step": {"distilled_only_minus_random": {"fraction_closed": _ci(0.2, 0.1, 0.3)}},
        "groups": [{"latents": [0, 32]}],
    }  # fmt: skip
    heads = [_ci(-0.5, -0.9, -0.1), _ci(-0.5, -0.9, 0.1), _ci(0.0, 0.0, 0.0)]
    results = {
        "categories": {
            f"c{i}": {"headline": {"distilled": {"targeted_minus_random": h}}}
            for i, h in enumerate(heads)
        },
        "half_step_kl": {"categories": {
            "c0": {"minus_random": {"fraction_closed": _ci(0.1, 0.05, 0.2)}},
            "c1": {"minus_random": {"fraction_closed": _ci(0.1, -0.05, 0.2)}},
            "c2": {"n_latents": 0, "reason": "no set"},
        }},
    }  # fmt: skip
    for path, obj in zip(variants._results(run), (summary, results)):
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            json.dump(obj, f)
    r = variants.row(run)
    assert (r["fve_base"], r["fve_distilled"]) == (0.9, 0.8)  # by role, not by slot
    assert r["dead"] == pytest.approx(64 / 1024)
    assert (r["n_distilled_only"], r["false_exclusive"], r["half_step_minus_random"]) == (
        40,
        0.25,
        0.2,
    )
    # Only an interval below 0 counts; a zero-width one never does.
    assert r["ablation_below_random"] == 1 and r["category_kl_beyond_random"] == 1
    assert r["n_categories"] == 3 and r["n_distilled_only_learned"] == 40  # none dedicated
    tab = variants.collect(out, ["matryoshka", "l1"], [0, 1])  # l1 and seed 0: no runs
    assert list(tab) == ["matryoshka"] and tab["matryoshka"]["seeds"] == [1]
    with open(os.path.join(out, variants.JSON)) as f:
        assert json.load(f)["rows"]["matryoshka"]["1"]["l0"] == 9.5
