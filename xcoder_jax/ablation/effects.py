"""What removing a latent set does to the markers' log-probabilities, against its controls.

`Measurer` holds the clean log-probabilities of both models at every measured occurrence
(all categories) and reads the change an intervention makes:

- "own": log p of the occurrence's own marker token (first token of the marker);
- "margin": that minus the log p of the most likely non-marker token (a marker can lose
  probability to another marker or to anything else; the margin says which);
- "categories": [C, n] log of the summed probability of each category's marker tokens, so a
  set's effect on every category's markers is read at the same positions (specificity);
- "others": log of the summed probability of the clean model's 5 most likely non-marker
  tokens: what the set does to the ordinary continuations there.

Log-probabilities, not raw logits: a logit's level (1-4 in one model, 10-11 in the other)
says nothing by itself, and its changes are not comparable across models.
"""

from __future__ import annotations

import numpy as np
import torch

from xcoder_jax import stats
from xcoder_jax.ablation import controls

N_OTHERS = 5


def _lse(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = a.max(axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis, keepdims=True))).squeeze(axis)


class Measurer:
    """Clean and intervened log-probabilities at the occurrences `where` [(doc, pos, token)].

    marker_ids: [M] every category's marker first tokens; cat_cols: {category: column
    indices into marker_ids}.
    """

    def __init__(self, probe, n_models: int, where, *, marker_ids, cat_cols: dict):
        self.probe, self.where = probe, where
        self.marker_ids = list(marker_ids)
        self.cat_cols = cat_cols
        own = {t: j for j, t in enumerate(self.marker_ids)}
        self.own_col = np.array([own[t] for _, _, t in where], np.int64)
        self.columns, self.clean = [], []
        for m in range(n_models):
            top = probe.top_others(m, where, self.marker_ids, N_OTHERS)
            cols = np.concatenate([np.tile(self.marker_ids, (len(where), 1)), top], 1)
            self.columns.append(cols)
            logp, best = probe.log_probs(m, where, cols, self.marker_ids)
            self.clean.append(self._summary(logp, best, self.own_col))
        self.f = probe.latent_acts(where)  # [n, h] clean latent activity

    def _summary(self, logp: np.ndarray, best: np.ndarray, own_col: np.ndarray) -> dict:
        n_m = len(self.marker_ids)
        own = logp[np.arange(len(logp)), own_col]
        return {
            "own": own,
            "margin": own - best,
            "categories": np.stack([_lse(logp[:, cols], 1) for cols in self.cat_cols.values()]),
            "others": _lse(logp[:, n_m:], 1),
        }

    def change(self, m: int, idx, latents, direction=None) -> dict:
        """{key: intervened - clean} at occurrences `idx` of model m (see the module)."""
        where = [self.where[i] for i in idx]
        logp, best = self.probe.log_probs(
            m, where, self.columns[m][idx], self.marker_ids, latents=latents, direction=direction
        )
        out = self._summary(logp, best, self.own_col[idx])
        return {k: out[k] - self.clean[m][k][..., idx] for k in out}


def unmeasured(n: int, reason: str) -> dict:
    """An interval dict without numbers, giving the reason (strict JSON, never NaN)."""
    return stats.percentile_ci(None, None, n, "not measured", reason)


def set_effects(meas: Measurer, m: int, idx, ids, *, nrn, dec_norms, ac, clusters, rng) -> dict:
    """Removing `ids` in model m at occurrences `idx`, against the dose-response of random
    sets and norm-matched random directions; each effect a mean change of the marker's
    log-probability with its 95% cluster-bootstrap CI. The keys ending in "_values" are
    per-occurrence arrays for the distilled - base comparison (not written out)."""
    boot = lambda v: stats.cluster_bootstrap_ci(v, clusters, seed=ac.seed)
    t = meas.change(m, idx, ids)
    out = {"targeted": boot(t["own"]), "targeted_margin": boot(t["margin"])}
    act = controls.activity(meas.f[idx], dec_norms)
    goal = float(act[ids].sum())
    pool = controls.active_pool(act, ids, nrn, ac.min_nrn)
    draws = controls.dose_draws(rng, act, goal, pool, levels=ac.dose_levels, n=ac.n_random)
    curve, achieved, values = [], [], []
    for level, sets in sorted(draws.items()):
        v = np.stack([meas.change(m, idx, s)["own"] for s in sets])  # [n_random, n]
        reached = float(np.mean([act[s].sum() for s in sets]))
        achieved.append(reached)
        values.append(v)
        curve.append({
            "level": level, "activity_ratio": reached / goal if goal > 0 else None,
            "mean_size": float(np.mean([len(s) for s in sets])),
            "distinct_draws": controls.distinct(sets), "effect": boot(v),
        })  # fmt: skip
    unreached = [float(lv) for lv in ac.dose_levels if float(lv) not in draws]
    out["dose_response"] = {"pool_size": len(pool), "curve": curve, "unreachable_levels": unreached}
    order = np.argsort(achieved)
    interp = None
    if values:
        interp = controls.interpolate(goal, np.asarray(achieved)[order], np.stack(values)[order])
    if interp is None:
        ratios = ", ".join(f"{a / goal:.2f}" for a in sorted(achieved)) or "none"
        side = (
            "all remove more than it (one pool latent outweighs the targeted set)"
            if achieved and min(achieved) > goal
            else f"levels {unreached} are beyond the {len(pool)} active pool latents"
        )
        why = (
            f"random sets reach {ratios} x the targeted set's activity, not both sides of "
            f"it: {side}"
        )
        out["random_at_matched"] = unmeasured(len(idx), why)
        out["targeted_minus_random"] = unmeasured(len(idx), why)
    else:
        out["random_at_matched"] = boot(interp)
        out["targeted_minus_random"] = boot(t["own"][None] - interp)
    out["targeted_minus_random_values"] = None if interp is None else t["own"][None] - interp
    d_model = meas.probe.xcoder.d_model
    directions = controls.random_directions(rng, d_model, ac.n_random)
    dv = np.stack([
        meas.change(m, idx, ids, torch.from_numpy(u).float())["own"] for u in directions
    ])  # fmt: skip
    out["random_direction"] = boot(dv)
    out["targeted_minus_direction"] = boot(t["own"][None] - dv)
    out["targeted_activity"] = goal
    return out
