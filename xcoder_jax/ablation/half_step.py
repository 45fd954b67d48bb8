"""The half-step KL of each category's targeted set, on the ablation's held-out documents.

The intervention and its figures are `analysis.kl`'s: the base model runs to block L, a latent
set's share of the reconstruction difference sum_{i in S} f_i(x) (W_dec[i, distilled] -
W_dec[i, base]) (`kl.set_difference`) is added to its block-L input there, the distilled
model's blocks L.. continue, and the set closes

    closed(S) = 1 - KL(distilled || h_S) / KL(distilled || h_0)

of the KL of the base model continued with nothing added (a ratio of means over the stored
positions). Per category, S is the headline set (`measure.HEADLINE_RULE` at
`ablation.headline_frac`, selected on the training shards), evaluated on the first
`ablation.kl_docs` measured documents (held-out: `experiment` refuses a document that is also
selected on). Its control: `analysis.kl_random_draws` random sets of the same size matched on
activity latent by latent (`kl.matched_random_sets`, on these documents), drawn from the
latents the set could have held (NRN > `ablation.min_nrn`, firing here; the ablation's own
random latents are matched on summed activity at the marker positions, with sizes that vary,
so they are not reused), and the set minus them, paired by document. Every interval is a 95%
cluster bootstrap over documents (`ablation.seed`; the draws resampled with the documents).
"""

from __future__ import annotations

import numpy as np

from xcoder_jax.analysis import kl
from xcoder_jax.stats import cluster_bootstrap_ci

NO_DRAWS = "no random draws (analysis.kl_random_draws is 0, or too few other latents)"


def headline_sets(categories: dict) -> dict[str, tuple[list[int], str | None]]:
    """{category: (its headline set's ids, why there is none or None)} of results["categories"]."""
    out = {}
    for cat, entry in categories.items():
        head = entry.get("headline") or {}
        ids = sorted(int(lat["id"]) for lat in (head.get("set") or {}).get("latents", []))
        out[cat] = ids, None if ids else head.get("reason", "no targeted set")
    return out


def _seed(seed: int, c: int) -> int:
    """Category c's seed of its random draws, independent of the others'."""
    return int(np.random.SeedSequence([seed, c]).generate_state(1)[0])


def half_step_entry(config, models, xcoder, docs, doc_ids, categories, *, pad_id, exclusion):
    """results["half_step_kl"]: the module docstring's figures for every category.

    docs: the measured documents' token ids (doc_ids: their ids), the first
    `ablation.kl_docs` read; xcoder: the export, on the models' device; categories:
    results["categories"] with their headlines."""
    ac, n_draws = config.ablation, config.analysis.kl_random_draws
    if ac.kl_docs <= 0:
        return {"skipped": "ablation.kl_docs is 0"}
    roles = xcoder.roles
    if "base" not in roles or "distilled" not in roles:
        return {"skipped": f"the half-step needs a base and a distilled model, not {roles}"}
    docs, doc_ids = docs[: ac.kl_docs], [int(d) for d in doc_ids[: ac.kl_docs]]
    kw = dict(batch_size=ac.batch_size, pad_id=pad_id, exclusion=exclusion)
    chosen = headline_sets(categories)
    activity = kl.latent_activity(models, xcoder.layer, docs, xcoder, **kw)
    # The draws come from the latents a targeted set may hold (NRN > ablation.min_nrn) that
    # fire on these documents, as the ablation's own random controls (`controls.active_pool`).
    pool = np.flatnonzero((xcoder.nrn(config.analysis.norm) > ac.min_nrn) & (activity > 0))
    run, draws = {"nothing": []}, {}
    for c, (cat, (ids, _)) in enumerate(chosen.items()):
        if ids:
            seed = _seed(ac.seed, c)
            draws[cat] = kl.matched_random_sets(activity, ids, n_draws, seed, pool=pool)
            run[("set", cat)] = ids
            run.update({("random", cat, k): r for k, r in enumerate(draws[cat][0])})
    v, rows = kl.set_values(models, xcoder.layer, docs, xcoder, run, roles=roles, **kw)
    clusters = np.asarray(doc_ids, np.int64)[rows]
    out = {
        "documents": doc_ids,
        "tokens": len(clusters),
        "random_draws": n_draws,
        "match_factor": kl.MATCH_FACTOR,
        "seed": ac.seed,
        "kl_nothing": cluster_bootstrap_ci(v["nothing"], clusters, seed=ac.seed),
        "categories": {},
    }
    for cat, (ids, reason) in chosen.items():
        if not ids:
            out["categories"][cat] = {"n_latents": 0, "reason": reason}
            continue
        out["categories"][cat] = _category(v, cat, ids, draws[cat], activity, clusters, ac.seed)
    return out


def _category(v: dict, cat: str, ids, drawn, activity, clusters, seed: int) -> dict:
    """One category's entry: its set, its random sets and the set minus them."""
    sets, within = drawn
    r = np.stack([v[("random", cat, k)] for k in range(len(sets))]) if sets else None
    one, rand, diff = kl.set_against_random(v[("set", cat)], r, v["nothing"], clusters, seed)
    entry = {"n_latents": len(ids), "latents": ids, "set": one}
    if rand is None:
        entry["random"] = {"n_latents": len(ids), "draws": 0, "reason": NO_DRAWS}
        entry["minus_random"] = {"reason": NO_DRAWS}
        return entry
    own = max(float(activity[ids].sum()), 1e-30)
    entry["random"] = {
        "n_latents": len(ids),
        "draws": len(sets),
        **rand,
        "latents": sets,
        "within_factor": within,
        "activity_ratio": [float(activity[s].sum()) / own for s in sets],
    }
    entry["minus_random"] = diff
    return entry
