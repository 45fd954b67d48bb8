"""Random latent sets that an ablation's targeted set is compared with.

Removing latents that are silent where the effect is measured changes nothing, so a control
of latents drawn uniformly from all latents is close to 0 by construction and says little.
The matched control removes a comparable part of the reconstruction instead: random
latents from the same pool as the targeted ones (NRN above the same cut, not targeted),
added in random order until their summed activity at the measured positions matches the
targeted set's. Where the targeted latents are the only distilled-leaning ones active at
those positions (common: they were chosen for firing there), that pool cannot match them;
the pool then widens to every non-targeted latent, and the results name the pool used.
The uniform control (|S| latents drawn uniformly from the non-targeted ones) is kept beside
it, labelled as such.

Activity of latent i in model m: sum over the measured positions of f_i(x) ||W_dec[i, m]||_2
(raw units): the length of what ablating i removes from model m's block-L input there. The
matched sets are therefore drawn on the held-out positions the effect is measured at (the
targeted set itself is chosen on training documents): matching is on how much each set
removes there, never on the effect.
"""

from __future__ import annotations

import numpy as np

MATCHED = (
    "random non-targeted latents from `matched_pool`, added in random order until their summed "
    "activity at the measured (held-out) positions (sum of f_i ||W_dec[i, m]||) comes closest "
    "to the targeted set's there"
)
POOLS = {
    "nrn": "non-targeted latents with NRN above the targeted set's cut",
    "all": "every non-targeted latent (the NRN pool's active latents fall short of the "
    "targeted set's activity)",
}
UNIFORM = "as many latents as targeted, drawn uniformly from all non-targeted latents"


def activity(f: np.ndarray, dec_norms: np.ndarray) -> np.ndarray:
    """Summed contribution length per latent: f [n, h] at the measured positions, dec_norms
    [h] (||W_dec[i, m]|| in raw units) -> [h]."""
    return np.asarray(f, np.float64).sum(0) * np.asarray(dec_norms, np.float64)


def matched_pool(
    act: np.ndarray, targeted: np.ndarray, nrn: np.ndarray, min_nrn: float
) -> tuple[np.ndarray, str]:
    """(pool ids, its key in POOLS): the NRN pool when its activity `act` [h] can reach the
    targeted set's, else every non-targeted latent."""
    leaning = np.setdiff1d(np.flatnonzero(nrn > min_nrn), targeted)
    if act[leaning].sum() >= act[targeted].sum():
        return leaning, "nrn"
    return np.setdiff1d(np.arange(len(act)), targeted), "all"


def matched_draw(
    rng: np.random.Generator, act: np.ndarray, targeted: np.ndarray, pool: np.ndarray
) -> np.ndarray:
    """One matched random set (ids ascending) from `pool` (targeted ids excluded).

    Latents of the pool that are active at the measured positions are taken in a random
    order until their summed activity `act` [h] is closest to the targeted set's; when the
    whole active pool falls short, all of it is taken.
    """
    goal = float(act[targeted].sum())
    pool = np.setdiff1d(pool, targeted)
    order = rng.permutation(pool[act[pool] > 0])
    if not len(order) or goal <= 0:
        return np.zeros(0, np.int64)
    cum = np.cumsum(act[order])
    k = int(np.searchsorted(cum, goal))  # first prefix reaching the goal
    if k >= len(order):
        return np.sort(order)
    closer = k == 0 or cum[k] - goal <= goal - cum[k - 1]
    return np.sort(order[: k + 1 if closer else k])


def uniform_draw(rng: np.random.Generator, n_latents: int, targeted: np.ndarray) -> np.ndarray:
    """|targeted| latents drawn uniformly without replacement from the non-targeted ones."""
    rest = np.setdiff1d(np.arange(n_latents), targeted)
    return np.sort(rng.choice(rest, min(len(targeted), len(rest)), replace=False))
