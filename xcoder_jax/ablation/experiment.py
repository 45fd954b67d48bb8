"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

Selection and measurement use disjoint documents of the store:

- selection, on the TRAINING shards: per reasoning category C, every latent's count of C's
  marker occurrences it fires on (read at `fire_offset` from the marker: by default at the
  position that predicts it, where the logit is measured); the top `frac` share of latents
  (with at least one firing) whose NRN > `ablation.min_nrn` is the targeted set S;
- measurement, on HELD-OUT documents wholly inside the held-out shards (re-tokenised from
  the sources): S is ablated at block L in each model at every position >= 1
  (`hooks.ablate`, reconstruction error kept), and the logit of the marker's first token at
  the position before each occurrence of one of C's markers is compared with the clean
  model's (ablated - clean).

Controls (`controls`): `n_random` activity-matched random sets (same NRN pool, comparable
summed activity at the measured positions) and `n_random` uniform random sets of |S|
latents. Every effect is a mean over marker occurrences with a 95% bootstrap CI that
resamples documents (occurrences in one document are not independent) and, for the
controls, the random draws; the targeted - matched difference gets its own CI, and so does
the distilled - base difference of (targeted - matched). An empty targeted set is `null`
with its reason.

Writes ablation/results.json and ablation/ablation.png.
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm import tqdm

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import selection, stage, stats
from xcoder_jax import workdir as wd
from xcoder_jax.ablation import controls
from xcoder_jax.ablation.probe import LogitProbe, marker_positions
from xcoder_jax.ablation.report import plot_ablation
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.activations.models import load_pair
from xcoder_jax.analysis import load_inputs, marker_groups, splice
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.exported import ExportedCrosscoder

ABLATION_FORMAT = 3  # bump when results change meaning, to redo old runs
RESULTS, FIGURE = "results.json", "ablation.png"


def targeted_latents(counts: np.ndarray, nrn: np.ndarray, frac: float, min_nrn: float):
    """Ids in the top `frac` of latents by marker firing count (count > 0) with NRN > min_nrn."""
    top = np.argsort(-counts, kind="stable")[: max(1, math.ceil(frac * len(counts)))]
    top = top[counts[top] > 0]
    return np.sort(top[nrn[top] > min_nrn])


def _id_ranges(ids) -> list[list[int]]:
    """Sorted ids as inclusive [first, last] runs (compact for 100k documents)."""
    ids = np.unique(np.asarray(ids, np.int64))
    if not len(ids):
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    return [[int(r[0]), int(r[-1])] for r in np.split(ids, cut)]


def _fingerprint(config, workdir: str, store) -> dict:
    return {
        "format": ABLATION_FORMAT,
        "export": stage.export_hash(workdir),
        "ablation": config.ablation.to_dict(),
        "norm": config.analysis.norm,
        "bare_markers": config.analysis.bare_markers,
        "store": store.manifest.get("fingerprint"),
        "eval_shards": int(config.train.eval_shards),
        "data": stage.digest(config.data.to_dict()),
        "models": stage.digest(config.models.to_dict()),
    }


def measurement_documents(store, config, heldout: list[int]):
    """{doc id: (first stored position, tokens)} of held-out documents never trained on.

    Raises AblationError when the store holds none (no held-out shards, or held-out shards
    shorter than one document).
    """
    if not heldout:
        raise AblationError(
            "the store has no held-out shards (train.eval_shards = 0): the ablation measures on "
            "documents its latents were not selected on; set train.eval_shards >= 1"
        )
    stored, n_cut = splice.heldout_documents(store, heldout, config.ablation.n_docs)
    if n_cut:
        raise AblationError(
            f"the held-out shards {heldout} hold no whole document (each begins in a training "
            "shard); hold out more shards (train.eval_shards) or extract with larger shards"
        )
    return stored


class AblationError(XcoderError, ValueError):
    """The ablation cannot be measured on held-out documents of this store."""


def _effects(probe, m: int, ids, act, nrn, where, clean, clusters, ac, rng) -> dict:
    """Ablating `ids` in model m against its controls, each effect with its 95% CI.

    act: [h] activity of every latent in model m at `where` (`controls.activity`); nrn: [h].
    The per-occurrence arrays (keys ending in "_values") feed the distilled - base
    comparison and are not written out.
    """
    pool, pool_name = controls.matched_pool(act, ids, nrn, ac.min_nrn)
    draws = {
        "matched": [controls.matched_draw(rng, act, ids, pool) for _ in range(ac.n_random)],
        "uniform": [controls.uniform_draw(rng, len(act), ids) for _ in range(ac.n_random)],
    }
    t = probe.logits(m, ids, where) - clean
    out = {"targeted": stats.cluster_bootstrap_ci(t, clusters, seed=ac.seed)}
    out["matched_pool"] = pool_name
    out["targeted_values"] = t
    for name, sets in draws.items():
        r = np.stack([probe.logits(m, s, where) - clean for s in sets])  # [n_random, n]
        out[f"{name}_random"] = stats.cluster_bootstrap_ci(r, clusters, seed=ac.seed)
        diff = t[None] - r
        out[f"targeted_minus_{name}"] = stats.cluster_bootstrap_ci(diff, clusters, seed=ac.seed)
        out[f"{name}_sizes"] = [len(s) for s in sets]
        out[f"{name}_values"] = r
    goal = float(act[ids].sum())
    ratios = [float(act[s].sum()) / goal for s in draws["matched"]] if goal > 0 else []
    # How well the matched sets reach the targeted set's activity (1 = exactly).
    out["matched_activity_ratio"] = stats.t_ci(ratios)
    return out


def run_ablation(config, workdir: str) -> dict:
    """The ablation experiment on `workdir`'s export; returns (and writes) ablation/results.json."""
    ac = config.ablation
    out_dir = wd.stage_dir(workdir, "ablation")
    store, tensors, export_config = load_inputs(config, workdir)
    fp = _fingerprint(config, workdir, store)
    old = stage.done(out_dir, RESULTS, fp, [FIGURE])
    if old is not None:
        return old
    if ac.n_random < 2:
        raise ConfigError(
            f"ablation.n_random must be >= 2 for a confidence interval, got {ac.n_random}"
        )
    start = time.time()
    roles = ckpt.role_order(export_config)
    train, heldout = store.split(config.train.eval_shards)
    stored = measurement_documents(store, config, heldout)
    models, tokenizer = load_pair(config, workdir, roles)
    device = next(models[0].parameters()).device
    xcoder = ExportedCrosscoder(tensors, export_config, device)
    nrn = xcoder.nrn(config.analysis.norm)
    dec_norms = np.linalg.norm(np.asarray(tensors["W_dec"], np.float64), axis=-1)  # [h, m] raw
    cats = list(ac.categories)

    doc_ids = sorted(stored)
    exclusion = Exclusion.from_manifest(store.manifest)
    docs = splice.rebuild_documents(config.data, workdir, tokenizer, stored, exclusion)
    docs = [d[: config.data.max_tokens] for d in docs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
    counts = selection.marker_counts(store, xcoder, forms, cats, ac.fire_offset, shards=train)
    selection_docs = np.unique(np.concatenate([store.shard_index(k)[:, 0] for k in train]))
    overlap = np.intersect1d(selection_docs, doc_ids)
    if len(overlap):  # a document cut by the train/held-out border; never measured on
        raise AblationError(f"documents {overlap[:5].tolist()} are both selected and measured on")

    results = {
        "fingerprint": fp,
        "roles": roles,
        "fracs": [float(f) for f in ac.fracs],
        "n_random": ac.n_random,
        "selection": {"shards": train, "documents": _id_ranges(selection_docs)},
        "measurement": {"shards": heldout, "documents": doc_ids},
        "measure": "mean change of the marker's first-token logit at the position before "
        "each marker occurrence (ablated - clean), over held-out occurrences",
        "controls": {
            "matched": controls.MATCHED,
            "matched_pool": controls.POOLS,
            "uniform": controls.UNIFORM,
        },
        "ci": "95% bootstrap percentile CI resampling documents (and random draws)",
        "categories": {},
    }
    bar = tqdm(total=len(cats) * len(results["fracs"]), desc="ablation", unit="set")
    for c, cat in enumerate(cats):
        where = marker_positions(docs, forms[cat], exclusion)
        # Only documents holding a marker are run: the others add no measurement.
        held = sorted({d for d, _, _ in where})
        where = [(held.index(d), p, t) for d, p, t in where]
        entry = {"occurrences": len(where), "documents": len(held), "by_frac": []}
        results["categories"][cat] = entry
        if not where:
            entry["reason"] = "no marker occurrence in the held-out documents"
            bar.update(len(results["fracs"]))
            continue
        clusters = np.array([doc_ids[held[d]] for d, _, _ in where])
        probe = LogitProbe(
            models, xcoder, [docs[d] for d in held], ac.batch_size, pad_id, exclusion
        )
        clean = [probe.logits(m, [], where) for m in range(len(models))]
        f = probe.latent_acts(where)  # [n, h]
        entry["clean_logit"] = {r: float(clean[m].mean()) for m, r in enumerate(roles)}
        memo: dict = {}
        for frac in results["fracs"]:
            bar.update()
            ids = targeted_latents(counts[c], nrn, frac, ac.min_nrn)
            row = {"frac": frac, "n_latents": len(ids), "latents": ids.tolist()}
            entry["by_frac"].append(row)
            if not len(ids):
                row["reason"] = (
                    f"no latent in the top {frac:g} by marker firing has NRN > {ac.min_nrn}"
                )
                continue
            per_model = []
            for m, role in enumerate(roles):
                key = (m, tuple(ids.tolist()))
                if key not in memo:  # fracs often select the same set
                    rng = np.random.default_rng([ac.seed, c, m, len(ids)])
                    act = controls.activity(f, dec_norms[:, m])
                    memo[key] = _effects(
                        probe, m, ids, act, nrn, where, clean[m], clusters, ac, rng
                    )
                eff = memo[key]
                # [n_random, n]: targeted minus each matched draw, per occurrence.
                per_model.append(eff["targeted_values"][None] - eff["matched_values"])
                row[role] = {k: v for k, v in eff.items() if not k.endswith("_values")}
            if "base" in roles and "distilled" in roles:
                # Does the distilled model lose more of the marker than the base does? The two
                # models' draws are independent, so draw k of one pairs with draw k of the
                # other, and the bootstrap resamples draws as well as documents.
                diff = per_model[roles.index("distilled")] - per_model[roles.index("base")]
                row["distilled_minus_base"] = stats.cluster_bootstrap_ci(
                    diff, clusters, seed=ac.seed
                )
    bar.close()
    results["seconds"] = round(time.time() - start, 1)
    return stage.commit(out_dir, RESULTS, results, {FIGURE: lambda p: plot_ablation(results, p)})
