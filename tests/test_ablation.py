"""The ablation experiment: random-set controls, held-out measurement, CIs, bad inputs."""

from __future__ import annotations

import contextlib
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import micro_pipeline_config, random_export, strict_loads
from tests.test_analysis import _record_split
from xcoder_jax import pipeline, steering
from xcoder_jax import workdir as wd
from xcoder_jax.ablation import (
    AblationError,
    LogitProbe,
    controls,
    marker_positions,
    run_ablation,
    summarize_ablation,
)
from xcoder_jax.ablation.report import half_step_rows
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.documents import pad_documents
from xcoder_jax.errors import ConfigError

# --- Latent selection and controls ----------------------------------------------------------


def test_marker_positions_point_before_the_marker():
    docs = [np.array([5, 1, 7, 9, 7]), np.array([7, 2])]
    assert marker_positions(docs, [(7,)], Exclusion(first=1)) == [(0, 1, 7), (0, 3, 7)]
    # Excluded positions are never measured: the first two, and every token 9.
    assert marker_positions(docs, [(7,)], Exclusion(2, (9,))) == []
    assert marker_positions(docs, [(7,)], Exclusion(0)) == [(0, 1, 7), (0, 3, 7)]


def test_activity_is_summed_activation_times_decoder_norm():
    f = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.5]])
    np.testing.assert_allclose(controls.activity(f, [2.0, 5.0, 0.5]), [8.0, 0.0, 1.25])


def test_active_pool_is_active_distilled_leaning_and_not_targeted():
    act = np.array([4.0, 1.0, 3.0, 2.0, 0.0, 2.0])
    nrn = np.array([0.9, 0.8, 0.7, 0.2, 0.9, 0.6])
    assert controls.active_pool(act, np.array([0]), nrn, 0.5).tolist() == [1, 2, 5]


def test_matched_draws_are_random_and_come_closest_to_the_goal():
    act = np.concatenate([[10.0], np.arange(1.0, 13.0)])  # latent 0 targeted
    pool = np.arange(1, 13)
    rng = np.random.default_rng(0)
    draws = [controls.matched_draw(rng, act, 10.0, pool) for _ in range(20)]
    for s in draws:
        assert 0 not in s
        # The draw stops at whichever prefix of its random order is closer to the goal, so it
        # lands within half the largest pool activity (12) of it.
        assert abs(act[s].sum() - 10.0) <= 6.0 + 1e-12
    assert controls.distinct(draws) > 10  # random draws, not one set repeated


def test_an_unreachable_level_is_not_drawn():
    act = np.array([10.0, 1.0, 2.0, 0.0])
    pool = np.array([1, 2])  # all of it: 3.0
    rng = np.random.default_rng(0)
    assert controls.matched_draw(rng, act, 10.0, pool) is None
    got = controls.dose_draws(rng, act, 4.0, pool, levels=(0.5, 1.0, 2.0), n=3)
    assert sorted(got) == [0.5]  # 2.0 reachable; 4.0 and 8.0 are not
    assert all(act[s].sum() <= 3.0 for s in got[0.5])


def test_dose_response_interpolation_matches_a_hand_computation():
    values = np.array([[[1.0, 2.0]], [[3.0, 6.0]], [[5.0, 7.0]]])  # [L=3, r=1, n=2]
    achieved = [2.0, 4.0, 8.0]
    # goal 5: between levels 1 and 2, weight (5 - 4) / (8 - 4) = 0.25 on the upper one.
    np.testing.assert_allclose(controls.interpolate(5.0, achieved, values), [[3.5, 6.25]])
    np.testing.assert_allclose(controls.interpolate(4.0, achieved, values), [[3.0, 6.0]])
    np.testing.assert_allclose(controls.interpolate(2.0, achieved, values), [[1.0, 2.0]])
    assert controls.interpolate(9.0, achieved, values) is None  # never extrapolated
    assert controls.interpolate(1.0, achieved, values) is None


def test_random_directions_are_unit_and_distinct():
    u = controls.random_directions(np.random.default_rng(0), 16, 4)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
    assert np.abs(u @ u.T - np.eye(4)).max() < 0.99  # no two draws the same


# --- The stage on a micro pair ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ablation_run"))
    c = micro_pipeline_config()
    c.train.eval_shards = 3  # enough held-out documents to hold markers
    a = c.ablation
    a.fracs, a.n_random, a.n_docs, a.batch_size = (0.5, 0.1), 3, 8, 8
    a.headline_frac = 0.1
    pipeline.run(c, workdir)
    return c, workdir, run_ablation(c, workdir)


def _expand(ranges):
    return {d for lo, hi in ranges for d in range(lo, hi + 1)}


def test_selection_and_measurement_documents_are_disjoint(run):
    config, workdir, res = run
    store = ActivationStore(wd.activations_dir(workdir))
    n = len(store.shards)
    heldout = list(range(n - config.train.eval_shards, n))
    assert res["measurement"]["shards"] == heldout
    assert res["selection"]["shards"] == list(range(n - config.train.eval_shards))
    selected = _expand(res["selection"]["documents"])
    trained = {int(d) for k in res["selection"]["shards"] for d in store.shard_index(k)[:, 0]}
    assert selected == trained
    measured = set(res["measurement"]["documents"])
    assert measured and not measured & selected
    held = {int(d) for k in heldout for d in store.shard_index(k)[:, 0]}
    assert measured <= held


def _rows(res, rule="specificity"):
    return [r for e in res["categories"].values() for r in e["rules"][rule]["by_frac"]]


def test_every_effect_has_a_ci_and_the_difference_is_consistent(run):
    _, _, res = run
    rows = [r for r in _rows(res) if r["set"]["n"] and "reason" not in r]
    assert rows, "no category had a targeted set on the micro pair"
    computed = 0
    for row in rows:
        for role in res["roles"]:
            e = row[role]
            for key in ("targeted", "random_direction", "targeted_minus_direction"):
                ci = e[key]
                if ci["lo"] is None:  # e.g. every occurrence in one document
                    assert ci["reason"] and ci["mean"] is not None, (key, ci)
                else:
                    computed += 1
                    assert ci["lo"] <= ci["mean"] <= ci["hi"], (key, ci)
            diff = e["targeted"]["mean"] - e["random_direction"]["mean"]
            assert e["targeted_minus_direction"]["mean"] == pytest.approx(diff, abs=1e-9)
            if e["random_at_matched"]["mean"] is None:  # unreachable: said so, with the curve
                assert "not both sides" in e["random_at_matched"]["reason"]
            else:
                diff = e["targeted"]["mean"] - e["random_at_matched"]["mean"]
                assert e["targeted_minus_random"]["mean"] == pytest.approx(diff, abs=1e-9)
            for point in e["dose_response"]["curve"]:
                assert point["distinct_draws"] >= 1 and point["activity_ratio"] > 0
        assert "distilled_minus_base" in row
    assert computed, "no interval could be computed on the micro pair"


def test_results_name_each_set_and_its_headline(run):
    _, _, res = run
    for cat, entry in res["categories"].items():
        head = entry["headline"]
        assert head["rule"] == "specificity" and head["frac"] == 0.1
        for rule in ("specificity", "attribution"):
            block = entry["rules"][rule]
            n_pool = block["pool"]["n_pool"]
            for row in block["by_frac"]:
                want = min(n_pool, max(1, int(np.ceil(row["frac"] * n_pool)))) if n_pool else 0
                assert row["set"]["n"] == want == len(row["set"]["latents"]), (cat, rule, row)
                assert all(lat["nrn"] > 0.5 for lat in row["set"]["latents"])
        if "matrix" in head:
            assert set(head["matrix"]["distilled"]) == set(res["categories"])


def test_results_are_strict_json(run):
    _, workdir, _ = run
    with open(os.path.join(wd.stage_dir(workdir, "ablation"), "results.json")) as f:
        strict_loads(f.read())


def test_half_step_kl_of_every_headline_set(run):
    """Each category's headline set: the KL it closes, its activity-matched random sets of
    the same size and the paired difference, on measured documents it was not selected on."""
    _, _, res = run
    half = res["half_step_kl"]
    assert set(half["categories"]) == set(res["categories"])
    used, selected = set(half["documents"]), _expand(res["selection"]["documents"])
    assert used and used <= set(res["measurement"]["documents"]) and not used & selected
    computed = 0
    for cat, e in half["categories"].items():
        ids = sorted(lat["id"] for lat in res["categories"][cat]["headline"]["set"]["latents"])
        assert e["n_latents"] == len(ids)
        if not ids:
            assert e["reason"]
            continue
        assert e["latents"] == ids and e["random"]["draws"] == half["random_draws"] > 0
        assert all(len(r) == len(ids) and not set(r) & set(ids) for r in e["random"]["latents"])
        for part in ("set", "random", "minus_random"):
            for key in ("kl", "fraction_closed"):
                c = e[part][key]
                assert np.isfinite(c["mean"]), (cat, part, key, c)
                if c["lo"] is not None:
                    computed += 1
                    assert c["lo"] <= c["mean"] <= c["hi"], (cat, part, key, c)
    assert computed, "no half-step interval could be computed on the micro pair"
    assert len(half_step_rows(res)) == len(res["categories"])


def test_rerun_skips(run):
    config, workdir, _ = run
    path = os.path.join(wd.stage_dir(workdir, "ablation"), "results.json")
    before = os.path.getmtime(path)
    run_ablation(config, workdir)
    assert os.path.getmtime(path) == before


def test_an_empty_targeted_set_is_null_with_a_reason(run):
    """Last: it replaces the run's results (other tests read the first ones)."""
    config, workdir, _ = run
    c = config.copy_and_resolve_references()
    c.ablation.min_nrn = 1.0  # no NRN exceeds 1: nothing is targeted
    res = run_ablation(c, workdir)
    rows = _rows(res) + _rows(res, "attribution")
    assert rows and all(r["set"]["n"] == 0 and "NRN > 1.0" in r["reason"] for r in rows)
    assert all(role not in r for r in rows for role in res["roles"])
    assert all(e["n_latents"] == 0 for e in res["half_step_kl"]["categories"].values())
    assert "below 0 (95% CI) in 0/0" in summarize_ablation(res)


def test_no_heldout_documents_is_a_clear_error(run, tmp_path):
    config, workdir, _ = run
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("ablation", "checkpoints"))
    _record_split(copy, 0, [])  # trained without held-out shards
    c = config.copy_and_resolve_references()
    c.train.eval_shards = 0
    with pytest.raises(AblationError, match="no held-out shards"):
        run_ablation(c, copy)


def test_a_split_other_than_trainings_is_refused(run, tmp_path):
    """Measured on the held-out shards training recorded: another train.eval_shards is
    refused with one line before any output is touched."""
    config, workdir, _ = run
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    n, k = len(ActivationStore(wd.activations_dir(copy)).shards), config.train.eval_shards
    _record_split(copy, k, list(range(n - k, n)))
    c = config.copy_and_resolve_references()
    c.train.eval_shards = k - 1
    results = os.path.join(wd.stage_dir(copy, "ablation"), "results.json")
    before = os.path.getmtime(results)
    with pytest.raises(ConfigError, match=f"trained with train.eval_shards = {k}") as e:
        run_ablation(c, copy)
    assert "\n" not in str(e.value) and os.path.getmtime(results) == before


# --- The logit probe against the hook-based ablation ----------------------------------------


def _exclusion(tok, exclude_special: bool) -> Exclusion:
    """The store's exclusion under `extract.exclude_special` (position 0 excluded)."""
    extract = SimpleNamespace(exclude_first=1, exclude_special=exclude_special, exclude_tokens=())
    return Exclusion.from_config(extract, tok)


@pytest.mark.parametrize("exclude_special", [False, True])
def test_logit_probe_equals_the_model_under_the_ablation_hook(
    micro_pair, tmp_path, exclude_special
):
    """The probe reruns blocks L.. from a recorded input; it must give the log-probabilities
    of the HF model's own forward pass with `hooks.ablate` installed, the hook and the probe
    intervening at the same positions: where the store would hold a row (with special tokens
    excluded, not at the end-of-text token inside a document)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xcoder_jax import site

    models = [AutoModelForCausalLM.from_pretrained(micro_pair[r]).eval() for r in wd.ROLES]
    tok = AutoTokenizer.from_pretrained(micro_pair["base"])
    d, h, layer = models[0].config.hidden_size, 8, 1
    xcoder = random_export(tmp_path, d, h, layer, scale=0.3)
    texts = ["Question: Tom has 3 apples.<|endoftext|> Wait, let me check.",
             "Thus the answer is 4.<|endoftext|>But no"]  # fmt: skip
    docs = [np.asarray(tok(t)["input_ids"], np.int64) for t in texts]
    exclusion = _exclusion(tok, exclude_special)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert all(eot in doc[1:] for doc in docs) and (eot in exclusion.token_ids) == exclude_special
    where = [(0, 3, 7), (0, len(docs[0]) - 1, 11), (1, 2, 5)]  # (doc, position, token)
    probe = LogitProbe(models, xcoder, docs, batch_size=2, pad_id=0, exclusion=exclusion)
    ids, mask = pad_documents(docs, pad_id=0)
    columns = [[t] for _, _, t in where]
    masked = [7, 11]  # left out of the best other token
    latents = [0, 3, 5]
    for target in (0, 1):
        # The same positions, the same numbers: the block-L input the hook gives the model is
        # the probe's.
        (_, _, replays, x, kept) = probe.batches[0]
        want_hidden = probe._hidden(target, replays, x, kept, latents=latents, direction=None)
        box = {}

        def capture(hidden, box=box):  # after the hook's subtraction: what block L receives
            box["hidden"] = hidden.clone()

        hook = steering.ablate(models, target, xcoder, latents, input_ids=ids,
                               attention_mask=mask, exclusion=exclusion)  # fmt: skip
        with hook as delta, site.block_input_hook(models[target], layer, capture):
            with torch.no_grad():
                models[target](input_ids=ids, attention_mask=mask)
        changed = (box["hidden"] != replays[target].hidden).any(-1)
        assert torch.equal(changed, kept & (delta != 0).any(-1))
        torch.testing.assert_close(box["hidden"], want_hidden, rtol=0, atol=1e-6)
        special = torch.isin(ids, torch.tensor([eot])) & mask.bool()
        special[:, 0] = False
        # Special tokens inside the documents where the latents are active: an intervention
        # at every position but the first would change them.
        assert (delta[special] != 0).any()
        assert changed[special].any() != exclude_special  # left alone when excluded
        for ablated in ([], latents):
            got, best = probe.log_probs(target, where, columns, masked, latents=ablated)
            hook = steering.ablate(models, target, xcoder, ablated, input_ids=ids,
                                   attention_mask=mask, exclusion=exclusion)  # fmt: skip
            with hook if ablated else contextlib.nullcontext():  # []: the clean model
                with torch.no_grad():
                    full = models[target](input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(full.float(), -1)
            want = np.array([float(logp[dd, p, t]) for dd, p, t in where])
            np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            logp[..., masked] = -torch.inf
            want_best = np.array([float(logp[dd, p].max()) for dd, p, _ in where])
            np.testing.assert_allclose(
                best, want_best, rtol=1e-4, atol=1e-4 * np.abs(want_best).max()
            )
    clean = probe.log_probs(1, where, columns, masked)[0]
    ablated = probe.log_probs(1, where, columns, masked, latents=latents)[0]
    assert np.abs(clean - ablated).max() > 1e-3  # the ablation does change them
