"""The parallelogram metric, relation loading and filtering, and the study on a micro zoo."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import micro_zoo_config
from xcoder_jax import geometry, site, stats
from xcoder_jax import workdir as wd
from xcoder_jax.geometry import study
from xcoder_jax.zoo import RELATIONS, build_zoo, load_pair


def _slow_losses(a, b):
    out = []
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            num = np.linalg.norm(a[i] - b[i] - a[j] + b[j])
            den = np.sqrt(a[i] @ a[i] + b[i] @ b[i] + a[j] @ a[j] + b[j] @ b[j])
            out.append(num / den)
    return np.array(out)


def _random_pairs(n=9, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, d))


def _gc(**overrides):
    gc = micro_zoo_config().geometry
    for k, v in overrides.items():
        gc[k] = v
    return gc


# --- The metric -------------------------------------------------------------------------


def test_exact_parallelogram_has_zero_loss():
    a, _ = _random_pairs()
    b = a + np.array([1.5, -2.0, 0.25, 3.0, 0.0, -1.0])  # one shared offset
    losses = geometry.parallelogram_losses(a, b)
    assert losses.shape == (9 * 8 // 2,)
    np.testing.assert_allclose(losses, 0.0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_loss_is_invariant_to_global_rescaling(scale):
    a, b = _random_pairs()
    want = geometry.parallelogram_losses(a, b)
    got = geometry.parallelogram_losses(scale * a, scale * b)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)  # losses are O(1)


@pytest.mark.parametrize("n,k,chunk", [(2, 1, 1 << 20), (7, 3, 1 << 20), (25, 20, 13)])
def test_vectorised_loss_matches_reference_loop(n, k, chunk):
    a, b = _random_pairs(n, k, seed=n)
    got = geometry.parallelogram_losses(a, b, chunk=chunk)
    np.testing.assert_allclose(got, _slow_losses(a, b), rtol=1e-12, atol=1e-14)
    assert got.min() >= 0 and got.max() <= 2  # ||sum of 4 vectors|| <= 2 sqrt(sum of squares)


@pytest.mark.parametrize("n,d", [(6, 40), (10, 5)])  # rank limited by 2n, then by d
def test_pca_with_all_components_keeps_losses_of_centred_vectors(n, d):
    a, b = _random_pairs(n, d, seed=d)
    x = np.concatenate([a, b])
    xc = x - x.mean(axis=0)
    z = geometry.pca_coordinates(x, 10_000)
    assert z.shape == (2 * n, min(2 * n, d))
    want = geometry.parallelogram_losses(xc[:n], xc[n:])
    # The SVD's rounding depends on the LAPACK build: an absolute floor for small losses.
    got = geometry.parallelogram_losses(z[:n], z[n:])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    scores = geometry.relation_scores(a, b, (2, 10_000), np.array([np.roll(np.arange(n), 1)]))
    assert scores["10000"]["n_components_used"] == min(2 * n, d)
    np.testing.assert_allclose(scores["10000"]["mean"], want.mean(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scores["10000"]["explained_variance"], 1.0, rtol=1e-9)
    assert scores["2"]["explained_variance"] < 1


def test_control_scores_a_structured_relation_far_above_its_true_pairing():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 8))
    b = a + 3.0 + 0.01 * rng.normal(size=(12, 8))
    perms = geometry.derangements(12, 5, rng)
    assert perms.shape == (5, 12) and (perms != np.arange(12)).all()
    assert all(sorted(p) == list(range(12)) for p in perms)
    s = geometry.relation_scores(a, b, (2, 5), perms)["5"]
    assert s["mean"] < 0.05 < 0.5 < s["control_mean"] and 0 < s["control_std"] < 0.5
    assert len(s["cdf"]) == 101 and s["cdf"] == sorted(s["cdf"])
    assert s["n_pairs"] == 12 and s["n_comparisons"] == 66


# --- Bootstrap intervals ----------------------------------------------------------------


def _relation(n=14, d=8, base_noise=0.5, distilled_noise=0.0, ks=(2, 5), seed=0):
    """`relation_losses` of both models on one synthetic relation: b = a + one offset, plus
    per-pair noise of the given scale (0: an exact parallelogram)."""
    rng = np.random.default_rng(seed)
    perms, raw = geometry.derangements(n, 4, rng), {}
    for role, noise in (("base", base_noise), ("distilled", distilled_noise)):
        a = rng.normal(size=(n, d))
        b = a + 3.0 * rng.normal(size=d) + noise * rng.normal(size=(n, d))
        raw[role] = geometry.relation_losses(a, b, ks, perms)
    return raw


def _cis(raw, n_boot, seed):
    return geometry.intervals(geometry.relation_replicates(raw, n_boot, seed), n_boot)


def test_resampled_mean_skips_same_pair_duplicates():
    n = 7
    losses = np.random.default_rng(1).uniform(size=n * (n - 1) // 2)
    full = np.zeros((n, n))
    full[np.triu_indices(n, 1)] = losses
    full += full.T
    counts = geometry.pair_counts(n, 50, np.random.default_rng(2))
    assert (counts.sum(1) == n).all() and ((counts > 0).sum(1) >= 2).all()
    want = []
    for c in counts.astype(int):  # the resampled list, every i < j of two different pairs
        drawn = np.repeat(np.arange(n), c)
        pairs = [(u, v) for u in range(n) for v in range(u + 1, n) if drawn[u] != drawn[v]]
        want.append(np.mean([full[drawn[u], drawn[v]] for u, v in pairs]))
    got = geometry.resampled_means(losses, np.concatenate([counts, np.ones((1, n))]))
    np.testing.assert_allclose(got, [*want, losses.mean()], rtol=1e-12, atol=1e-15)


def test_exact_parallelograms_beat_a_noisy_base_with_a_ci_excluding_zero():
    raw = _relation()
    cis = _cis(raw, 1000, 0)
    assert list(cis) == ["2", "5"]
    for k, ci in cis.items():
        gap = ci["base_minus_distilled"]
        want = raw["base"][k]["losses"].mean() - raw["distilled"][k]["losses"].mean()
        assert abs(gap["mean"] - want) < 1e-12 and gap["n"] == 14 and "reason" not in gap
        assert raw["distilled"][k]["losses"].max() < 1e-9  # PCA keeps a parallelogram
        assert 0 < gap["lo"] < gap["mean"] < gap["hi"] and stats.sign(gap) == 1
        control = ci["true_minus_shuffled"]["distilled"]  # 0 against a random pairing
        assert control["hi"] < 0 and stats.sign(control) == -1


def test_identical_models_give_zero_difference_with_a_ci_containing_zero():
    raw = _relation(base_noise=0.5)
    raw["distilled"] = raw["base"]
    gap = _cis(raw, 500, 3)["2"]["base_minus_distilled"]
    assert abs(gap["mean"]) <= 1e-12 and gap["lo"] <= 0 <= gap["hi"]
    assert not stats.excludes_zero(gap)


def test_bootstrap_is_deterministic_given_the_seed():
    raw = _relation(base_noise=0.3, distilled_noise=0.3)
    first, again = _cis(raw, 300, [5, 17, 1]), _cis(raw, 300, [5, 17, 1])
    other = _cis(raw, 300, [6, 17, 1])["2"]["base_minus_distilled"]
    assert first == again and first["2"]["base_minus_distilled"]["lo"] != other["lo"]
    assert first["2"]["base_minus_distilled"]["mean"] == other["mean"]


def test_pooled_is_the_mean_of_per_relation_means_with_averaged_resamples():
    # 2 pairs: a mean but no resamples, so that relation is not pooled.
    reps = [geometry.relation_replicates(_relation(n=n, seed=n), 400, n) for n in (5, 9, 2)]
    small = geometry.intervals(reps[2], 400)["5"]["base_minus_distilled"]
    assert small["lo"] is None and "fewer than 3" in small["reason"] and small["mean"] > 0
    pooled = geometry.pooled(reps, 400)
    assert list(pooled) == ["2", "5"]
    roles = ("base", "distilled")
    stats_of = [lambda t: t["base_minus_distilled"]]
    stats_of += [lambda t, role=role: t["true_minus_shuffled"][role] for role in roles]
    stats_of.append(lambda t: t["structure_gain"])
    for k, p in pooled.items():
        assert p["n_relations"] == 2
        for get in stats_of:
            leaves, ci = [get(r[k]) for r in reps[:2]], get(p)
            assert abs(ci["mean"] - np.mean([x["mean"] for x in leaves])) <= 1e-12
            want = np.quantile(np.mean([x["boot"] for x in leaves], axis=0), [0.025, 0.975])
            np.testing.assert_allclose([ci["lo"], ci["hi"]], want, rtol=1e-12, atol=1e-15)
            assert ci["n"] == 14 and "relations" in ci["method"]
    json.dumps(pooled, allow_nan=False)
    assert geometry.pooled(reps[2:], 400)["2"]["n_relations"] == 0


def _fixed_raw():
    """4 word pairs (6 comparisons), one PCA size, hand-chosen losses and controls: base
    true 0.5 vs control 0.8 (gap -0.3), distilled true 0.2 on average vs control 0.7 (gap
    -0.5), so structure gain -0.2 and base - distilled +0.3."""

    def entry(losses, control_means):
        control = np.stack([np.full(6, c) for c in control_means])  # [2 shuffles, 6]
        return {"2": {"n_pairs": 4, "losses": np.asarray(losses, float), "control": control}}

    return {
        "base": entry(np.full(6, 0.5), (0.9, 0.7)),
        "distilled": entry([0.1, 0.2, 0.3, 0.1, 0.2, 0.3], (0.8, 0.6)),
    }


def test_structure_gain_is_the_difference_of_differences_on_one_resample():
    raw = _fixed_raw()
    reps = geometry.relation_replicates(raw, 300, 11)["2"]
    gain, gap = reps["structure_gain"], reps["base_minus_distilled"]
    assert abs(gain["mean"] - (-0.2)) < 1e-12 and abs(gap["mean"] - 0.3) < 1e-12
    # The base's losses are constant, so on every resample its gap is -0.3 and the distilled
    # control 0.7: gain = mean(distilled) - 0.4 = 0.1 - (base - distilled), resample by resample,
    # which holds only if the four means of a replicate come from one draw of word pairs.
    np.testing.assert_allclose(gain["boot"], 0.1 - gap["boot"], rtol=0, atol=1e-12)
    counts = geometry.pair_counts(4, 300, np.random.default_rng(11))
    true_minus = {
        role: geometry.resampled_means(r["2"]["losses"] - r["2"]["control"].mean(0), counts)
        for role, r in raw.items()
    }
    np.testing.assert_allclose(
        gain["boot"], true_minus["distilled"] - true_minus["base"], atol=1e-12
    )
    assert np.ptp(gain["boot"]) > 0.01  # the resamples do move it
    ci = geometry.intervals({"2": reps}, 300)["2"]["structure_gain"]
    want = np.quantile(0.1 - gap["boot"], [0.025, 0.975])
    np.testing.assert_allclose([ci["lo"], ci["hi"]], want, rtol=0, atol=1e-12)
    assert ci["mean"] == gain["mean"] and ci["n"] == 4 and ci["hi"] < 0
    # On a real relation: the per-relation means of `loss_scores` give the same number.
    raw = _relation(n=9, seed=2)
    reps = geometry.relation_replicates(raw, 50, 0)
    for k in ("2", "5"):
        s = {role: geometry.loss_scores(raw[role][k]) for role in raw}
        want = (s["distilled"]["mean"] - s["distilled"]["control_mean"]) - (
            s["base"]["mean"] - s["base"]["control_mean"]
        )
        assert abs(reps[k]["structure_gain"]["mean"] - want) < 1e-12


def _trend_inputs(gains, params, noise, n_boot=400, seed=0):
    """results' "pairs" and pooled replicates of sizes with the given pooled structure gains
    (base - distilled: twice them) and parameter counts, replicates = gain + N(0, noise)."""
    rng = np.random.default_rng(seed)
    pairs, pools = {}, {}
    for i, (g, p) in enumerate(zip(gains, params)):
        name = f"h{16 << i}"
        pairs[name] = {"size": 16 << i, "n_params": {"base": p, "distilled": p}}

        def rep(m):
            return {"mean": m, "boot": m + noise * rng.normal(size=n_boot), "n": 20, "reason": None}

        pools[name] = {"2": {"structure_gain": rep(g), "base_minus_distilled": rep(2 * g)}}
    return pairs, pools


def test_trend_recovers_an_exactly_linear_slope_in_log10_params():
    params = [2e4, 1e5, 7e5, 3e6]
    gains = [0.05 - 0.04 * np.log10(p) for p in params]  # -0.04 per decade
    pairs, pools = _trend_inputs(gains, params, noise=0.003)
    t = geometry.size_trend(pairs, pools, "2", 400)
    slope = t["slope"]
    assert abs(slope["mean"] - (-0.04)) < 1e-12 and slope["n"] == 4
    assert slope["lo"] < -0.04 < slope["hi"] < 0 and stats.sign(slope) == -1
    assert abs(t["base_minus_distilled_slope"]["mean"] - (-0.08)) < 1e-12
    assert t["pairs"] == list(pairs) and t["sizes"] == [16, 32, 64, 128] and t["params"] == params
    np.testing.assert_allclose(t["log10_params"], np.log10(params), rtol=1e-12)
    np.testing.assert_allclose(t["structure_gain"], gains, rtol=1e-12)
    assert t["k"] == 2 and t["x"] == "log10 parameters of the pair's models" and not t["excluded"]
    # The interval is that of the slope refitted on each replicate of every size.
    boots = np.stack([pools[n]["2"]["structure_gain"]["boot"] for n in pairs])  # [sizes, boot]
    refit = [np.polyfit(np.log10(params), boots[:, b], 1)[0] for b in range(400)]
    np.testing.assert_allclose([slope["lo"], slope["hi"]], np.quantile(refit, [0.025, 0.975]))
    json.dumps(t, allow_nan=False)
    # results.json stores pairs in text order ("h128" before "h32"): the trend sorts them.
    shuffled = {n: pairs[n] for n in ("h64", "h128", "h16", "h32")}
    assert geometry.size_trend(shuffled, pools, "2", 400) == t
    assert geometry.ordered_pairs(shuffled) == list(pairs)
    # No trend, noisy sizes: the interval covers 0.
    pairs, pools = _trend_inputs([-0.1, -0.1, -0.1], params[:3], noise=0.05, seed=1)
    flat = geometry.size_trend(pairs, pools, "2", 400)["slope"]
    assert abs(flat["mean"]) < 1e-12 and flat["lo"] < 0 < flat["hi"]


def test_trend_needs_two_sizes_and_reports_why_not():
    pairs, pools = _trend_inputs([-0.1], [1e5], noise=0.01)
    t = geometry.size_trend(pairs, pools, "2", 400)
    assert t["slope"] is None and t["base_minus_distilled_slope"] is None
    assert "1 size(s)" in t["reason"] and "needs 2" in t["reason"]
    json.dumps(t, allow_nan=False)
    # A size with no pooled statistic (no relation with 3+ pairs) is left out, with why.
    pairs, pools = _trend_inputs([-0.1, -0.2], [1e5, 1e6], noise=0.01)
    none = {"mean": None, "boot": None, "n": 0, "reason": "no relation with 3+ word pairs"}
    pools["h32"]["2"] = {"structure_gain": none, "base_minus_distilled": none}
    t = geometry.size_trend(pairs, pools, "2", 400)
    assert t["slope"] is None and t["pairs"] == ["h16"] and "1 size(s)" in t["reason"]
    assert t["excluded"] == {"h32": "no relation with 3+ word pairs"}
    pairs, pools = _trend_inputs([-0.1, -0.2], [1e5, 1e5], noise=0.01)
    assert "same parameter count" in geometry.size_trend(pairs, pools, "2", 400)["reason"]
    # Real pairs (no zoo size) make a trend of their own; zoo sizes exclude them.
    pairs = {"main": {"size": None}, "r1_7b": {"size": None}}
    assert geometry.trend_pairs(pairs) == ["main", "r1_7b"]
    assert geometry.trend_pairs({**pairs, "h16": {"size": 16}}) == ["h16"]


def test_non_finite_losses_become_none_with_a_reason():
    raw = _relation(n=4, ks=(2,))
    raw["base"]["2"]["losses"][1] = np.nan  # a 0/0 loss: four words on the PCA centre
    ci, scores = _cis(raw, 100, 0)["2"], geometry.loss_scores(raw["base"]["2"])
    gap = ci["base_minus_distilled"]
    assert gap["mean"] is None and gap["reason"] == "non-finite losses"
    assert ci["true_minus_shuffled"]["distilled"]["lo"] is not None
    assert scores["mean"] is None and scores["reason"] == "non-finite losses"
    json.dumps([ci, scores], allow_nan=False)
    with pytest.raises(ValueError, match="non-finite word vectors"):
        geometry.relation_losses(np.full((3, 4), np.nan), np.ones((3, 4)), (2,), np.eye(3))


def test_counts_and_summary_follow_the_intervals():
    rels, reps = {}, []
    for name, noise in {"lower": (0.5, 0.0), "higher": (0.0, 0.5), "same": (0.3, 0.3)}.items():
        raw = _relation(base_noise=noise[0], distilled_noise=noise[1], seed=4)
        if name == "same":
            raw["distilled"] = raw["base"]
        reps.append(geometry.relation_replicates(raw, 500, 0))
        rels[name] = {"kept": 14, "total": 14, "by_k": geometry.intervals(reps[-1], 500)}
    rels["junk"] = {"kept": 0, "total": 2, "skipped": "none of its 2 pairs"}
    counts = geometry.verdicts(rels)
    below = {"above": 0, "below": 3, "undecided": 0}
    # The two models' random offsets differ, and so do their controls: in "lower" the
    # distilled model's true loss is below the base's, but so is its control, by more.
    assert counts["2"] == {
        "n_relations": 3,
        "distilled_vs_base": {"below": 1, "above": 1, "undecided": 1},
        "true_vs_shuffled": {"base": below, "distilled": below},
        "structure_gain": {"below": 0, "above": 2, "undecided": 1},
    }
    pair = {"relations": rels, "pooled": geometry.pooled(reps, 500), "counts": counts}
    line = geometry.summarize({"plot_n_components": 2, "pairs": {"h128": pair}})
    want = "distilled below base (CI excludes 0) on 1/3 relations at h128, above on 1/3, "
    assert want + "undecided 1/3" in line
    assert "below shuffled control (CI excludes 0): base 3/3 & distilled 3/3 at h128" in line
    gain = pair["pooled"]["2"]["structure_gain"]
    assert (
        f"structure gain ((true - shuffled) distilled - base): h128 {gain['mean']:+.3g} [" in line
    )
    assert "(below 0 on 0/3 relations)" in line and "per decade" not in line  # no trend here
    assert line.endswith("skipped (< 2 single-token pairs): junk@h128")


# --- Relation sets ----------------------------------------------------------------------


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_todd_file_loads(tmp_path):
    rows = [{"input": "cat", "output": "cats"}, {"input": " dog ", "output": "dogs"}]
    assert geometry.load_pair_file(_write(tmp_path, "p.json", rows)) == [
        ("cat", "cats"),
        ("dog", "dogs"),
    ]


@pytest.mark.parametrize(
    "content,match",
    [
        ('[{"input": "cat", "output": "cats"', "not valid JSON"),
        ({"input": "cat", "output": "cats"}, "expected a JSON list"),
        ([{"input": "cat", "output": "cats"}, {"input": "dog"}], "entry 1"),
        ([{"input": "cat", "output": "cats"}], "1 pair"),
        ([], "0 pair"),
    ],
)
def test_bad_pair_files_raise_clear_errors(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        geometry.load_pair_file(_write(tmp_path, "bad.json", content))


def test_relation_sets_join_zoo_relations_and_files(tmp_path):
    rows = [{"input": "cat", "output": "cats"}, {"input": "dog", "output": "dogs"}]
    gc = _gc(relation_files=(_write(tmp_path, "singular-plural.json", rows),))
    sets = geometry.relation_sets(gc)
    assert list(sets) == [*RELATIONS, "singular-plural"]
    with pytest.raises(ValueError, match="no relations"):
        geometry.relation_sets(_gc(zoo_relations=False))


# --- The micro zoo ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    config = micro_zoo_config()
    config.geometry.n_components = (2, 5, 64)
    config.geometry.n_shuffles = 3
    workdir = str(tmp_path_factory.mktemp("geometry_zoo"))
    build_zoo(config, workdir)
    return config, workdir


@pytest.fixture(scope="module")
def pair(zoo):
    return load_pair(zoo[1])


def test_word_prompt_reads_one_token_after_the_tokenizers_prefix(pair):
    tok = pair[2]
    (seven,) = tok(" seven", add_special_tokens=False)["input_ids"]
    assert geometry.word_prompt(tok, "seven", " {word}", True) == [tok.eos_token_id, seven]
    assert geometry.word_prompt(tok, "seven", " {word}", False) == [seven]
    ids = geometry.word_prompt(tok, "seven", "The number {word} is", True)
    assert ids[-1] == seven and ids[0] == tok.eos_token_id and len(ids) > 2
    assert geometry.word_prompt(tok, "xylophonequark", " {word}", True) is None
    with pytest.raises(ValueError, match="once"):
        geometry.word_prompt(tok, "seven", "no slot", True)


def test_a_lone_space_token_before_a_digit_counts_as_context():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # digits one by one, as in Qwen2
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    texts = [f"We write seven as 7 and {n} ." for n in range(30)]
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tok)
    space, seven = tok(" 7", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens([space, seven]) == ["Ġ", "7"]
    assert geometry.word_prompt(tok, "7", " {word}", True) == [space, seven]
    ids = geometry.word_prompt(tok, "7", "We write seven as {word} .", True)
    assert ids[-2:] == [space, seven] and len(ids) > 3
    assert geometry.word_prompt(tok, "17", " {word}", True) is None  # two digit tokens


def test_single_token_filter_on_the_zoo_tokenizer(pair):
    tok, gc = pair[2], _gc()
    pairs = [("cat", "cats"), ("seven", "eight"), ("cat", "cats"), ("xylophonequark", "zork")]
    rel = geometry.filter_relation("mixed", pairs, tok, gc)
    assert rel.pairs == [("cat", "cats"), ("seven", "eight")] and (rel.kept, rel.total) == (2, 3)
    assert set(rel.prompts) == {"cat", "cats", "seven", "eight"}
    with pytest.raises(geometry.RelationError, match="none of its 2 pairs") as e:
        geometry.filter_relation("junk", [("xylophonequark", "zork"), ("qqqz", "jjjx")], tok, gc)
    assert (e.value.kept, e.value.total) == (0, 2)
    with pytest.raises(ValueError, match="only 1 of 2"):
        geometry.filter_relation("one", [("cat", "cats"), ("xylophonequark", "zork")], tok, gc)
    sub = geometry.filter_relation("successor", RELATIONS["successor"], tok, _gc(max_pairs=3))
    assert len(sub.pairs) == 3 and set(sub.pairs) <= set(RELATIONS["successor"])
    assert sub.kept == sub.total == len(RELATIONS["successor"])


def test_word_vectors_are_the_input_of_block_l_at_the_word(pair):
    base, _, tok = pair
    prompts = [geometry.word_prompt(tok, w, " {word}", True) for w in ("seven", "cats", "eight")]
    prompts.append(geometry.word_prompt(tok, "seven", "After {word}", True))  # a longer prompt
    layer = site.resolve_layer(None, site.num_layers(base))
    got = geometry.word_vectors(base, prompts, layer, batch_size=2)
    assert got.shape == (4, base.config.hidden_size) and got.dtype == np.float64
    for row, ids in zip(got, prompts):
        with torch.no_grad():
            out = base(torch.tensor([ids]), output_hidden_states=True)
        want = out.hidden_states[layer][0, -1].numpy().astype(np.float64)
        # float32 kernels round differently by batch shape and CPU: the tolerance is relative
        # to the vector's norm, so an element near zero is held to the same absolute error.
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-5 * np.linalg.norm(want))


def test_run_geometry_on_the_micro_zoo(zoo, tmp_path, monkeypatch):
    config, workdir = zoo
    junk = [{"input": "xylophonequark", "output": "zork"}, {"input": "qqqz", "output": "jjjx"}]
    config = config.copy_and_resolve_references()
    config.geometry.relation_files = (_write(tmp_path, "junk.json", junk),)
    results = geometry.run_geometry(config, workdir)
    out = wd.stage_dir(workdir, "geometry")
    for name in ("results.json", "cdf.png", "loss_vs_size.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.json")) as f:
        text = f.read()
    assert json.loads(text) == results and "NaN" not in text and "Infinity" not in text
    assert list(results["pairs"]) == [f"h{s}" for s in config.zoo.sizes]
    assert results["largest"] == "h32" and results["n_boot"] == config.geometry.n_boot
    depths = dict(zip(config.zoo.sizes, config.zoo.depths))
    for p in results["pairs"].values():
        assert p["n_layers"] == depths[p["size"]] and p["layer"] == p["n_layers"] // 2
        assert p["d_model"] == p["size"]
        assert list(p["relations"]) == [*RELATIONS, "junk"]
        junk = p["relations"]["junk"]  # recorded, not fatal: other relations still count
        assert (junk["kept"], junk["total"]) == (0, 2) and "none of its 2" in junk["skipped"]
        for rel in ("plural", "successor", "past_tense", "antonym"):  # words, not digits
            assert "models" in p["relations"][rel], rel
        for rel, r in p["relations"].items():
            if "skipped" in r:
                assert r["kept"] < 2 and "single tokens" in r["skipped"]
                continue
            assert 2 <= r["kept"] <= r["total"] == len(RELATIONS[rel])
            for role in ("base", "distilled", "sham"):  # the micro zoo builds a sham per size
                assert list(r["models"][role]) == ["2", "5", "64"]
                for s in r["models"][role].values():
                    vals = [s["mean"], s["median"], s["control_mean"], s["control_median"]]
                    assert np.isfinite(vals).all() and 0 < min(vals) and max(vals) <= 2
                    assert s["n_pairs"] == r["kept"]  # max_pairs is not reached
                    assert s["n_components_used"] <= min(2 * r["kept"], p["d_model"])
            assert list(r["by_k"]) == ["2", "5", "64"]
            for by_k in r["by_k"].values():
                cis = [by_k["base_minus_distilled"], *by_k["true_minus_shuffled"].values()]
                assert list(by_k["true_minus_shuffled"]) == ["base", "distilled", "sham"]
                for ci in cis:
                    assert ci["n"] == r["kept"] and np.isfinite(ci["mean"])
                    assert (ci["lo"] is None) == (r["kept"] < 3) == ("reason" in ci)
                    assert ci["lo"] is None or ci["lo"] <= ci["hi"]
        scored = [r for r in p["relations"].values() if "by_k" in r]
        for k in ("2", "5", "64"):
            pooled, counts = p["pooled"][k], p["counts"][k]
            assert pooled["n_relations"] == sum(r["kept"] >= 3 for r in scored)
            gaps = [r["by_k"][k]["base_minus_distilled"]["mean"] for r in scored if r["kept"] >= 3]
            assert abs(pooled["base_minus_distilled"]["mean"] - np.mean(gaps)) <= 1e-12
            gains = []
            for r in (r for r in scored if r["kept"] >= 3):
                m = {role: r["models"][role][k] for role in ("base", "distilled")}
                gains.append(
                    m["distilled"]["mean"] - m["distilled"]["control_mean"]
                    - (m["base"]["mean"] - m["base"]["control_mean"])
                )  # fmt: skip
                assert abs(r["by_k"][k]["structure_gain"]["mean"] - gains[-1]) <= 1e-12
            gain = pooled["structure_gain"]
            assert abs(gain["mean"] - np.mean(gains)) <= 1e-12 and gain["lo"] <= gain["hi"]
            assert counts["n_relations"] == len(scored) == sum(counts["distilled_vs_base"].values())
    sizes = [p["size"] for p in results["pairs"].values()]
    params = [p["n_params"]["base"] for p in results["pairs"].values()]
    assert params == sorted(params) and params[0] > 1000
    assert all(
        p["n_params"]["base"] == p["n_params"]["distilled"] for p in results["pairs"].values()
    )
    trend = results["trend"]
    assert trend == results["trend_by_k"]["2"] and list(results["trend_by_k"]) == ["2", "5", "64"]
    assert trend["pairs"] == list(results["pairs"]) and trend["sizes"] == sizes
    assert trend["params"] == [float(p) for p in params] and trend["slope"]["n"] == 2
    gains = [p["pooled"]["2"]["structure_gain"]["mean"] for p in results["pairs"].values()]
    want = (gains[1] - gains[0]) / np.log10(params[1] / params[0])  # 2 sizes: the chord
    assert trend["structure_gain"] == gains and abs(trend["slope"]["mean"] - want) < 1e-12
    line = geometry.summarize(results)
    assert results["summary"] == line and "junk@h32" in line
    assert "structure gain per decade of parameters over 2 sizes: " in line
    assert "distilled below base (CI excludes 0) on " in line and "relations at h16" in line

    # Complete and with the same key: reused without touching a model.
    def fail(*args):
        raise AssertionError("recomputed")

    monkeypatch.setattr(study, "study_pair", fail)
    assert geometry.run_geometry(config, workdir) == results
    changed = config.copy_and_resolve_references()
    changed.geometry.n_shuffles = 2
    with pytest.raises(AssertionError, match="recomputed"):
        geometry.run_geometry(changed, workdir)


def test_run_geometry_needs_a_built_zoo(tmp_path):
    with pytest.raises(FileNotFoundError, match="build it first"):
        geometry.run_geometry(micro_zoo_config(), str(tmp_path))
    with pytest.raises(ValueError, match="plot_n_components"):
        c = micro_zoo_config()
        c.geometry.plot_n_components = 3
        geometry.run_geometry(c, str(tmp_path))
