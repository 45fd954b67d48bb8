"""The parallelogram metric: PCA per model and relation, the pairwise loss, and its control.

Everything is NumPy on small arrays (`[2n, d]` word vectors, n pairs of a relation).
"""

from __future__ import annotations

import numpy as np

QUANTILES = np.linspace(0.0, 1.0, 101)  # the CDF of the losses is stored at these levels


def pca_coordinates(x: np.ndarray, n_components: int) -> np.ndarray:
    """`[m, d] -> [m, k]`: the centred rows on their top k principal axes,
    k = min(n_components, m, d). Keeping every axis is a rotation of the centred rows."""
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:n_components].T


def parallelogram_losses(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """The loss of every two pairs i < j of `a, b: [n, k]` (pair i is (a_i, b_i)):
    `[n (n - 1) / 2]`, in the order of `np.triu_indices(n, 1)`. Dimensionless.

    ||a_i - b_i - a_j + b_j|| / sqrt(||a_i||^2 + ||b_i||^2 + ||a_j||^2 + ||b_j||^2), from
    explicit differences rather than a Gram matrix, so an exact parallelogram gives exactly 0;
    `chunk` bounds the `[chunk, k]` block of differences held at once.
    """
    offset = a - b  # [n, k]
    sq = (a * a).sum(1) + (b * b).sum(1)  # [n]
    i, j = np.triu_indices(len(a), 1)
    out = np.empty(len(i))
    for s in range(0, len(i), chunk):
        ii, jj = i[s : s + chunk], j[s : s + chunk]
        out[s : s + chunk] = np.linalg.norm(offset[ii] - offset[jj], axis=1) / np.sqrt(
            sq[ii] + sq[jj]
        )
    return out


def derangements(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`[count, n]` random permutations without a fixed point (n >= 2): in the control no
    word keeps its true partner."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    out = np.empty((count, n), np.int64)
    for c in range(count):
        while True:  # a uniform permutation is a derangement with probability ~1/e
            p = rng.permutation(n)
            if (p != np.arange(n)).all():
                break
        out[c] = p
    return out


def _cdf(losses: np.ndarray) -> list[float]:
    return [round(float(q), 6) for q in np.quantile(losses, QUANTILES)]


def relation_losses(a: np.ndarray, b: np.ndarray, n_components, shuffles: np.ndarray) -> dict:
    """Every loss of one relation in one model, per requested n_components (str keys).

    `a, b: [n, d]` are the raw vectors of the n pairs; `shuffles: [s, n]` permutations of
    the b rows for the control. The PCA is fitted once on the 2n vectors, so the control
    scores the same points, paired differently. Each entry: "n_pairs" (n), "losses"
    `[n (n - 1) / 2]` (order of `np.triu_indices(n, 1)`), "control" `[s, n (n - 1) / 2]`
    (pair i as (a_i, b_p(i))), "n_components_used" (capped at min(2n, d)) and
    "explained_variance" (the share of variance kept, 0..1).
    """
    x = np.concatenate([a, b])
    if not np.isfinite(x).all():  # a model emitting NaN/inf is broken, not a result
        raise ValueError("non-finite word vectors")
    n = len(a)
    z = pca_coordinates(x, max(n_components))
    var = z.var(axis=0)  # per component; the centred data's total when all are kept
    total = x.var(axis=0).sum()
    out = {}
    for k in n_components:
        za, zb = z[:n, :k], z[n:, :k]
        out[str(k)] = {
            "n_pairs": n,
            "losses": parallelogram_losses(za, zb),
            "control": np.stack([parallelogram_losses(za, zb[p]) for p in shuffles]),
            "n_components_used": int(za.shape[1]),
            "explained_variance": float(var[:k].sum() / total) if total > 0 else 1.0,
        }
    return out


def loss_scores(entry: dict) -> dict:
    """The stored statistics of one `relation_losses` entry: mean, median and CDF (at
    `QUANTILES`) of the n(n-1)/2 losses, the same of the control (pooled over shuffles),
    n_components_used, explained_variance; control_std is the spread of the control's mean
    across shuffles. Losses that are 0/0 (four words on the PCA centre) make every loss
    statistic None, with a "reason", so the results stay strict JSON."""
    losses, control = entry["losses"], entry["control"]
    out = {
        "n_pairs": entry["n_pairs"],
        "n_comparisons": len(losses),
        "n_components_used": entry["n_components_used"],
        "explained_variance": entry["explained_variance"],
    }
    if not (np.isfinite(losses).all() and np.isfinite(control).all()):
        none = ("mean", "median", "cdf", "control_mean", "control_std", "control_median")
        return {**dict.fromkeys(none), **out, "control_cdf": None, "reason": "non-finite losses"}
    return {
        "mean": float(losses.mean()),
        "median": float(np.median(losses)),
        **out,
        "cdf": _cdf(losses),
        "control_mean": float(control.mean()),
        "control_std": float(control.mean(axis=1).std()),  # of the mean, across shuffles
        "control_median": float(np.median(control)),
        "control_cdf": _cdf(control.ravel()),
    }


def relation_scores(a: np.ndarray, b: np.ndarray, n_components, shuffles: np.ndarray) -> dict:
    """Loss statistics of one relation in one model: `loss_scores` of every
    `relation_losses` entry (same arguments, same str keys)."""
    raw = relation_losses(a, b, n_components, shuffles)
    return {k: loss_scores(v) for k, v in raw.items()}
