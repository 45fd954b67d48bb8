"""The variant comparison's bookkeeping: configs, shared store links, the table over seeds."""

import math
import os

import pytest

from configs import tiny
from xcoder_jax import config_check, variants
from xcoder_jax import workdir as wd


def test_variant_config_changes_only_its_fields_and_seed():
    base = tiny.get_config()
    c = variants.variant_config(base, "batchtopk_anneal_center", 3)
    assert c.seed == 3 and c.crosscoder.loss == "batchtopk"
    assert c.crosscoder.k == variants.MATCHED_K and c.crosscoder.center is True
    assert c.crosscoder.k_anneal_steps == 300 and c.crosscoder.b_dec_init == "mean"
    assert c.crosscoder.n_latents == base.crosscoder.n_latents
    assert c.train.to_dict() == variants.variant_config(base, "l1", 3).train.to_dict()
    assert base.crosscoder.loss == "l1" and base.seed == 0  # the caller's config is untouched


@pytest.mark.parametrize("variant", list(variants.VARIANTS))
def test_every_variant_is_a_valid_config(variant):
    config_check.check(variants.variant_config(tiny.get_config(), variant, 1))


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


def test_table_is_a_t_interval_over_seeds():
    rows = {"l1": {s: {c: None for c in variants.COLUMNS} for s in (0, 1, 2)}}
    for s, v in zip((0, 1, 2), (0.90, 0.92, 0.97)):
        rows["l1"][s]["fve_base"] = v
    t = variants.table(rows)["l1"]
    ci = t["columns"]["fve_base"]
    mean, sd = 0.93, math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    assert ci["mean"] == pytest.approx(mean, abs=1e-12)
    assert (ci["lo"], ci["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-5)
    assert t["columns"]["l0"]["mean"] is None  # no seed measured it: no value, a reason
    md = variants.markdown(variants.table(rows))
    assert md.splitlines()[2].startswith("| L1 (the paper's loss) | 3 | 0.930<br>[")
    with pytest.raises(ValueError, match="unknown variants"):
        variants.run_variants(tiny.get_config(), "unused", "unused", ["l2"], [0])
    assert wd.ROLES == ("base", "distilled")  # row() reads FVE by these role names
