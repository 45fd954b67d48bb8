"""The parallelogram metric, relation loading and filtering, and the study on a micro zoo."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import micro_zoo_config
from xcoder_jax import geometry, site
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
    np.testing.assert_allclose(geometry.parallelogram_losses(scale * a, scale * b), want, 1e-10)


@pytest.mark.parametrize("n,k,chunk", [(2, 1, 1 << 20), (7, 3, 1 << 20), (25, 20, 13)])
def test_vectorised_loss_matches_reference_loop(n, k, chunk):
    a, b = _random_pairs(n, k, seed=n)
    got = geometry.parallelogram_losses(a, b, chunk=chunk)
    np.testing.assert_allclose(got, _slow_losses(a, b), rtol=1e-12)
    assert got.min() >= 0 and got.max() <= 2  # ||sum of 4 vectors|| <= 2 sqrt(sum of squares)


@pytest.mark.parametrize("n,d", [(6, 40), (10, 5)])  # rank limited by 2n, then by d
def test_pca_with_all_components_keeps_losses_of_centred_vectors(n, d):
    a, b = _random_pairs(n, d, seed=d)
    x = np.concatenate([a, b])
    xc = x - x.mean(axis=0)
    z = geometry.pca_coordinates(x, 10_000)
    assert z.shape == (2 * n, min(2 * n, d))
    want = geometry.parallelogram_losses(xc[:n], xc[n:])
    np.testing.assert_allclose(geometry.parallelogram_losses(z[:n], z[n:]), want, rtol=1e-9)
    scores = geometry.relation_scores(a, b, (2, 10_000), np.array([np.roll(np.arange(n), 1)]))
    assert scores["10000"]["n_components_used"] == min(2 * n, d)
    np.testing.assert_allclose(scores["10000"]["mean"], want.mean(), rtol=1e-9)
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
        np.testing.assert_allclose(row, out.hidden_states[layer][0, -1].numpy(), rtol=1e-5)


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
        assert json.load(f) == results
    assert list(results["pairs"]) == [f"h{s}" for s in config.zoo.sizes]
    for p in results["pairs"].values():
        assert p["layer"] == 1 and p["n_layers"] == 2 and p["d_model"] == p["size"]
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
            for role in ("base", "distilled"):
                assert list(r["models"][role]) == ["2", "5", "64"]
                for s in r["models"][role].values():
                    vals = [s["mean"], s["median"], s["control_mean"], s["control_median"]]
                    assert np.isfinite(vals).all() and 0 < min(vals) and max(vals) <= 2
                    assert s["n_pairs"] == r["kept"]  # max_pairs is not reached
                    assert s["n_components_used"] <= min(2 * r["kept"], p["d_model"])
    line = geometry.summarize(results)
    assert results["summary"] == line and "h16" in line and "junk@h32" in line

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
