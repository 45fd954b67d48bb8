"""Controls an ablation's targeted latent set is compared with: random latents at matched
activity (read off a dose-response curve) and a random direction of the same norm.

Removing latents that are silent where the effect is measured changes nothing, so a control
of uniformly drawn latents is close to 0 by construction and says little. Random latents
must remove as much of the reconstruction as the targeted set does:

- **Dose-response of random sets.** The pool is every non-targeted latent with NRN above the
  targeted set's cut that is active at the measured positions. At each level l (a multiple
  of the targeted set's activity), `n_random` sets are drawn: pool latents in a random order,
  added until their summed activity comes closest to l times the targeted set's. A level the
  whole pool cannot reach is not drawn (never the whole pool labelled "random"). The random
  effect at the targeted set's activity is interpolated linearly between the two reachable
  levels whose achieved activity brackets it; where none does, the control is reported as
  unreachable with the curve that was measured.
- **Norm-matched random direction.** At every position where the targeted set is removed, a
  random unit direction is subtracted instead, scaled to the length of what the targeted set
  removes there (`LogitProbe.log_probs(direction=...)`).

Activity of latent i in model m: sum over the measured positions of f_i(x) ||W_dec[i, m]||_2
(raw units): the length of what ablating i removes from model m's block-L input there. It is
computed on the held-out positions the effect is measured at (the targeted set itself is
chosen on training documents): matching is on how much each set removes there, never on the
effect.
"""

from __future__ import annotations

import numpy as np

DOSE = (
    "random non-targeted latents with NRN above the targeted set's cut, active at the measured "
    "(held-out) positions, added in random order until their summed activity (sum of f_i "
    "||W_dec[i, m]||) comes closest to a multiple (level) of the targeted set's; the random "
    "effect at the targeted set's activity is interpolated linearly between the bracketing "
    "levels; unreachable levels are not drawn"
)
DIRECTION = (
    "a random unit direction (Gaussian draw) subtracted at every position the targeted set is "
    "removed at, scaled there to the length of the targeted set's contribution"
)


def activity(f: np.ndarray, dec_norms: np.ndarray) -> np.ndarray:
    """Summed contribution length per latent: f [n, h] at the measured positions, dec_norms
    [h] (||W_dec[i, m]|| in raw units) -> [h]."""
    return np.asarray(f, np.float64).sum(0) * np.asarray(dec_norms, np.float64)


def active_pool(act: np.ndarray, targeted: np.ndarray, nrn: np.ndarray, min_nrn: float):
    """Ids of non-targeted latents with NRN > min_nrn that are active (act [h] > 0)."""
    ids = np.setdiff1d(np.flatnonzero((nrn > min_nrn) & (act > 0)), targeted)
    return ids.astype(np.int64)


def matched_draw(rng: np.random.Generator, act: np.ndarray, goal: float, pool: np.ndarray):
    """One random set (ids ascending) from `pool` whose summed activity `act` [h] comes
    closest to `goal`; None when the whole pool falls short of it (unreachable)."""
    order = rng.permutation(pool)
    if goal <= 0 or not len(order) or act[order].sum() < goal:
        return None
    cum = np.cumsum(act[order])
    k = int(np.searchsorted(cum, goal))  # first prefix reaching the goal
    closer = k == 0 or cum[k] - goal <= goal - cum[k - 1]
    return np.sort(order[: k + 1 if closer else k])


def dose_draws(rng, act, goal: float, pool, *, levels, n: int) -> dict[float, list[np.ndarray]]:
    """{level: n random sets at level * goal} for the reachable levels (see `matched_draw`)."""
    out = {}
    for level in levels:
        draws = [matched_draw(rng, act, float(level) * goal, pool) for _ in range(n)]
        if all(d is not None for d in draws):
            out[float(level)] = draws
    return out


def interpolation_weights(goal: float, achieved) -> tuple[int, int, float] | None:
    """(lower level index, upper level index, weight of the upper) that interpolate linearly
    at `goal` between levels of mean achieved activity `achieved` [L] (ascending); None when
    `goal` lies outside them. A goal equal to one level gives weight 0 or 1."""
    a = np.asarray(achieved, np.float64)
    if not len(a) or goal < a[0] or goal > a[-1]:
        return None
    hi = int(np.searchsorted(a, goal))
    if a[hi] == goal or hi == 0:
        return hi, hi, 0.0
    lo = hi - 1
    return lo, hi, float((goal - a[lo]) / (a[hi] - a[lo]))


def interpolate(goal: float, achieved, values: np.ndarray):
    """Random effect at `goal` from per-level effects.

    achieved: [L] mean achieved activity of each level (ascending); values: [L, r, n] the
    effect of draw r at each measured occurrence. Draw r of the lower level is paired with
    draw r of the upper one, so the result [r, n] keeps the draws as replicates for the
    bootstrap. None when `goal` is outside the achieved range.
    """
    w = interpolation_weights(goal, achieved)
    if w is None:
        return None
    lo, hi, t = w
    return (1.0 - t) * values[lo] + t * values[hi]


def random_directions(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    """[n, d] independent random unit vectors (Gaussian draws, normalised)."""
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def distinct(sets) -> int:
    """How many different sets a list of id arrays holds."""
    return len({tuple(np.asarray(s).tolist()) for s in sets})
