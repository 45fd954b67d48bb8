"""Behavioural KL (analysis/kl.py): the half-step intervention against a forward pass built
by hand, and KL 0 / fraction closed 1 where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import CORPUS, make_tokenizer, random_export
from xcoder_jax import intervention
from xcoder_jax.analysis import kl, splice_ce
from xcoder_jax.documents import pad_documents

LAYER = 1


@pytest.fixture(scope="module")
def models(micro_pair):
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    return [load(micro_pair[r]).eval() for r in ("base", "distilled")]


@pytest.fixture(scope="module")
def docs():
    tok = make_tokenizer(CORPUS)
    return [np.asarray(tok(t)["input_ids"], np.int64) for t in CORPUS[:6]]


@pytest.fixture(scope="module")
def xcoder(models, tmp_path_factory):
    d = models[0].config.hidden_size
    path = tmp_path_factory.mktemp("kl_export")
    return random_export(path, d, 32, LAYER, scale=0.3, b_enc=0.1)


def _exact(xcoder, monkeypatch):
    """The export with an exact reconstruction: x_hat = x."""
    monkeypatch.setattr(xcoder, "reconstruct", lambda x: x.float().clone())
    return xcoder


@torch.no_grad()
def test_half_step_equals_a_hand_built_forward_pass(models, docs, xcoder):
    base, distilled = models
    ids, mask = pad_documents(docs[:3], 0)
    stored = intervention.stored_positions(ids, None, mask)
    latents = [1, 4, 9, 20]
    # By hand: the base model's block-L input (HF hidden states), both models' inputs encoded
    # with the export's tensors, the distilled-side rows of the set added at stored positions,
    # the distilled model run on with its block-L input replaced by a plain pre-hook.
    x_b = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER]
    x_d = distilled(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    x_d = x_d.hidden_states[LAYER]
    pre = x_b @ xcoder.W_enc[0] + x_d @ xcoder.W_enc[1] + xcoder.b_enc
    f = pre.relu()[..., latents]
    new = torch.where(stored[..., None], x_b + f @ xcoder.W_dec[latents, 1], x_d)

    def replace(module, args, kwargs):
        return (new, *args[1:]), kwargs

    handle = distilled.model.layers[LAYER].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        expected = distilled(input_ids=ids, attention_mask=mask).logits[stored]
    finally:
        handle.remove()
    step = kl.HalfStep(models, LAYER, ids, mask, None, base=0, distilled=1)
    got = step.half_step(xcoder.ablation_delta(step.x, latents, 1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    clean = distilled(input_ids=ids, attention_mask=mask).logits[stored]
    torch.testing.assert_close(step.target, clean, atol=1e-4, rtol=1e-4)
    assert (kl.kl_rows(step.target, got) > 1e-6).any()


def test_kl_is_zero_for_identical_models(models, docs, xcoder):
    # The base model continued in itself with nothing added: KL(base || base) = 0.
    out = kl.half_step_kl([models[0], models[0]], LAYER, docs, xcoder, latents=[], n_draws=0,
                          batch_size=4)  # fmt: skip
    assert out["kl_nothing"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert out["tokens"] == sum(len(d) - 1 for d in docs)  # every position but the first
    assert "reason" in out["sets"]["full_difference"]["fraction_closed"]  # nothing to close


def test_exact_reconstruction_splice_kl_zero_and_full_difference_closes_all(
    models, docs, xcoder, monkeypatch
):
    exact = _exact(xcoder, monkeypatch)
    sp = splice_ce(models, LAYER, docs, exact.reconstruct, batch_size=4, kl_docs=4, seed=1)
    for role in ("base", "distilled"):
        assert sp[role]["kl"]["mean"] == pytest.approx(0.0, abs=1e-7)
        assert sp[role]["kl_docs"] == 4
        assert sp[role]["kl"]["n"] == sum(len(d) - 1 for d in docs[:4])
    latents = [2, 3, 5, 7]
    out = kl.half_step_kl(models, LAYER, docs, exact, latents=latents, n_draws=2, seed=3,
                          batch_size=4)  # fmt: skip
    base_kl = out["kl_nothing"]
    assert base_kl["mean"] > 1e-3 and base_kl["lo"] <= base_kl["mean"] <= base_kl["hi"]
    full = out["sets"]["full_difference"]
    assert full["kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert full["fraction_closed"]["mean"] == pytest.approx(1.0, abs=1e-5)
    rand = out["sets"]["random_matched"]
    assert rand["draws"] == 2 and all(not set(r) & set(latents) for r in rand["latents"])
    diff = out["distilled_only_minus_random"]
    s_closed, r_closed = out["sets"]["distilled_only"]["fraction_closed"], rand["fraction_closed"]
    assert diff["fraction_closed"]["mean"] == pytest.approx(s_closed["mean"] - r_closed["mean"])


def test_splice_kl_is_positive_for_an_imperfect_reconstruction(models, docs, xcoder):
    sp = splice_ce(models, LAYER, docs, xcoder.reconstruct, batch_size=4, kl_docs=10)
    for role in ("base", "distilled"):
        c = sp[role]["kl"]
        assert c["mean"] > 0 and c["lo"] <= c["mean"] <= c["hi"]
        assert sp[role]["kl_docs"] == len(docs)


def test_random_sets_are_matched_on_activity():
    activity = np.array([0.0, 0.0, 10.0, 11.0, 100.0, 90.0, 0.0, 12.0, 95.0, 1000.0])
    sets, within = kl.matched_random_sets(activity, [0, 2, 4], n_draws=4, seed=0)
    assert len(sets) == 4 and within == [1.0] * 4
    for s in sets:
        assert len(s) == 3 and not {0, 2, 4} & set(s)
        a = sorted(activity[s])
        assert a[0] == 0.0 and 10 <= a[1] <= 12 and 90 <= a[2] <= 95
    assert sets == kl.matched_random_sets(activity, [0, 2, 4], n_draws=4, seed=0)[0]
    assert kl.matched_random_sets(activity, list(range(6)), 2, 0) == ([], [])


def test_ratio_ci_pairs_documents():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(10), 5)
    den = rng.uniform(1, 2, 50)
    c = kl.ratio_ci(0.5 * den, den, clusters)
    assert c["mean"] == pytest.approx(0.5) and c["lo"] == pytest.approx(0.5)
    assert c["hi"] == pytest.approx(0.5)
    noisy = kl.ratio_ci(0.5 * den + rng.normal(0, 0.1, (3, 50)), den, clusters)
    assert noisy["lo"] < noisy["mean"] < noisy["hi"]
    assert kl.ratio_ci(den, np.zeros(50), clusters)["mean"] is None


def test_ablation_half_step_of_category_sets(models, docs, xcoder):
    """The ablation's per-category half-step KL: a category's set gives what `half_step_kl`
    gives for the same set, the set of every latent closes what a hand-built pass says, the
    random sets have the set's size, and a category without a set says why."""
    from types import SimpleNamespace

    from xcoder_jax.ablation import half_step
    from xcoder_jax.activations.exclude import Exclusion

    nrn = xcoder.nrn("l1")
    min_nrn = float(np.median(nrn))  # half of the latents may be drawn
    config = SimpleNamespace(
        ablation=SimpleNamespace(kl_docs=4, batch_size=4, seed=3, min_nrn=min_nrn),
        analysis=SimpleNamespace(kl_random_draws=2, norm="l1"),
    )
    chosen = [2, 5, 7]
    head = lambda ids: {"headline": {"set": {"latents": [{"id": i} for i in ids]}}}
    cats = {"a": head(chosen), "every": head(range(xcoder.n_latents)),
            "none": {"headline": {"reason": "no latent passes"}}}  # fmt: skip
    doc_ids = [10, 11, 12, 13, 14, 15]
    out = half_step.half_step_entry(config, models, xcoder, docs, doc_ids, cats, pad_id=0,
                                    exclusion=Exclusion())  # fmt: skip
    assert out["documents"] == doc_ids[:4] and out["random_draws"] == 2
    ref = kl.half_step_kl(models, LAYER, docs[:4], xcoder, latents=chosen, n_draws=0, seed=3,
                          batch_size=4)  # fmt: skip
    a = out["categories"]["a"]
    assert a["n_latents"] == 3 and a["latents"] == chosen
    for key in ("kl", "fraction_closed"):
        want = ref["sets"]["distilled_only"][key]
        for end in ("mean", "lo", "hi"):
            assert a["set"][key][end] == pytest.approx(want[end], rel=1e-9)
    assert out["kl_nothing"]["mean"] == pytest.approx(ref["kl_nothing"]["mean"], rel=1e-9)
    assert a["random"]["draws"] == 2 and len(a["random"]["latents"]) == 2
    assert all(len(r) == 3 and not set(r) & set(chosen) for r in a["random"]["latents"])
    # Drawn from the latents a targeted set could hold: NRN above ablation.min_nrn.
    assert all(nrn[i] > min_nrn for r in a["random"]["latents"] for i in r)
    for part in ("set", "random", "minus_random"):
        for c in (a[part]["kl"], a[part]["fraction_closed"]):
            assert np.isfinite([c["mean"], c["lo"], c["hi"]]).all()
            assert c["lo"] <= c["mean"] <= c["hi"], (part, c)
    diff = a["set"]["fraction_closed"]["mean"] - a["random"]["fraction_closed"]["mean"]
    assert a["minus_random"]["fraction_closed"]["mean"] == pytest.approx(diff)
    # Every latent: x_base + the reconstruction difference without the decoder biases',
    # (x_hat_d - b_dec_d) - (x_hat_b - b_dec_b), by hand on one batch.
    ids, mask = pad_documents(docs[:4], 0)
    step = kl.HalfStep(models, LAYER, ids, mask, None, base=0, distilled=1)
    x_hat = xcoder.reconstruct(step.x)
    every = (x_hat[:, :, 1] - xcoder.b_dec[1]) - (x_hat[:, :, 0] - xcoder.b_dec[0])
    none_kl = kl.kl_rows(step.target, step.half_step(None))
    every_kl = kl.kl_rows(step.target, step.half_step(every))
    e = out["categories"]["every"]
    assert e["set"]["kl"]["mean"] == pytest.approx(every_kl.mean(), rel=1e-5)
    closed = 1 - every_kl.sum() / none_kl.sum()
    assert e["set"]["fraction_closed"]["mean"] == pytest.approx(closed, rel=1e-5, abs=1e-6)
    assert e["random"]["draws"] == 0 and "reason" in e["minus_random"]  # no other latent
    assert out["categories"]["none"] == {"n_latents": 0, "reason": "no latent passes"}
