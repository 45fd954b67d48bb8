"""The gain over the sham model: per relation, pooled, over sizes, and a pair without one."""

import json

import numpy as np
import pytest
from scipy.stats import special_ortho_group

from tests.conftest import make_model, make_tokenizer, micro_zoo_config
from tests.test_geometry import _fixed_raw, _trend_inputs
from xcoder_jax import geometry, stats
from xcoder_jax import workdir as wd
from xcoder_jax.geometry import plots

N_BOOT = 400


def _vectors(n, d, noise, rng, offset):
    """A relation's word vectors: b = a + one shared offset + per-pair noise of `noise`."""
    a = rng.normal(size=(n, d))
    return a, a + offset + noise * rng.normal(size=(n, d))


def _raw(vectors: dict, perms, ks=(2, 5)) -> dict:
    return {role: geometry.relation_losses(a, b, ks, perms) for role, (a, b) in vectors.items()}


def _gap(scores: dict) -> float:
    return scores["mean"] - scores["control_mean"]


# --- One relation -----------------------------------------------------------------------


def test_a_sham_as_structured_as_the_distilled_model_gains_nothing():
    n, d = 12, 8
    rng = np.random.default_rng(0)
    perms = geometry.derangements(n, 4, rng)
    offset = 3.0 * rng.normal(size=d)
    vec = {role: _vectors(n, d, noise, rng, offset) for role, noise in
           (("base", 1.5), ("distilled", 0.2))}  # fmt: skip
    # A rotated, rescaled and shifted copy of the distilled vectors: the PCA sees the same
    # points, so every loss is the distilled model's, up to rounding.
    q, shift = special_ortho_group.rvs(d, random_state=1), rng.normal(size=d)
    vec["sham"] = tuple(3.7 * x @ q.T + shift for x in vec["distilled"])
    raw = _raw(vec, perms)
    with_sham = geometry.relation_replicates(raw, N_BOOT, 7)
    cis = geometry.intervals(with_sham, N_BOOT)
    for k in ("2", "5"):
        gain, rep = cis[k]["sham_gain"], with_sham[k]["sham_gain"]
        assert abs(gain["mean"]) < 1e-9 and np.abs(rep["boot"]).max() < 1e-9
        assert gain["lo"] <= 1e-9 and gain["hi"] >= -1e-9 and not stats.excludes_zero(gain)
        assert stats.sign(gain) == 0 and gain["n"] == n
    # The base is noisier: the same intervals see a real gain over it (at k=2 the PCA keeps
    # little besides the shared offset, so the test reads k=5).
    assert cis["5"]["structure_gain"]["hi"] < 0
    # Scoring the sham changes nothing else: the base/distilled statistics are the same.
    without = geometry.relation_replicates({r: raw[r] for r in ("base", "distilled")}, N_BOOT, 7)
    assert "sham_gain" not in without["2"] and "sham" not in without["2"]["true_minus_shuffled"]
    for k in without:
        for stat in ("base_minus_distilled", "structure_gain"):
            np.testing.assert_array_equal(with_sham[k][stat]["boot"], without[k][stat]["boot"])
    # A sham drawn afresh with the distilled model's noise: as structured, other points, so
    # its gain is 0 up to the choice of words, far from the gain over the noisier base.
    vec["sham"] = _vectors(n, d, 0.2, np.random.default_rng(0), offset)
    cis = geometry.intervals(geometry.relation_replicates(_raw(vec, perms), N_BOOT, 7), N_BOOT)
    for k in ("2", "5"):
        g = cis[k]["sham_gain"]
        assert g["lo"] < 0 < g["hi"] and abs(g["mean"]) < abs(cis[k]["structure_gain"]["mean"]) / 2


def test_sham_gain_is_the_distilled_gap_minus_the_shams_on_the_same_resamples():
    raw = _fixed_raw()  # base gap -0.3, distilled gap -0.5 (mean), 4 word pairs

    def entry(losses, control_means):
        control = np.stack([np.full(6, c) for c in control_means])
        return {"2": {"n_pairs": 4, "losses": np.full(6, losses), "control": control}}

    raw["sham"] = entry(0.4, (0.8, 0.7))  # gap 0.4 - 0.75 = -0.35
    reps = geometry.relation_replicates(raw, 300, 11)["2"]
    sham, gain = reps["sham_gain"], reps["structure_gain"]
    assert abs(sham["mean"] - (-0.15)) < 1e-12 and abs(gain["mean"] - (-0.2)) < 1e-12
    # The base's and the sham's gaps are constant: the two gains differ by 0.05 on every
    # resample only if both come from the same draw of word pairs.
    np.testing.assert_allclose(sham["boot"], gain["boot"] + 0.05, rtol=0, atol=1e-12)
    counts = geometry.pair_counts(4, 300, np.random.default_rng(11))
    d = raw["distilled"]["2"]
    want = geometry.resampled_means(d["losses"] - d["control"].mean(0), counts) + 0.35
    np.testing.assert_allclose(sham["boot"], want, rtol=0, atol=1e-12)
    assert np.ptp(sham["boot"]) > 0.01
    ci = geometry.intervals({"2": reps}, 300)["2"]["sham_gain"]
    np.testing.assert_allclose([ci["lo"], ci["hi"]], np.quantile(want, [0.025, 0.975]), atol=1e-12)
    assert ci["hi"] < 0 and stats.sign(ci) == -1


def test_an_exact_distilled_parallelogram_beats_a_noisy_sham_by_the_difference_of_gaps():
    n, d = 14, 8
    rng = np.random.default_rng(0)
    perms = geometry.derangements(n, 4, rng)
    reps, rels = [], {}
    for i, sham_noise in enumerate((1.0, 1.5)):  # two relations, the sham noisy in both
        offset = 3.0 * rng.normal(size=d)
        vec = {role: _vectors(n, d, noise, rng, offset) for role, noise in
               (("base", 0.5), ("distilled", 0.0), ("sham", sham_noise))}  # fmt: skip
        raw = _raw(vec, perms)
        reps.append(geometry.relation_replicates(raw, N_BOOT, i))
        rels[f"r{i}"] = {"kept": n, "total": n, "by_k": geometry.intervals(reps[-1], N_BOOT)}
        for k in ("2", "5"):
            s = {role: geometry.loss_scores(raw[role][k]) for role in raw}
            want = _gap(s["distilled"]) - _gap(s["sham"])
            gain = rels[f"r{i}"]["by_k"][k]["sham_gain"]
            assert want < -0.1 and abs(gain["mean"] - want) < 1e-12
        assert rels[f"r{i}"]["by_k"]["5"]["sham_gain"]["hi"] < 0
    pooled = geometry.pooled(reps, N_BOOT)
    for k in ("2", "5"):
        p = pooled[k]["sham_gain"]
        leaves = [r[k]["sham_gain"] for r in reps]
        assert abs(p["mean"] - np.mean([x["mean"] for x in leaves])) < 1e-12
        want = np.quantile(np.mean([x["boot"] for x in leaves], axis=0), [0.025, 0.975])
        np.testing.assert_allclose([p["lo"], p["hi"]], want, rtol=1e-12, atol=1e-15)
        assert p["mean"] < 0 and p["n"] == 2 * n and pooled[k]["n_relations"] == 2
        assert set(pooled[k]["true_minus_shuffled"]) == {"base", "distilled", "sham"}
    assert pooled["5"]["sham_gain"]["hi"] < 0
    counts = geometry.verdicts(rels)["5"]
    assert counts["sham_gain"] == {"above": 0, "below": 2, "undecided": 0}
    assert counts["true_vs_shuffled"]["sham"]["below"] == 2
    json.dumps(pooled, allow_nan=False)


# --- Over sizes -------------------------------------------------------------------------


def _with_sham(pairs, pools, gains, noise, seed=1):
    """Adds sham gains (None: that size has no sham model) to `_trend_inputs`' sizes."""
    rng = np.random.default_rng(seed)
    for name, g in zip(list(pairs), gains):
        if g is None:
            pairs[name]["sham"] = f"no sham model at models/{name}/sham"
            continue
        pairs[name]["n_params"]["sham"] = 1  # not on the x axis: that is the pair's
        boot = g + noise * rng.normal(size=N_BOOT)
        pools[name]["2"]["sham_gain"] = {"mean": g, "boot": boot, "n": 20, "reason": None}
    return pairs, pools


def test_trend_recovers_the_slope_of_the_sham_gain():
    params = [2e4, 1e5, 7e5, 3e6]
    gains = [0.05 - 0.04 * np.log10(p) for p in params]
    sham = [0.02 - 0.03 * np.log10(p) for p in params]  # -0.03 per decade
    pairs, pools = _with_sham(*_trend_inputs(gains, params, noise=0.003), sham, noise=0.002)
    t = geometry.size_trend(pairs, pools, "2", N_BOOT)
    np.testing.assert_allclose(t["log10_params"], np.log10(params), rtol=1e-12)
    slope = t["sham_gain_slope"]
    assert abs(slope["mean"] - (-0.03)) < 1e-12 and slope["n"] == 4
    assert slope["lo"] < -0.03 < slope["hi"] < 0 and stats.sign(slope) == -1
    boots = np.stack([pools[n]["2"]["sham_gain"]["boot"] for n in t["pairs"]])
    refit = [np.polyfit(np.log10(params), boots[:, b], 1)[0] for b in range(N_BOOT)]
    np.testing.assert_allclose([slope["lo"], slope["hi"]], np.quantile(refit, [0.025, 0.975]))
    np.testing.assert_allclose(t["sham_gain"], sham, rtol=1e-12)
    assert abs(t["slope"]["mean"] - (-0.04)) < 1e-12  # the structure gain's, untouched
    assert "sham_gain_reason" not in t and "sham_gain_excluded" not in t
    results = {"plot_n_components": 2, "pairs": {}, "trend": t}
    line = geometry.summarize(results)
    assert f"sham gain per decade of parameters over 4 sizes: {slope['mean']:+.3g} [" in line
    # A size without a sham model: fitted over the others, that size listed with its reason.
    sham[1] = None
    pairs, pools = _with_sham(*_trend_inputs(gains, params, noise=0.003), sham, noise=0.002)
    t = geometry.size_trend(pairs, pools, "2", N_BOOT)
    assert abs(t["sham_gain_slope"]["mean"] - (-0.03)) < 1e-12 and t["sham_gain_slope"]["n"] == 3
    assert t["sham_gain"][1] is None and t["pairs"] == list(pairs) and t["slope"]["n"] == 4
    assert t["sham_gain_excluded"] == {"h32": "no sham model at models/h32/sham"}
    json.dumps(t, allow_nan=False)


@pytest.mark.parametrize("with_sham", [0, 1])
def test_fewer_than_two_sizes_with_a_sham_leave_its_slope_out_with_a_reason(with_sham):
    params = [1e5, 1e6, 1e7]
    sham = [-0.1] * with_sham + [None] * (3 - with_sham)
    pairs, pools = _with_sham(*_trend_inputs([-0.1, -0.2, -0.3], params, 0.01), sham, 0.01)
    t = geometry.size_trend(pairs, pools, "2", N_BOOT)
    assert "sham_gain_slope" not in t and t["slope"] is not None
    assert (
        t["sham_gain_reason"] == f"{with_sham} size(s) with a sham model: a slope needs 2 or more"
    )
    assert ("sham_gain" in t) == bool(with_sham) and len(t["sham_gain_excluded"]) == 3 - with_sham
    line = geometry.summarize({"plot_n_components": 2, "pairs": {}, "trend": t})
    assert f"sham gain per decade of parameters over {with_sham} sizes: n/a ({with_sham} " in line


# --- A zoo with and without sham models -------------------------------------------------

RELS = {
    "plural": [("cat", "cats"), ("dog", "dogs"), ("car", "cars"), ("hat", "hats")],
    "comparative": [("big", "bigger"), ("old", "older"), ("tall", "taller"), ("fast", "faster")],
}


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory):
    """models/h16 (2 blocks) with a sham identical to its distilled model, models/h32 (3
    blocks) without one: random weights, one tokenizer knowing every relation word."""
    workdir = str(tmp_path_factory.mktemp("sham_zoo"))
    words = " ".join(w for pairs in RELS.values() for p in pairs for w in p)
    tok = make_tokenizer([f"The {words} ."] * 40)
    for size, layers, roles in ((16, 2, ("base", "distilled", "sham")), (32, 3, wd.ROLES)):
        for role in roles:
            seed = {"base": 0, "distilled": 1, "sham": 1}[role]  # the sham: distilled's weights
            make_model(wd.model_dir(workdir, role, size), tok, seed, hidden=size, layers=layers)
    config = micro_zoo_config()
    config.geometry.n_components, config.geometry.n_boot = (2, 5), 200
    results = {"plot_n_components": 2, "pairs": {}}
    pools = {}
    for size in (16, 32):
        entry = {"name": f"h{size}", "size": size, "zoo": True}
        res, pools[entry["name"]] = geometry.study_pair(config, workdir, entry, RELS)
        results["pairs"][entry["name"]] = {"size": size, **res}
    results["trend"] = geometry.size_trend(results["pairs"], pools, "2", 200)
    return workdir, results


def test_a_pair_with_a_sham_model_scores_it_on_the_same_words(fake_zoo):
    p = fake_zoo[1]["pairs"]["h16"]
    assert "sham" not in p and p["n_params"]["sham"] == p["n_params"]["distilled"]
    assert (p["layer"], p["n_layers"]) == (1, 2)
    for rel in RELS:
        r = p["relations"][rel]
        assert r["kept"] == 4 and r["models"]["sham"] == r["models"]["distilled"]
        for by_k in r["by_k"].values():
            gain = by_k["sham_gain"]  # the sham is the distilled model: no gain on any resample
            assert gain["mean"] == 0 and gain["lo"] == 0 == gain["hi"] and gain["n"] == 4
            assert by_k["true_minus_shuffled"]["sham"] == by_k["true_minus_shuffled"]["distilled"]
            assert by_k["structure_gain"]["mean"] != 0
    for k, pooled in p["pooled"].items():
        assert pooled["sham_gain"]["mean"] == 0 and pooled["n_relations"] == 2
        assert p["counts"][k]["sham_gain"] == {"above": 0, "below": 0, "undecided": 2}


def test_a_pair_without_a_sham_model_says_why_and_has_no_sham_keys(fake_zoo, tmp_path):
    workdir, results = fake_zoo
    p = results["pairs"]["h32"]
    assert p["sham"] == f"no sham model at {wd.model_dir(workdir, 'sham', 32)}"
    assert (p["layer"], p["n_layers"]) == (1, 3) and set(p["n_params"]) == {"base", "distilled"}
    text = json.dumps(p, allow_nan=False)
    assert "sham_gain" not in text and '"sham": {' not in text
    for r in p["relations"].values():
        assert set(r["models"]) == {"base", "distilled"}
        for by_k in r["by_k"].values():
            assert "structure_gain" in by_k and "sham_gain" not in by_k
    assert all("sham_gain" not in c for c in p["counts"].values())
    t = results["trend"]
    assert t["pairs"] == ["h16", "h32"] and t["sham_gain"] == [0.0, None]
    assert t["sham_gain_excluded"] == {"h32": p["sham"]} and "sham_gain_slope" not in t
    assert t["sham_gain_reason"].startswith("1 size(s) with a sham model")
    line = geometry.summarize(results)
    assert f"h32 n/a ({p['sham']})" in line and "h16 +0 [+0, +0] (below 0 on 0/2" in line
    assert "structure gain ((true - shuffled) distilled - base): h16 " in line
    for name, plot in (("cdf.png", plots.plot_cdfs), ("size.png", plots.plot_loss_vs_size)):
        plot(results, str(tmp_path / name))
        assert (tmp_path / name).stat().st_size > 0
    # A configured pair of real models has no sham either, before any model is loaded.
    real = {"name": "main", "size": None, "zoo": False}
    assert geometry.study._sham_missing(workdir, real).startswith("no sham model")
