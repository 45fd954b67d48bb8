"""Latents chosen by what they do: firing before a category's markers, against the same token
elsewhere.

A row *predicts* category C when the next token begins one of C's markers (read at the
configs' `fire_offset`, -1 = the lexicon's "predict" anchor). In the zoo, as in R1 traces,
almost every such row is "." or "?": ranking latents by raw firing there selects
sentence-boundary latents, whatever the next sentence is. Specificity compares, token by
token, a latent's firing on C's predicting rows with its firing on the rows holding the same
token that do NOT predict C ("." followed by anything else):

    specificity_i = sum_t w_t [ P(f_i > 0 | t, predicts C) - P(f_i > 0 | t, does not) ]

w_t: the share of C's predicting rows whose token is t, over the tokens that also occur as
controls. Its standard error treats rows as independent Bernoulli draws (a screen, not a
finding): se_i^2 = sum_t w_t^2 [p1 (1 - p1) / n1 + p0 (1 - p0) / n0]. A latent *passes* when
specificity - 1.96 se > 0. Everything is counted on the store's TRAINING shards: effects are
then measured on held-out documents.

Control rows of a frequent token are subsampled (`max_controls` per token, seeded and
uniform): the control firing rate stays unbiased and the pass over the store stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xcoder_jax.errors import ConfigError
from xcoder_jax.lexicon import anchor_lag, marker_read_rows, stretches
from xcoder_jax.stage_inputs import to_float32

Z = 1.959963984540054  # two-sided 95%


@dataclass
class Screened:
    """Per-latent scores with standard errors and the 95% screen both selection rules use.

    score, se: [C, h] (categories x latents).
    """

    score: np.ndarray
    se: np.ndarray

    def passes(self) -> np.ndarray:
        """[C, h] bool: the lower end of the 95% interval is above 0."""
        return self.score - Z * self.se > 0

    def qualifying(self) -> np.ndarray:
        """[C, h]: the score where a latent passes, 0 elsewhere (ranks for `select_latents`)."""
        return np.where(self.passes(), self.score, 0.0)


@dataclass
class Specificity(Screened):
    """Per category (rows, in `categories` order) and latent (columns, h).

    score, se: [C, h] token-matched firing difference and its standard error; marker_rate
    [C, h]: firing share on the predicting rows; n_marker, n_control: [C] rows compared;
    coverage [C]: share of predicting rows whose token has controls; preceding: {category:
    [[token id, rows]] most common tokens of the predicting rows}.
    """

    categories: list[str]
    marker_rate: np.ndarray
    n_marker: np.ndarray
    n_control: np.ndarray
    coverage: np.ndarray
    preceding: dict[str, list[list[int]]]


def _predict_rows(store, shards, *, forms, categories, anchor):
    """Per listed shard k: (k, its tokens, {category: rows of k where an occurrence is read}).

    An occurrence belongs to the shard holding its anchor row, so each is read once: shard k
    is read with the last tokens of shard k - 1 before it (a marker that began there) and the
    first tokens of shard k + 1 after it (a marker predicted at k's last rows), each only when
    that shard is listed too.
    """
    seqs = [ids for c in categories for ids in forms[c]]
    back = max([len(ids) - 1 for ids in seqs] + [0])
    look = max([anchor_lag(anchor, len(ids)) for ids in seqs] + [0])
    listed = set(shards)

    def part(k, rows):
        return np.asarray(store.shard_tokens(k)[rows], np.int64), store.shard_index(k)[rows]

    for k in shards:
        tokens, index = part(k, slice(None))
        parts = [(tokens, index)]
        carry = 0
        if k - 1 in listed and back:
            before = part(k - 1, slice(-back, None))
            carry = len(before[0])
            parts.insert(0, before)
        if k + 1 in listed and look:
            parts.append(part(k + 1, slice(0, look)))
        tokens_all = np.concatenate([p[0] for p in parts])
        docs = stretches(np.concatenate([np.asarray(p[1], np.int64).reshape(-1, 2) for p in parts]))
        rows = {}
        for c in categories:
            r = marker_read_rows(tokens_all, docs, forms[c], anchor, carry)
            rows[c] = r[(r >= 0) & (r < len(tokens))]
        yield k, tokens, rows


def specificity_scores(
    store, xcoder, forms: dict, categories, anchor, shards, *, max_controls: int = 2000, seed=0
) -> Specificity:
    """Token-matched specificity of every latent for every category (see the module).

    store: the activation store; xcoder: `ExportedCrosscoder` (raw units); forms: {category:
    [marker token-id sequences]}; anchor: where an occurrence is read (`fire_offset`);
    shards: the TRAINING shards.
    """
    categories = list(categories)
    try:
        anchor_lag(anchor, 1)
    except ValueError as e:
        raise ConfigError(f"fire_offset: {e}") from e
    read = lambda: _predict_rows(store, shards, forms=forms, categories=categories, anchor=anchor)
    vocab = 1 + max(int(store.shard_tokens(k).max(initial=0)) for k in shards)
    vocab = max(vocab, 1 + max((i for c in categories for f in forms[c] for i in f), default=0))
    total, pred_tok = _token_counts(read(), categories, vocab)
    used = np.flatnonzero(pred_tok.sum(0))  # tokens that precede some marker
    counts = _firing_by_token(
        read(), store, xcoder, categories, used=used, vocab=vocab, total=total,
        max_controls=max_controls, seed=seed,
    )  # fmt: skip
    score, var, coverage = _scores(*counts)
    pf, _, pred_n, ctrl_n = counts
    n_marker = pred_n.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n_marker[:, None] > 0, pf.sum(1) / np.maximum(n_marker, 1)[:, None], 0.0)
    preceding = {}
    for c, cat in enumerate(categories):
        order = np.argsort(-pred_tok[c], kind="stable")[:5]
        preceding[cat] = [[int(t), int(pred_tok[c, t])] for t in order if pred_tok[c, t] > 0]
    return Specificity(
        categories=categories,
        score=score,
        se=np.sqrt(var),
        marker_rate=rate,
        n_marker=n_marker.astype(np.int64),
        n_control=ctrl_n.sum(1).astype(np.int64),
        coverage=coverage,
        preceding=preceding,
    )


def _token_counts(shard_rows, categories, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 (token ids only): each token's rows [vocab] and each category's predicting
    rows by token [C, vocab], from `_predict_rows`."""
    total = np.zeros(vocab, np.int64)
    pred_tok = np.zeros((len(categories), vocab), np.int64)
    for _, tokens, rows in shard_rows:
        total += np.bincount(tokens, minlength=vocab)
        for c, cat in enumerate(categories):
            pred_tok[c] += np.bincount(tokens[rows[cat]], minlength=vocab)
    return total, pred_tok


def _firing_by_token(shard_rows, store, xcoder, categories, *, used, vocab, total,
                     max_controls, seed):  # fmt: skip
    """Pass 2: encodes the predicting rows and the sampled control rows of the same tokens.

    Returns (pred_fire, ctrl_fire [C, tokens, h] firing counts, pred_n, ctrl_n [C, tokens]
    rows) over the `used` tokens, in their order."""
    n_cat = len(categories)
    slot = np.full(vocab, -1, np.int64)
    slot[used] = np.arange(len(used))
    keep_p = np.minimum(1.0, max_controls / np.maximum(total, 1))  # control sampling rate
    h, k_tok = xcoder.n_latents, len(used)
    pred_fire = torch.zeros(n_cat, k_tok, h, dtype=torch.float64)
    ctrl_fire = torch.zeros(n_cat, k_tok, h, dtype=torch.float64)
    pred_n = np.zeros((n_cat, k_tok))
    ctrl_n = np.zeros((n_cat, k_tok))
    for k, tokens, rows in shard_rows:
        rng = np.random.default_rng([seed, k])
        sampled = (slot[tokens] >= 0) & (rng.random(len(tokens)) < keep_p[tokens])
        is_pred = np.zeros((n_cat, len(tokens)), bool)
        for c, cat in enumerate(categories):
            is_pred[c, rows[cat]] = True
        need = np.flatnonzero(sampled | is_pred.any(0))
        if not len(need):
            continue
        x = torch.from_numpy(to_float32(store.shard_rows(k, need)))
        with torch.no_grad():
            fire = (xcoder.encode_t(x.to(xcoder.W_dec.device)) > 0).T.double().cpu()  # [r, h]
        tok = slot[tokens[need]]
        for c in range(n_cat):
            for target, n_acc, mask in (
                (pred_fire, pred_n, is_pred[c, need]),
                (ctrl_fire, ctrl_n, sampled[need] & ~is_pred[c, need]),
            ):
                sel = np.flatnonzero(mask & (tok >= 0))
                if len(sel):
                    onehot = torch.zeros(k_tok, len(sel), dtype=torch.float64)
                    onehot[tok[sel], torch.arange(len(sel))] = 1.0
                    target[c] += onehot @ fire[sel]
                    n_acc[c] += np.bincount(tok[sel], minlength=k_tok)
    return pred_fire.numpy(), ctrl_fire.numpy(), pred_n, ctrl_n


def _scores(pf, cf, pred_n, ctrl_n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, variance [C, h], coverage [C]) from the counts of `_firing_by_token`."""
    n_cat, h = pf.shape[0], pf.shape[2]
    score = np.zeros((n_cat, h))
    var = np.zeros((n_cat, h))
    coverage = np.zeros(n_cat)
    for c in range(n_cat):
        ok = (pred_n[c] > 0) & (ctrl_n[c] > 0)
        if not ok.any():
            continue
        w = pred_n[c, ok] / pred_n[c, ok].sum()
        p1 = pf[c, ok] / pred_n[c, ok, None]
        p0 = cf[c, ok] / ctrl_n[c, ok, None]
        score[c] = w @ (p1 - p0)
        n1, n0 = pred_n[c, ok, None], ctrl_n[c, ok, None]
        var[c] = (w**2) @ (p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
        coverage[c] = pred_n[c, ok].sum() / max(pred_n[c].sum(), 1)
    return score, var, coverage
