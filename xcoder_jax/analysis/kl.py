"""Behavioural KL: whether the crosscoder's latents carry the difference between the models.

Splice-in CE (`splice`) says how well a reconstruction predicts tokens; these figures say how
close an intervention brings one model's next-token distributions to another's, on the same
held-out documents, at the positions the store keeps (`intervention.stored_positions`:
excluded positions and padding keep the running model's own value and are not scored). With
P the reference model's and Q the intervened model's next-token distribution at a position,

    KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))         (nats, float32 log-softmax)

averaged over the stored positions of the documents, with a 95% cluster bootstrap over
documents (`stats.cluster_bootstrap_ci`, seeded by the config's seed).

Splice KL (computed in `splice.splice_ce`): KL(model m || model m with x_hat_m spliced in at
block L), for each model; 0 for an exact reconstruction.

Half-step KL (`half_step_kl`; "halfway interventions", Minder et al. 2025): the BASE model
runs to block L, a vector is added to its block-L input, and the DISTILLED model's blocks
L.. continue from there. With x = (x_base, x_distilled) both models' block-L inputs on the
same tokens and f = f(x) as the crosscoder encodes, the block-L input of the distilled
model's upper half is

    h_S    = x_base + sum_{i in S} f_i(x) (W_dec[i, distilled] - W_dec[i, base])   (set S)
    h_full = x_base + (x_hat_distilled - x_hat_base)    (the full difference: h_S over
             every latent, plus the decoder biases' difference)
    h_0    = x_base                                                    (nothing added)

and KL(distilled || half-step with S) is reported with the fraction of the base-to-distilled
KL it closes,

    closed(S) = 1 - KL(distilled || h_S) / KL(distilled || h_0)

a ratio of means over positions (its interval from the same bootstrap of documents). The sets:
the distilled-only latents (NRN > analysis.distilled_only_min), the full difference, and
`analysis.kl_random_draws` random sets of the same size matched on activity (each
distilled-only latent paired with an unused other latent whose total activation on these
documents is within a factor `MATCH_FACTOR`, else the nearest one; seeded draws), the control
that could show the same effect. The distilled-only set minus the random sets is paired by
document (the random draws resampled with the documents). The ablation stage evaluates each
category's targeted set likewise on its held-out documents (`ablation.half_step`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from xcoder_jax import intervention, site
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.documents import pad_documents
from xcoder_jax.interval_dict import no_interval
from xcoder_jax.stats import N_BOOT, cluster_bootstrap_ci, percentile_ci

MATCH_FACTOR = 2.0  # a random latent's total activation within this factor of its partner's
CHUNK = 1024  # positions whose log-softmax is taken at once


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> np.ndarray:
    """KL(P || Q) per row of [n, vocab] logits, float32 log-softmax, as float64 [n]."""
    out = []
    for lo in range(0, len(p_logits), CHUNK):
        lp = torch.log_softmax(p_logits[lo : lo + CHUNK].float(), -1)
        lq = torch.log_softmax(q_logits[lo : lo + CHUNK].float(), -1)
        out.append((lp.exp() * (lp - lq)).sum(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


class HalfStep:
    """One batch: the base model run to block L, the distilled model's blocks L.. rerun
    (`site.SiteReplay`) from a changed block-L input at the stored positions.

    x: [batch, seq, m, d] both models' block-L inputs (float32, crosscoder order); rows,
    positions: the stored positions; target: the distilled model's own logits there.
    """

    @torch.no_grad()
    def __init__(self, models, layer, ids, mask, exclusion, base: int, distilled: int):
        self.base, self.distilled = base, distilled
        self.stored = intervention.stored_positions(ids, exclusion, mask)
        self.rows, self.positions = self.stored.nonzero(as_tuple=True)
        self.replay = site.SiteReplay.record(models[distilled], layer, ids, mask)
        x = [None] * len(models)
        x[base] = site.forward_to_site(models[base], layer, ids, mask)
        x[distilled] = self.replay.hidden
        self.x = torch.stack([v.float() for v in x], dim=2)
        self.target = self.logits(self.x[:, :, distilled], None)

    @torch.no_grad()
    def logits(self, start: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """Logits at the stored positions with the distilled model's block-L input set to
        `start` + `delta` ([batch, seq, d] raw; None adds nothing) there."""
        new = start if delta is None else start + delta.to(start.device)
        hidden = torch.where(self.stored[..., None], new.to(self.replay.hidden.dtype),
                             self.replay.hidden)  # fmt: skip
        return self.replay.logits(hidden, self.rows, self.positions)

    def half_step(self, delta: torch.Tensor | None) -> torch.Tensor:
        """Logits of x_base + delta continued in the distilled model."""
        return self.logits(self.x[:, :, self.base], delta)


def _batches(docs, batch_size: int, pad_id: int, device):
    for lo in range(0, len(docs), batch_size):
        yield lo, *pad_documents(docs[lo : lo + batch_size], pad_id, device)


@torch.no_grad()
def latent_activity(models, layer, docs, xcoder, *, batch_size, pad_id, exclusion) -> np.ndarray:
    """Total activation f_i(x) of every latent over the stored positions of `docs`: [h]."""
    device = next(models[0].parameters()).device
    total = torch.zeros(xcoder.n_latents, dtype=torch.float64)
    for _, ids, mask in _batches(docs, batch_size, pad_id, device):
        stored = intervention.stored_positions(ids, exclusion, mask)
        x = torch.stack([site.forward_to_site(m, layer, ids, mask) for m in models], dim=2)
        total += xcoder.encode_t(x[stored].float()).sum(1).double().cpu()
    return total.numpy()


def set_difference(xcoder, x: torch.Tensor, latents, base: int, distilled: int) -> torch.Tensor:
    """S's share of the reconstruction difference, x [..., m, d] raw -> [..., d] raw: for a
    distilled-only latent its distilled-side contribution; a latent both models use is not
    counted twice (x_base already holds its base-side part)."""
    return xcoder.ablation_delta(x, latents, distilled) - xcoder.ablation_delta(x, latents, base)


def matched_random_sets(activity, chosen, n_draws: int, seed: int, factor=MATCH_FACTOR, pool=None):
    """`n_draws` random latent sets of len(chosen), disjoint from `chosen`, matched on
    `activity` latent by latent (module docstring); [] when too few other latents.
    `pool`: the ids the draws come from (default every latent), e.g. the latents eligible
    for the chosen set, so that the control differs from it only by chance.

    Returns (sets, within): the sets (sorted id lists) and, per draw, the share of its latents
    within `factor` of their partner's activity."""
    chosen = np.asarray(sorted(int(i) for i in chosen), np.int64)
    pool = np.arange(len(activity)) if pool is None else np.asarray(pool, np.int64)
    pool = np.setdiff1d(pool, chosen)
    if len(chosen) == 0 or len(pool) < len(chosen):
        return [], []
    a = np.asarray(activity, np.float64)
    eps = 1e-3 * (a[a > 0].mean() if (a > 0).any() else 1.0)
    log_a = np.log(a + eps)
    sets, within = [], []
    for draw in range(n_draws):
        rng = np.random.default_rng([seed, draw])
        free = np.ones(len(pool), bool)
        picked, close = [], 0
        for i in rng.permutation(chosen):
            dist = np.where(free, np.abs(log_a[pool] - log_a[i]), np.inf)
            near = np.flatnonzero(dist <= math.log(factor))
            k = rng.choice(near) if len(near) else int(np.argmin(dist))
            close += bool(len(near))
            free[k] = False
            picked.append(int(pool[k]))
        sets.append(sorted(picked))
        within.append(close / len(chosen))
    return sets, within


@torch.no_grad()
def half_step_kl(
    models: Sequence,
    layer: int,
    docs: list[np.ndarray],
    xcoder,
    *,
    latents: Sequence[int],
    n_draws: int,
    seed: int = 0,
    batch_size: int = 8,
    pad_id: int = 0,
    roles: Sequence[str] = ("base", "distilled"),
    exclusion: Exclusion | None = None,
) -> dict:
    """summary["half_step"]: the half-step KL of the sets of the module docstring.

    models: the HF pair in crosscoder order; docs: whole token ids; xcoder: the export
    (`ExportedCrosscoder`, on the models' device); latents: the distilled-only set."""
    exclusion = exclusion or Exclusion()
    kw = dict(batch_size=batch_size, pad_id=pad_id, exclusion=exclusion)
    latents = sorted(int(i) for i in latents)
    activity = latent_activity(models, layer, docs, xcoder, **kw) if latents else None
    draws, within = matched_random_sets(activity, latents, n_draws, seed) if latents else ([], [])
    sets = {"nothing": [], "distilled_only": latents}
    sets.update({f"random_{k}": r for k, r in enumerate(draws)})
    v, cl = set_values(models, layer, docs, xcoder, sets, roles=roles, full=True, **kw)
    out = _summary(v, cl, seed, n_latents=len(latents), n_draws=len(draws))
    out.update(docs=len(docs), tokens=len(cl))
    if draws:
        rand = out["sets"]["random_matched"]
        rand.update(latents=draws, within_factor=within, match_factor=MATCH_FACTOR)
        rand["activity_ratio"] = [float(activity[r].sum() / max(activity[latents].sum(), 1e-30))
                                  for r in draws]  # fmt: skip
    return out


@torch.no_grad()
def set_values(
    models, layer, docs, xcoder, sets: dict, *, batch_size, pad_id, exclusion, roles, full=False
) -> tuple[dict, np.ndarray]:
    """Per stored position, KL(distilled || half-step) with each of `sets` ({name: latent
    ids}; [] adds nothing) and, when `full`, "full_difference": ({name: [n]}, the index into
    `docs` of each position's document [n])."""
    base, dist = list(roles).index("base"), list(roles).index("distilled")
    device = next(models[0].parameters()).device
    values = {name: [] for name in (*sets, *(["full_difference"] if full else []))}
    clusters = []
    for lo, ids, mask in _batches(docs, batch_size, pad_id, device):
        step = HalfStep(models, layer, ids, mask, exclusion, base, dist)
        clusters.append(lo + step.rows.cpu().numpy())
        for name, ids_s in sets.items():
            delta = set_difference(xcoder, step.x, ids_s, base, dist) if len(ids_s) else None
            values[name].append(kl_rows(step.target, step.half_step(delta)))
        if full:
            x_hat = xcoder.reconstruct(step.x)
            delta = x_hat[:, :, dist] - x_hat[:, :, base]
            values["full_difference"].append(kl_rows(step.target, step.half_step(delta)))
    v = {k: np.concatenate(x) if x else np.zeros(0) for k, x in values.items()}
    return v, np.concatenate(clusters) if clusters else np.zeros(0, np.int64)


def set_against_random(s, r, none, clusters, seed: int = 0) -> tuple:
    """(set, random, set minus random): the KL and fraction closed of a latent set (s [n], the
    KL per position with it added), of its random sets (r [draws, n]; None: no draws, then
    the last two are None) and the set minus them, paired by document (the draws resampled
    with the documents). none [n]: the KL with nothing added; clusters [n]: documents."""
    ci = lambda vals: cluster_bootstrap_ci(vals, clusters, seed=seed)
    closed = lambda vals: ratio_ci(none - vals, none, clusters, seed=seed)
    one = {"kl": ci(s), "fraction_closed": closed(s)}
    if r is None:
        return one, None, None
    diff = {
        "kl": ci(s[None] - r),
        "fraction_closed": ratio_ci(r - s[None], none, clusters, seed=seed),
    }
    return one, {"kl": ci(r), "fraction_closed": closed(r)}, diff


def _summary(v: dict, cl: np.ndarray, seed: int, *, n_latents: int, n_draws: int) -> dict:
    """The KL and fraction-closed intervals of every set, and distilled-only minus random."""
    none = v["nothing"]
    ci = lambda vals: cluster_bootstrap_ci(vals, cl, seed=seed)
    closed = lambda vals: ratio_ci(none - vals, none, cl, seed=seed)
    sets = {"full_difference": {"kl": ci(v["full_difference"]),
                                "fraction_closed": closed(v["full_difference"])}}  # fmt: skip
    out = {"kl_nothing": ci(none), "sets": sets, "seed": seed}
    if n_latents == 0:
        reason = "no distilled-only latent"
        sets["distilled_only"] = sets["random_matched"] = {"n_latents": 0, "reason": reason}
        out["distilled_only_minus_random"] = {"reason": reason}
        return out
    r = np.stack([v[f"random_{k}"] for k in range(n_draws)]) if n_draws else None  # [draws, n]
    one, rand, diff = set_against_random(v["distilled_only"], r, none, cl, seed)
    sets["distilled_only"] = {"n_latents": n_latents, **one}
    if n_draws == 0:
        reason = "no random draws (analysis.kl_random_draws is 0, or too few other latents)"
        sets["random_matched"] = {"n_latents": n_latents, "draws": 0, "reason": reason}
        out["distilled_only_minus_random"] = {"reason": reason}
        return out
    sets["random_matched"] = {"n_latents": n_latents, "draws": n_draws, **rand}
    out["distilled_only_minus_random"] = diff
    return out


def ratio_ci(num, den, clusters, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """mean(num) / mean(den) with a percentile interval from resampling `clusters`.

    num: [n] per unit or [r, n] with r replicates per unit (resampled too, as in
    `stats.cluster_bootstrap_ci`); den: [n]; clusters: [n] (document ids)."""
    u = np.asarray(num, np.float64)
    u = u[None] if u.ndim == 1 else u
    den = np.asarray(den, np.float64)
    r, n = u.shape
    method = f"ratio of means; 95% percentile bootstrap ({n_boot} resamples of documents"
    method += ", and of the random draws)" if r > 1 else ")"
    if n == 0:
        return no_interval(0, method, "no values")
    if not (np.isfinite(u).all() and np.isfinite(den).all()):
        return no_interval(n, method, "non-finite values")
    if den.sum() <= 1e-12 * n:
        return no_interval(n, method, "the reference KL is 0: nothing to close")
    mean = float(u.sum() / (r * den.sum()))
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    if len(ids) < 2:
        return no_interval(n, method, "one document: no spread to estimate", mean)
    sums = np.zeros((r, len(ids)))
    np.add.at(sums.T, inverse, u.T)
    den_sums = np.bincount(inverse, weights=den, minlength=len(ids))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=n_boot)
    reps = rng.integers(0, r, size=(n_boot, r))
    num_b = np.stack([sums[k].sum(0) for k in reps]) / r  # [n_boot, documents]
    den_b = weights @ den_sums
    boot = (weights * num_b).sum(1) / np.where(den_b > 0, den_b, np.nan)
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return no_interval(n, method, "no resample with a nonzero reference KL", mean)
    return percentile_ci(mean, boot, n, method)
