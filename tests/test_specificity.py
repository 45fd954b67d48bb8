"""Latent selection by what latents do: specificity against the same token elsewhere,
attribution to the marker's log-probability, quantiles over the latents that pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import random_export
from xcoder_jax import selection
from xcoder_jax.ablation import sets
from xcoder_jax.specificity import specificity_scores

DOT, WAIT, WORD, THUS = 1, 2, 3, 4


class _Store:
    """Token stream in shards cut at `cuts`, one document; activations are given per row."""

    def __init__(self, tokens, acts, cuts):
        self.tokens = np.asarray(tokens, np.int64)
        self.acts = np.asarray(acts, np.float32)[:, None, :]  # [rows, 1, h]
        self.bounds = [0, *cuts, len(tokens)]

    def _rows(self, k):
        return slice(self.bounds[k], self.bounds[k + 1])

    def shard_tokens(self, k):
        return self.tokens[self._rows(k)]

    def shard_index(self, k):
        rows = np.arange(len(self.tokens))[self._rows(k)]
        return np.stack([np.zeros_like(rows), rows], 1)

    def shard_rows(self, k, idx):
        return self.acts[self._rows(k)][idx]


class _Identity:
    """A crosscoder whose latent j is the activation's coordinate j."""

    def __init__(self, h):
        self.n_latents = h
        self.W_dec = torch.zeros(h, 1, 1)

    def encode_t(self, x):
        return x[:, 0, :].T


def _stream(n_sentences=400, seed=0):
    """Sentences "w w ." each followed by WAIT (30%) or WORD. Latent 0 fires on every ".",
    latent 1 only on a "." before WAIT, latent 2 on random rows, latent 3 on WAIT itself."""
    rng = np.random.default_rng(seed)
    tokens, acts = [], []
    for _ in range(n_sentences):
        nxt = WAIT if rng.random() < 0.3 else WORD
        for tok in (WORD, WORD, DOT, nxt):
            a = np.zeros(4)
            a[0] = tok == DOT
            a[2] = rng.random() < 0.3
            a[3] = tok == WAIT
            tokens.append(tok)
            acts.append(a)
        acts[-2][1] = nxt == WAIT  # the "." just appended predicts WAIT
    return np.array(tokens), np.array(acts)


@pytest.mark.parametrize("cuts", [[], [803], [402, 1203]])
def test_specificity_separates_marker_latents_from_sentence_boundary_latents(cuts):
    tokens, acts = _stream()
    spec = specificity_scores(
        _Store(tokens, acts, cuts), _Identity(4), {"self_reflection": [(WAIT,)]},
        ["self_reflection"], -1, range(len(cuts) + 1),
    )  # fmt: skip
    n_wait = int((tokens == WAIT).sum())
    assert spec.n_marker[0] == n_wait  # every occurrence once, across shard boundaries too
    assert spec.n_control[0] == int((tokens == DOT).sum()) - n_wait
    # Latent 0 fires on every ".": always before WAIT, but just as often elsewhere.
    np.testing.assert_allclose(spec.marker_rate[0, :2], [1.0, 1.0])
    np.testing.assert_allclose(spec.score[0], [0.0, 1.0, spec.score[0, 2], 0.0], atol=1e-12)
    assert abs(spec.score[0, 2]) < 0.15  # random firing: no specificity beyond noise
    assert spec.passes()[0].tolist() == [False, True, False, False]
    assert spec.preceding["self_reflection"] == [[DOT, n_wait]]


def test_specificity_matches_a_hand_computation_with_two_tokens():
    # Marker M=WAIT predicted by "." twice and by THUS once; controls: "." thrice, THUS once.
    tokens = [DOT, WAIT, DOT, WAIT, DOT, WORD, DOT, WORD, DOT, WORD, THUS, WAIT, THUS, WORD]
    fire = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # latent 0 at these rows
    acts = np.array(fire, np.float32)[:, None]
    spec = specificity_scores(
        _Store(tokens, acts, []), _Identity(1), {"c": [(WAIT,)]}, ["c"], -1, [0]
    )
    # "." : P(fire | predicts) = 1/2, P(fire | not) = 1/3; THUS: 1/1 vs 0/1; weights 2/3, 1/3.
    expected = 2 / 3 * (1 / 2 - 1 / 3) + 1 / 3 * (1 - 0)
    assert spec.score[0, 0] == pytest.approx(expected)
    var = (2 / 3) ** 2 * (0.25 / 2 + (1 / 3) * (2 / 3) / 3) + (1 / 3) ** 2 * 0.0
    assert spec.se[0, 0] == pytest.approx(np.sqrt(var))


def test_quantiles_are_taken_over_the_latents_that_pass():
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0])
    passes = score > 0.0
    nrn = np.array([0.9, 0.2, 0.8, 0.7, 0.6, 0.9, 0.9, 0.6, 0.7, 0.8, 0.9, 0.9])
    # 10 pass; 9 of them have NRN > 0.5: frac 0.5 keeps the best 5, frac 0.1 the best one.
    half = sets.targeted_latents(score, passes, nrn, frac=0.5, min_nrn=0.5).tolist()
    assert half == [0, 2, 3, 4, 5]
    assert sets.targeted_latents(score, passes, nrn, frac=0.1, min_nrn=0.5).tolist() == [0]
    assert sets.targeted_latents(score, passes, nrn, frac=0.2, min_nrn=0.5).tolist() == [0, 2]
    assert sets.pool_size(passes, nrn, 0.5) == 9
    assert not len(sets.targeted_latents(score, np.zeros(12, bool), nrn, frac=0.5, min_nrn=0.5))


def test_a_set_is_described_by_its_tokens_and_nrn():
    nrn = np.array([0.95, 0.6, 0.3])
    labels = {0: {"token": " Wait", "token_share": 0.8}, 1: {"token": ".", "token_share": 1.0}}
    d = selection.describe([0, 1], nrn, np.array([0.5, 0.2, 0.0]), distilled_min=0.9, labels=labels)
    assert d["n"] == 2 and d["n_distilled_only"] == 1
    assert d["nrn"]["min"] == 0.6 and d["nrn"]["max"] == 0.95
    assert d["top_tokens"] == [[" Wait", 1], [".", 1]]
    assert d["latents"][0] == {
        "id": 0, "nrn": 0.95, "score": 0.5, "top_token": " Wait", "token_share": 0.8
    }  # fmt: skip


def test_attribution_is_the_first_order_change_of_the_marker_log_prob(micro_pair, tmp_path):
    """a_i (one document, one occurrence) equals -d/de log p(marker) when e * f_i W_dec[i, m]
    is removed from block L's input at every stored position, by a central difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xcoder_jax import site
    from xcoder_jax import workdir as wd
    from xcoder_jax.activations.exclude import Exclusion
    from xcoder_jax.attribution import marker_attribution

    torch.manual_seed(0)
    models = [AutoModelForCausalLM.from_pretrained(micro_pair[r]).eval() for r in wd.ROLES]
    tok = AutoTokenizer.from_pretrained(micro_pair["base"])
    d, h, layer = models[0].config.hidden_size, 6, 1
    xcoder = random_export(tmp_path, d, h, layer, scale=0.5, b_enc=0.1)
    doc = np.asarray(tok("Tom has 3 apples. Wait, let me check.")["input_ids"], np.int64)
    wait = tuple(tok(" Wait", add_special_tokens=False)["input_ids"])
    exclusion = Exclusion(first=1)
    got = marker_attribution(models, list(wd.ROLES), xcoder, [doc], forms={"c": [wait]},
                             categories=["c"], exclusion=exclusion, batch_size=1,
                             pad_id=0)  # fmt: skip
    assert got.n_occurrences.tolist() == [1] and got.model == "distilled"

    ids = torch.from_numpy(doc)[None]
    replays = [site.SiteReplay.record(m, layer, ids) for m in models]
    x = torch.stack([r.hidden for r in replays], 2)  # [1, s, m, d]
    kept = torch.as_tensor(exclusion.keep(doc))[None, :, None]
    p = int(np.flatnonzero(doc == wait[0])[0]) - 1  # the row predicting " Wait"

    def logp(i, eps):
        contrib = xcoder.latent_acts(x, [i]) * xcoder.W_dec[i, 1]  # [1, s, d]
        hidden = replays[1].hidden - eps * torch.where(kept, contrib, 0.0)
        return torch.log_softmax(replays[1].logits(hidden, [0], [p]), -1)[0, wait[0]].item()

    eps = 1e-2  # float32 models: a central difference accurate to ~1e-4 here
    fd = [-(logp(i, eps) - logp(i, -eps)) / (2 * eps) for i in range(h)]
    np.testing.assert_allclose(got.score[0], fd, rtol=2e-2, atol=2e-4)
    assert np.abs(got.score).max() > 1e-3  # the check is not vacuous
