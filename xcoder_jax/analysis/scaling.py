"""Latent scaling (Minder et al. 2025): is an "exclusive" latent really absent from the other model?

The L1 crosscoder loss can shrink a decoder row to zero although the other model still
carries the concept (complete shrinkage), or split one concept into model-specific latents
(latent decoupling). Latent scaling checks this on data: for latent j with direction u_j (its
decoder row in the model that owns it), fit per model m the scale

    beta_m = argmin_b sum_n || b f_j(x_n) u_j - y_{n,m} ||^2
           = sum_n f_j(x_n) <u_j, y_{n,m}> / (||u_j||^2 sum_n f_j(x_n)^2)

on held-out rows (rows where f_j = 0 add nothing). Two targets y, in NORMALISED units (the
units of the crosscoder, where NRN is measured too):
  * "activation": y = x_m - b_dec[m], the model's activation less the decoder bias;
  * "error":      y = x_m - x_hat_m + f_j W_dec[j, m], the reconstruction error with the
    latent's own contribution put back (what the rest of the dictionary leaves to it).
Their difference is the "reconstruction" target (latent decoupling). The ratio of the other
model's beta to the owner's (beta_base / beta_distilled for a distilled-only latent) is near
0 for a truly exclusive latent and near 1 for a falsely exclusive one.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_betas(f: np.ndarray, y: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Closed-form betas for one latent. f: [n] activations; y: [n, n_models, d] targets;
    u: [d] direction. Returns [n_models] (nan when the latent never fires)."""
    f = np.asarray(f, np.float64)
    den = float(np.dot(u, u)) * float(np.sum(f * f))
    num = np.einsum("n,nmd,d->m", f, np.asarray(y, np.float64), np.asarray(u, np.float64))
    return num / den if den > 0 else np.full(y.shape[1], np.nan)


class LatentScaling:
    """Accumulates the sums of `fit_betas` for a set of latents while streaming.

    latents: [S] ids; owner: [S] model index whose decoder row is the direction;
    w_dec: [n_latents, n_models, d] and b_dec: [n_models, d] in NORMALISED units;
    scales: [n_models] (normalised = raw * scale).
    """

    def __init__(self, latents, owner, w_dec, b_dec, scales):
        self.latents = torch.as_tensor(np.asarray(latents, np.int64))
        owner = np.asarray(owner, np.int64)
        w = np.asarray(w_dec, np.float32)[np.asarray(latents, np.int64)]  # [S, m, d]
        self.u = torch.from_numpy(w[np.arange(len(owner)), owner].copy())  # [S, d]
        # <u_j, W_dec[j, m]>: the latent's own contribution to the error target.
        self.self_dot = torch.from_numpy(np.einsum("sd,smd->sm", self.u.numpy(), w))
        self.b_dec = torch.from_numpy(np.asarray(b_dec, np.float32))
        self.scales = torch.from_numpy(np.asarray(scales, np.float32))
        s, m = len(owner), w.shape[1]
        self.num_act = torch.zeros(s, m, dtype=torch.float64)
        self.num_err = torch.zeros(s, m, dtype=torch.float64)
        self.sum_f2 = torch.zeros(s, dtype=torch.float64)
        self.n_rows = torch.zeros(s, dtype=torch.int64)

    def update(self, f_t: torch.Tensor, x_raw: torch.Tensor, x_hat_raw: torch.Tensor) -> None:
        """f_t: [n_latents, batch] activations; x_raw, x_hat_raw: [batch, n_models, d] raw."""
        if len(self.latents) == 0:
            return
        f = f_t[self.latents]  # [S, batch]
        x = x_raw * self.scales[None, :, None]
        err = x - x_hat_raw * self.scales[None, :, None]
        f2 = (f * f).sum(1).double()
        for m in range(x.shape[1]):
            # <u_j, y_n,m> for every latent and row: [S, batch]
            proj_act = self.u @ (x[:, m] - self.b_dec[m]).T
            proj_err = self.u @ err[:, m].T
            self.num_act[:, m] += (f * proj_act).sum(1).double()
            self.num_err[:, m] += (f * proj_err).sum(1).double() + f2 * self.self_dot[:, m]
        self.sum_f2 += f2
        self.n_rows += (f > 0).sum(1)

    def result(self, min_rows: int = 1) -> dict[str, np.ndarray]:
        """Betas per target, "beta_activation" and "beta_error": [S, n_models] (nan with
        fewer than `min_rows` firing rows), and "rows": [S] firing rows."""
        den = (self.u.double().square().sum(1) * self.sum_f2)[:, None]
        ok = (self.n_rows >= max(1, min_rows))[:, None] & (den > 0)
        safe = torch.where(den > 0, den, torch.ones_like(den))
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "beta_activation": torch.where(ok, self.num_act / safe, nan).numpy(),
            "beta_error": torch.where(ok, self.num_err / safe, nan).numpy(),
            "rows": self.n_rows.numpy(),
        }


def ratios(betas: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """beta of the other model over beta of the owner [S] (two models; nan where undefined)."""
    s = np.arange(len(owner))
    own = betas[s, owner]
    other = betas[s, 1 - np.asarray(owner)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(own) > 1e-12, other / own, np.nan)


def summarise(ratio: np.ndarray, false_min: float) -> dict:
    """Counts and quantiles of ratios: `false_min` and above flags false exclusivity."""
    finite = ratio[np.isfinite(ratio)]
    if not len(finite):
        return {"n_fitted": 0}
    q = np.quantile(finite, [0.1, 0.5, 0.9])
    return {
        "n_fitted": len(finite),
        "median": float(q[1]),
        "p10": float(q[0]),
        "p90": float(q[2]),
        "n_false_exclusive": int((finite >= false_min).sum()),
        "share_false_exclusive": float((finite >= false_min).mean()),
    }
