"""Latent scaling (Minder et al. 2025): is an "exclusive" latent really absent from the other model?

The L1 crosscoder loss can shrink a decoder row to zero although the other model still
carries the concept (complete shrinkage), or split one concept into model-specific latents
(latent decoupling). Latent scaling checks this on data. Every base-only and every
distilled-only latent j is given an owner, the model whose decoder row is larger (the base
model for base-only latents, the distilled model for distilled-only ones), and its direction
u_j = W_dec[j, owner]. For each model m the scale

    beta_m = argmin_b sum_n || b f_j(x_n) u_j - y_{n,m} ||^2
           = sum_n f_j(x_n) <u_j, y_{n,m}> / (||u_j||^2 sum_n f_j(x_n)^2)

is fitted on held-out rows (rows where f_j = 0 add nothing; f_j is the latent's activation,
the same in raw and normalised units). Targets y are in NORMALISED units (the units of the
crosscoder, where NRN is measured too); x_hat_m is the crosscoder's full reconstruction:
  * "activation":     y = x_m - b_dec[m], the model's activation less the decoder bias;
  * "error":          y = x_m - x_hat_m + f_j W_dec[j, m], the reconstruction error with the
    latent's own contribution put back (what the rest of the dictionary leaves to it);
  * "reconstruction": y = x_hat_m - b_dec[m] = activation - error + f_j W_dec[j, m], what the
    dictionary reconstructs. The latent's own term is kept in both targets: without it the
    owner's reconstruction beta of a clean latent is 0 and the ratio below is undefined.

Two ratios, each the other model's beta over the owner's on the same target:
  * error ratio: near 1 when the other model carries the direction but no latent reconstructs
    it there (complete shrinkage), near 0 for a truly exclusive latent. Above
    `analysis.scaling_false_ratio` the latent is flagged as falsely exclusive;
  * reconstruction ratio: near 1 when other latents reconstruct the direction in the other
    model (latent decoupling), near 0 when nothing there does.

With dedicated latents (`xcoder_jax.exclusive`), exclusive by construction, both kinds are
fitted (the budget split between them) and each side is also reported for its structural
and its learned exclusives apart.
"""

from __future__ import annotations

import numpy as np
import torch

from xcoder_jax import stats

# Sides: (name, class index of `norms.classify`).
SIDES = (("base_only", 0), ("distilled_only", 2))
# An owner's beta below this (dimensionless: 1 means the owner's data carries the direction
# at the decoder row's own scale) leaves the ratio undefined rather than huge.
MIN_OWNER_BETA = 1e-6
TARGETS = (
    "beta_m: least-squares scale of f_j * u_j (u_j = the owner's decoder row, normalised "
    "units) fitted to model m's target on held-out rows. error target: x_m - x_hat_m + "
    "f_j W_dec[j, m]; reconstruction target: x_hat_m - b_dec[m]. error ratio = beta_other / "
    "beta_owner on the error target (near 1: complete shrinkage); reconstruction ratio = "
    "the same on the reconstruction target (near 1: latent decoupling); near 0: truly exclusive"
)


def fit_betas(f: np.ndarray, y: np.ndarray, u: np.ndarray) -> np.ndarray | None:
    """Closed-form betas for one latent. f: [n] activations; y: [n, n_models, d] targets;
    u: [d] direction (y and u in the same units). Returns [n_models], or None when the latent
    never fires or u is zero (no fit exists)."""
    f = np.asarray(f, np.float64)
    den = float(np.dot(u, u)) * float(np.sum(f * f))
    if not den > 0:
        return None
    return np.einsum("n,nmd,d->m", f, np.asarray(y, np.float64), np.asarray(u, np.float64)) / den


def _split(a: np.ndarray, b: np.ndarray, budget: int) -> tuple[int, int]:
    """How many of `a` and of `b` a budget takes: half each, what one leaves to the other."""
    n_a = min(len(a), max(budget // 2, budget - len(b)))
    return n_a, min(len(b), budget - n_a)


def select_latents(
    nrn: np.ndarray,
    classes: np.ndarray,
    max_latents: int,
    *,
    base: int,
    distilled: int,
    structural: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exclusive latents to fit and their owners: (ids [S] ascending, owner [S] model index).

    At most `max_latents` latents, the most extreme NRN of each side first. Half the budget
    is kept for each side (what one side leaves unused goes to the other), so a dictionary
    with many distilled-only latents still gets its base-only ones checked. `structural`
    ([n_latents] bool, the dedicated latents): a side's budget is split the same way between
    its learned and its structural exclusives (NRN 0 or 1, which would come first).
    """
    struct = np.zeros(len(nrn), bool) if structural is None else np.asarray(structural, bool)
    sides = []
    for _, k in SIDES:
        ids = np.flatnonzero(classes == k)
        ids = ids[np.argsort(-np.abs(nrn[ids] - 0.5), kind="stable")]
        sides.append((ids[~struct[ids]], ids[struct[ids]]))
    per_side = _split(*[np.concatenate(side) for side in sides], max_latents)
    chosen = []
    for (learned, dedicated), n in zip(sides, per_side):
        n_learned, n_dedicated = _split(learned, dedicated, n)
        chosen += [learned[:n_learned], dedicated[:n_dedicated]]
    ids = np.sort(np.concatenate(chosen)).astype(np.int64)
    # NRN = n_dist / (n_base + n_dist) > 0.5 exactly when the distilled row is the larger.
    owner = np.where(nrn[ids] > 0.5, distilled, base).astype(np.int64)
    return ids, owner


class LatentScaling:
    """Accumulates the sums of `fit_betas` for a set of latents while streaming.

    latents: [S] ids; owner: [S] model index whose decoder row is the direction;
    w_dec: [n_latents, n_models, d] and b_dec: [n_models, d] in NORMALISED units;
    scales: [n_models] (normalised = raw * scale).
    """

    def __init__(self, latents, owner, *, w_dec, b_dec, scales):
        self.latents = torch.as_tensor(np.asarray(latents, np.int64))
        owner = np.asarray(owner, np.int64)
        w = np.asarray(w_dec, np.float32)[np.asarray(latents, np.int64)]  # [S, m, d]
        self.u = torch.from_numpy(w[np.arange(len(owner)), owner].copy())  # [S, d]
        # <u_j, W_dec[j, m]>: the latent's own contribution, kept in the error target.
        self.self_dot = torch.from_numpy(np.einsum("sd,smd->sm", self.u.numpy(), w)).double()
        self.b_dec = torch.from_numpy(np.asarray(b_dec, np.float32))
        self.scales = torch.from_numpy(np.asarray(scales, np.float32))
        s, m = len(owner), w.shape[1]
        self.num_act = torch.zeros(s, m, dtype=torch.float64)
        self.num_rec = torch.zeros(s, m, dtype=torch.float64)
        self.sum_f2 = torch.zeros(s, dtype=torch.float64)
        self.n_rows = torch.zeros(s, dtype=torch.int64)

    def update(self, f_t: torch.Tensor, x_raw: torch.Tensor, x_hat_raw: torch.Tensor) -> None:
        """f_t: [n_latents, batch] activations; x_raw, x_hat_raw: [batch, n_models, d] raw."""
        if len(self.latents) == 0:
            return
        f = f_t[self.latents]  # [S, batch]
        x = x_raw * self.scales[None, :, None]
        x_hat = x_hat_raw * self.scales[None, :, None]
        for m in range(x.shape[1]):
            # <u_j, y_n,m> for every latent and row: [S, batch]
            proj_act = self.u @ (x[:, m] - self.b_dec[m]).T
            proj_rec = self.u @ (x_hat[:, m] - self.b_dec[m]).T
            self.num_act[:, m] += (f * proj_act).sum(1).double()
            self.num_rec[:, m] += (f * proj_rec).sum(1).double()
        self.sum_f2 += (f * f).sum(1).double()
        self.n_rows += (f > 0).sum(1)

    def result(self, min_rows: int = 1) -> dict[str, np.ndarray]:
        """Betas per target: "beta_activation", "beta_error", "beta_reconstruction" [S,
        n_models] float64, NaN where not fitted (internal only: `report` turns it into None);
        "rows": [S] held-out firing rows; "fitted": [S] bool, at least `min_rows` rows."""
        den = self.u.double().square().sum(1) * self.sum_f2  # [S]
        fitted = (self.n_rows >= max(1, min_rows)) & (den > 0)
        safe = torch.where(fitted, den, torch.ones_like(den))[:, None]
        # y_err = y_act - y_rec + f_j W_dec[j, m], summed against f_j u_j.
        num_err = self.num_act - self.num_rec + self.sum_f2[:, None] * self.self_dot
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        beta = lambda num: torch.where(fitted[:, None], num / safe, nan).numpy()
        return {
            "beta_activation": beta(self.num_act),
            "beta_error": beta(num_err),
            "beta_reconstruction": beta(self.num_rec),
            "rows": self.n_rows.numpy(),
            "fitted": fitted.numpy(),
        }


def ratios(betas: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """beta of the other model over the owner's [S] (two models). NaN where undefined: not
    fitted, or the owner's beta below MIN_OWNER_BETA (internal; `report` maps it to None)."""
    s = np.arange(len(owner))
    own = betas[s, owner]
    other = betas[s, 1 - np.asarray(owner)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(own) >= MIN_OWNER_BETA, other / own, np.nan)


def _quantiles(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"median": None, "p10": None, "p90": None, "n": 0, "reason": "no defined ratio"}
    q = np.quantile(finite, [0.1, 0.5, 0.9])
    return {"median": float(q[1]), "p10": float(q[0]), "p90": float(q[2]), "n": len(finite)}


def _clean(v, nd: int = 5):
    return round(float(v), nd) if np.isfinite(v) else None


def _figures(in_set: np.ndarray, ids, fits: dict, ratio: dict, false_ratio: float) -> dict:
    """summary["latent_scaling"]'s figures of one set of latents (`in_set` [n_latents] bool)
    among the fitted `ids` [S]."""
    sel = in_set[ids]
    err = ratio["error"][sel]
    n_flagged = int((err[np.isfinite(err)] > false_ratio).sum())
    return {
        "n_latents": int(in_set.sum()),
        "n_selected": int(sel.sum()),
        "n_fitted": int(fits["fitted"][sel].sum()),
        "n_false_exclusive": n_flagged,
        "share_false_exclusive": stats.proportion_ci(n_flagged, int(np.isfinite(err).sum())),
        "ratio_error": _quantiles(err),
        "ratio_reconstruction": _quantiles(ratio["reconstruction"][sel]),
    }


def report(
    ids: np.ndarray,
    owner: np.ndarray,
    classes: np.ndarray,
    fits: dict[str, np.ndarray],
    *,
    roles: dict[str, int],
    false_ratio: float,
    min_rows: int,
    structural: np.ndarray | None = None,
) -> tuple[dict[int, dict], dict]:
    """Per-latent lines for latents.jsonl and summary["latent_scaling"]; strict JSON (None
    with a "reason" where a value cannot be computed).

    ids, owner: [S] from `select_latents`; classes: [n_latents]; fits: `LatentScaling.result`;
    roles: {"base": model index, "distilled": model index}. Betas are listed in crosscoder
    model order. `structural` ([n_latents] bool, the dedicated latents), when any: each line
    says whether its latent is one, and each side's figures are also given for its
    "structural" and its "learned" exclusives apart.
    """
    struct = np.zeros(len(classes), bool) if structural is None else np.asarray(structural, bool)
    ratio = {t: ratios(fits[f"beta_{t}"], owner) for t in ("error", "reconstruction")}
    name_of = {v: k for k, v in roles.items()}
    side_of = {k: name for name, k in SIDES}
    lines = {}
    for j, i in enumerate(ids):
        fitted = bool(fits["fitted"][j])
        line = {
            "owner": name_of[int(owner[j])],
            "side": side_of.get(int(classes[i]), "shared"),
            "rows": int(fits["rows"][j]),
        }
        for t in ("activation", "error", "reconstruction"):
            line[f"beta_{t}"] = [_clean(v) for v in fits[f"beta_{t}"][j]] if fitted else None
        for t in ratio:
            line[f"ratio_{t}"] = _clean(ratio[t][j])
        err = line["ratio_error"]
        line["false_exclusive"] = None if err is None else bool(err > false_ratio)
        if not fitted:
            line["reason"] = f"fires on {line['rows']} held-out rows; a fit needs {min_rows}"
        elif err is None or line["ratio_reconstruction"] is None:
            bad = [t for t in ratio if line[f"ratio_{t}"] is None]
            line["reason"] = f"the owner's beta is ~0 on the {' and '.join(bad)} target"
        if struct.any():
            line["structural"] = bool(struct[i])
        lines[int(i)] = line
    summary = {"false_ratio": float(false_ratio), "targets": TARGETS}
    for name, k in SIDES:
        side = classes == k
        summary[name] = _figures(side, ids, fits, ratio, false_ratio)
        if struct.any():
            for part, mask in (("structural", side & struct), ("learned", side & ~struct)):
                summary[name][part] = _figures(mask, ids, fits, ratio, false_ratio)
    return lines, summary
