"""Bootstrap intervals of parallelogram-loss differences, resampling word pairs.

The loss lives on every two pairs i < j of a relation, so one comparison involves two word
pairs and the comparisons are not independent: the units resampled are the word pairs
(indices into the relation). A resample draws n pair indices with replacement, with counts
c `[n]`, and its mean loss is the mean over the i < j combinations of the drawn list that
are two *different* pairs:

    mean(c) = sum_{i != j} c_i c_j L_ij / sum_{i != j} c_i c_j
            = c^T L c / ((sum c)^2 - sum c^2),

L `[n, n]` the symmetric loss matrix with a zero diagonal. Two draws of the same pair are
skipped rather than scored: their loss is 0 by construction (a pair against itself), which
would pull every resample towards a perfect parallelogram. A resample that draws a single
distinct pair has no comparison and is redrawn, so a relation needs at least `MIN_PAIRS`
pairs for an interval.

The PCA is fitted once on the full relation (`metric.relation_losses`) and not refitted per
resample: the interval treats the projection as fixed, the variability is the choice of
word pairs scored in it. The same counts score every model and the shuffled control, so
each interval is of a paired difference (base - distilled, true - shuffled), and the
difference of differences

    structure_gain = (true - shuffled)_distilled - (true - shuffled)_base

is one statistic of one resample too (negative: the distilled model's true pairings beat
its shuffled control by more than the base's do). With a sham model (the base fine-tuned
for as many steps as the distillation, on replay text and concise solutions but no reasoning
traces) the same difference against it,

    sham_gain = (true - shuffled)_distilled - (true - shuffled)_sham,

separates what the traces taught from what any further training does (`GAINS`). The mean
over pairs of pairs is linear in the losses, so a gain's replicate is exactly the difference
of the four resampled means. Intervals are two-sided percentile intervals
(`stats.percentile_ci`), as dicts in the form of `xcoder_jax.stats`:
{"mean", "lo", "hi", "n" (word pairs), "method"[, "reason" when lo/hi are None]}.
"""

from __future__ import annotations

import numpy as np

from xcoder_jax.stats import percentile_ci

# Each gain: the distilled model's true - shuffled gap minus that of this comparison model.
GAINS = {"structure_gain": "base", "sham_gain": "sham"}


def gain_formula(gain: str) -> str:
    """What a gain of `GAINS` measures, e.g. "(true - shuffled) distilled - base"."""
    return f"(true - shuffled) distilled - {GAINS[gain]}"


MIN_PAIRS = 3  # 2 pairs make one comparison: every resample would score the same value
METHOD = (
    "mean over pairs of word pairs; 95% percentile bootstrap ({} resamples of word pairs, "
    "paired, same-pair duplicates not compared)"
)
POOLED_METHOD = (
    "mean over relations of the per-relation mean; 95% percentile bootstrap ({} resamples "
    "of word pairs within each relation, paired)"
)


def pair_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`[n_boot, n]` float counts of n pair indices drawn with replacement, every row
    drawing at least 2 distinct pairs (rows that do not are redrawn; needs n >= 2)."""
    p = np.full(n, 1.0 / n)
    counts = rng.multinomial(n, p, size=n_boot)
    while (bad := (counts > 0).sum(1) < 2).any():  # probability n^(1-n): rare past n = 3
        counts[bad] = rng.multinomial(n, p, size=int(bad.sum()))
    return counts.astype(np.float64)


def resampled_means(losses: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`[n_boot]` mean of `losses: [n (n - 1) / 2]` (order of `np.triu_indices(n, 1)`)
    over the distinct-pair comparisons of each resample of `counts: [n_boot, n]`."""
    n = counts.shape[1]
    m = np.zeros((n, n))
    i, j = np.triu_indices(n, 1)
    m[i, j] = m[j, i] = losses
    num = ((counts @ m) * counts).sum(1)
    den = counts.sum(1) ** 2 - (counts * counts).sum(1)  # sum_{i != j} c_i c_j, > 0
    return num / den


def _replicate(diff: np.ndarray, counts: np.ndarray | None, n: int) -> dict:
    """{"mean", "boot" ([n_boot] or None), "n", "reason"} of one paired difference of
    losses `diff: [n (n - 1) / 2]`; counts None when the relation is too small."""
    if not np.isfinite(diff).all():
        return {"mean": None, "boot": None, "n": n, "reason": "non-finite losses"}
    mean = float(diff.mean())
    if counts is None:
        reason = f"{n} word pairs: fewer than {MIN_PAIRS}, nothing to resample"
        return {"mean": mean, "boot": None, "n": n, "reason": reason}
    return {"mean": mean, "boot": resampled_means(diff, counts), "n": n, "reason": None}


def relation_replicates(raw: dict[str, dict], n_boot: int, seed) -> dict:
    """Bootstrap replicates of one relation, per PCA size.

    raw: {"base": ..., "distilled": ...[, "sham": ...]}, each `metric.relation_losses` of
    the same word pairs and shuffles. seed: anything `np.random.default_rng` takes; one set
    of counts `[n_boot, n]` serves every PCA size, every model and the control (paired
    throughout). Returns {str(k): {"base_minus_distilled": rep, "true_minus_shuffled":
    {role: rep}, "structure_gain": rep[, "sham_gain": rep]}}, rep = {"mean", "boot", "n",
    "reason"}; "true_minus_shuffled" compares each pairing with the mean over shuffles of
    the same resampled pairs' words (pair i as (a_i, b_p(i))), each gain of `GAINS` (present
    when its comparison model is in raw) is the distilled model's minus that model's.
    """
    base, distilled = raw["base"], raw["distilled"]
    n = next(iter(base.values()))["n_pairs"]
    counts = pair_counts(n, n_boot, np.random.default_rng(seed)) if n >= MIN_PAIRS else None
    out = {}
    for k in base:
        gap = {role: r[k]["losses"] - r[k]["control"].mean(0) for role, r in raw.items()}
        out[k] = {
            "base_minus_distilled": _replicate(
                base[k]["losses"] - distilled[k]["losses"], counts, n
            ),
            "true_minus_shuffled": {role: _replicate(g, counts, n) for role, g in gap.items()},
        }
        for gain, other in GAINS.items():
            if other in gap:
                out[k][gain] = _replicate(gap["distilled"] - gap[other], counts, n)
    return out


def _map(tree: dict, f) -> dict:
    """Apply f to every replicate (a dict with "boot") of a nested dict, keep other keys."""
    if "boot" in tree:
        return f(tree)
    return {k: _map(v, f) if isinstance(v, dict) else v for k, v in tree.items()}


def _interval(rep: dict, method: str) -> dict:
    return percentile_ci(rep["mean"], rep["boot"], rep["n"], method, rep["reason"])


def intervals(replicates: dict, n_boot: int) -> dict:
    """`relation_replicates` with every replicate turned into its interval dict."""
    return _map(replicates, lambda rep: _interval(rep, METHOD.format(n_boot)))


def _leaves(tree: dict) -> list[dict]:
    if "boot" in tree:
        return [tree]
    return [x for v in tree.values() if isinstance(v, dict) for x in _leaves(v)]


def _pool(reps: list[dict]) -> dict:
    """One statistic over relations: mean of means, replicates averaged one by one."""
    if not reps:
        reason = f"no relation with {MIN_PAIRS}+ word pairs and finite losses"
        return {"mean": None, "boot": None, "n": 0, "reason": reason}
    return {"mean": float(np.mean([x["mean"] for x in reps])),
            "boot": np.mean([x["boot"] for x in reps], axis=0),
            "n": sum(x["n"] for x in reps), "reason": None}  # fmt: skip


def _pool_tree(template: dict, trees: list[dict]) -> dict:
    """`_pool` of every replicate of `trees` (nested like `template`), leaf by leaf."""
    if "boot" in template:
        return _pool(trees)
    return {key: _pool_tree(v, [t[key] for t in trees]) for key, v in template.items()}


def pooled_replicates(replicates: list[dict]) -> dict:
    """Per str(k): the mean over relations of each per-relation statistic, its replicates
    (independent across relations) averaged replicate by replicate, and "n_relations". A
    relation enters at k when every statistic of it has replicates there (>= `MIN_PAIRS`
    pairs, finite losses in every model), so all statistics pool the same relations; "n" is
    their summed word pairs.

    replicates: `relation_replicates` of each relation of one model pair (same PCA sizes,
    same models). Returns {str(k): {the statistics of `relation_replicates`, each a rep,
    "n_relations"}}.
    """
    out = {}
    for k in replicates[0] if replicates else ():
        used = [r[k] for r in replicates if all(x["boot"] is not None for x in _leaves(r[k]))]
        out[k] = {**_pool_tree(replicates[0][k], used), "n_relations": len(used)}
    return out


def pooled_intervals(pool: dict, n_boot: int) -> dict:
    """`pooled_replicates` with every replicate turned into its interval dict (the
    percentile interval of the averaged resamples)."""
    method = POOLED_METHOD.format(n_boot)
    return _map(pool, lambda rep: _interval(rep, method))


def pooled(replicates: list[dict], n_boot: int) -> dict:
    """Per str(k): the intervals of `pooled_replicates(replicates)`."""
    return pooled_intervals(pooled_replicates(replicates), n_boot)
