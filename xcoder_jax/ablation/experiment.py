"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

Selection and measurement use disjoint documents of the store:

- selection, on the TRAINING shards, by two rules (`sets`): *specificity* (firing before the
  category's markers against the same preceding token elsewhere, `xcoder_jax.specificity`)
  and *attribution* (gradient x activation of the markers' log-probability in the distilled
  model, `xcoder_jax.attribution`). The top `frac` of the latents that pass a rule with NRN >
  `ablation.min_nrn` is the targeted set S;
- measurement, on HELD-OUT documents wholly inside the held-out shards (re-tokenised from the
  sources): S is removed at block L in each model at every stored position (reconstruction
  error kept), and the log-probability of the marker's first token at the position before
  each occurrence is compared with the clean model's (`effects`).

Controls (`controls`): random latents at the targeted set's activity, read off a
dose-response curve of random sets (NRN pool), and norm-matched random directions. Each
effect is a mean over occurrences with a 95% bootstrap CI resampling documents and random
draws; targeted minus each control and the distilled - base difference get their own CIs.
Per category, the `headline` entry is the declared test: the specificity rule at
`ablation.headline_frac`, with its specificity matrix (the set's effect on every category's
markers and on the ordinary continuations, at the same positions).

Writes ablation/results.json and ablation/ablation.png.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from xcoder_jax import selection, stage, stats
from xcoder_jax import workdir as wd
from xcoder_jax.ablation import controls, sets
from xcoder_jax.ablation.effects import Measurer, set_effects, unmeasured
from xcoder_jax.ablation.probe import LogitProbe, marker_positions
from xcoder_jax.ablation.report import plot_ablation
from xcoder_jax.activations import ActivationStore
from xcoder_jax.activations.exclude import Exclusion
from xcoder_jax.activations.models import load_pair
from xcoder_jax.analysis import load_inputs, marker_groups, splice
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.exported import ExportedCrosscoder

ABLATION_FORMAT = 5  # bump when results change meaning, to redo old runs
RESULTS, FIGURE = "results.json", "ablation.png"
HEADLINE_RULE = "specificity"


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
        "selection": config.selection.to_dict(),
        "norm": config.analysis.norm,
        "distilled_only_min": config.analysis.distilled_only_min,
        "bare_markers": config.analysis.bare_markers,
        "store": store.manifest.get("fingerprint"),
        "eval_shards": int(config.train.eval_shards),
        "data": stage.digest(config.data.to_dict()),
        "models": stage.digest(config.models.to_dict()),
    }


def fingerprint(config, workdir: str) -> dict:
    """The fingerprint `run_ablation` compares with `stage.done` for this config and workdir."""
    return _fingerprint(config, workdir, ActivationStore(wd.activations_dir(workdir), False))


class AblationError(XcoderError, ValueError):
    """The ablation cannot be measured on held-out documents of this store."""


def measurement_documents(store, config, heldout: list[int]):
    """{doc id: (first stored position, tokens)} of held-out documents never trained on."""
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


def _check_config(ac) -> None:
    if ac.n_random < 2:
        raise ConfigError(f"ablation.n_random must be >= 2 for a CI, got {ac.n_random}")
    if not ac.dose_levels or min(ac.dose_levels) <= 0:
        raise ConfigError(f"ablation.dose_levels must be positive multiples, got {ac.dose_levels}")
    if ac.headline_frac not in tuple(ac.fracs):
        raise ConfigError(f"ablation.headline_frac {ac.headline_frac} is not in ablation.fracs")
    bad = [r for r in ac.rules if r not in selection.RULES]
    if bad or HEADLINE_RULE not in ac.rules:
        raise ConfigError(
            f"ablation.rules must be among {selection.RULES} and include {HEADLINE_RULE!r}, "
            f"got {tuple(ac.rules)}"
        )


def _rule_summary(rule, c: int, cat: str) -> dict:
    passes = rule.passes()[c]
    out = {"n_pass": int(passes.sum())}
    for key in ("n_marker", "n_control", "n_occurrences", "n_documents"):
        if hasattr(rule, key):
            out[key] = int(getattr(rule, key)[c])
    if hasattr(rule, "coverage"):
        out["coverage"] = round(float(rule.coverage[c]), 4)
        out["preceding_tokens"] = rule.preceding[cat]
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
    _check_config(ac)
    start = time.time()
    train, heldout = store.split(config.train.eval_shards)
    stored = measurement_documents(store, config, heldout)
    xcoder = ExportedCrosscoder(tensors, export_config)
    roles = xcoder.roles
    models, tokenizer = load_pair(config, workdir, roles)
    xcoder.to(next(models[0].parameters()).device)
    nrn = xcoder.nrn(config.analysis.norm)
    dec_norms = np.linalg.norm(np.asarray(tensors["W_dec"], np.float64), axis=-1)  # [h, m] raw
    cats = list(ac.categories)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
    doc_ids = sorted(stored)
    selection_docs = np.unique(np.concatenate([store.shard_index(k)[:, 0] for k in train]))
    overlap = np.intersect1d(selection_docs, doc_ids)
    if len(overlap):  # a document cut by the train/held-out border; never measured on
        raise AblationError(f"documents {overlap[:5].tolist()} are both selected and measured on")
    rules = selection.score_rules(
        ac.rules, config, workdir, store, train, xcoder, models, roles, tokenizer, forms, cats
    )
    labels = selection.read_labels(workdir)

    exclusion = Exclusion.from_manifest(store.manifest)
    docs = splice.rebuild_documents(config.data, workdir, tokenizer, stored, exclusion)
    docs = [d[: config.data.max_tokens] for d in docs]
    per_cat = {cat: marker_positions(docs, forms[cat], exclusion) for cat in cats}
    held = sorted({d for w in per_cat.values() for d, _, _ in w})  # documents holding a marker
    probe_row = {d: i for i, d in enumerate(held)}
    where, cat_of = [], []
    for c, cat in enumerate(cats):
        where += [(probe_row[d], p, t) for d, p, t in per_cat[cat]]
        cat_of += [c] * len(per_cat[cat])
    cat_of = np.asarray(cat_of, np.int64)
    marker_ids = sorted({int(f[0]) for cat in cats for f in forms[cat]})
    cat_cols = {cat: [marker_ids.index(int(f[0])) for f in forms[cat]] for cat in cats}
    clusters_all = np.array([doc_ids[held[d]] for d, _, _ in where], np.int64)

    results = {
        "fingerprint": fp,
        "roles": roles,
        "fracs": [float(f) for f in ac.fracs],
        "headline": {"rule": HEADLINE_RULE, "frac": float(ac.headline_frac)},
        "n_random": ac.n_random,
        "dose_levels": [float(v) for v in ac.dose_levels],
        "selection": {
            "shards": train,
            "documents": _id_ranges(selection_docs),
            "rules": {
                "specificity": "token-matched firing difference before the markers, 95% lower "
                "bound > 0",
                "attribution": "gradient x activation of the markers' log-probability "
                "(distilled model), 95% lower bound > 0",
            },
        },
        "measurement": {
            "shards": heldout,
            "documents": doc_ids,
            "documents_with_markers": len(held),
        },
        "measure": "mean change of the log-probability of the marker's first token at the "
        "position before each occurrence (ablated - clean), over held-out occurrences; "
        "'margin': the same for log p(marker) - log p(best non-marker token)",
        "controls": {"random_at_matched": controls.DOSE, "random_direction": controls.DIRECTION},
        "ci": "95% bootstrap percentile CI resampling documents (and random draws)",
        "categories": {},
    }
    meas = None  # with no occurrence at all, every category says so
    if where:
        docs_held = [docs[d] for d in held]
        probe = LogitProbe(models, xcoder, docs_held, ac.batch_size, pad_id, exclusion)
        meas = Measurer(probe, len(models), where, marker_ids, cat_cols)
    n_sets = len(cats) * len(ac.rules) * len(ac.fracs)
    bar = tqdm(total=n_sets, desc="ablation", unit="set")
    for c, cat in enumerate(cats):
        idx = np.flatnonzero(cat_of == c)
        entry = {"occurrences": len(idx), "documents": len(set(clusters_all[idx].tolist()))}
        results["categories"][cat] = entry
        entry["clean_log_prob"] = {
            r: float(meas.clean[m]["own"][idx].mean()) if len(idx) else None
            for m, r in enumerate(roles)
        }
        entry["rules"] = {}
        for r_i, rule_name in enumerate(ac.rules):
            bar.update(len(ac.fracs))
            rule = rules[rule_name]
            block = {"by_frac": []}
            entry["rules"][rule_name] = block
            block["pool"] = _rule_summary(rule, c, cat) | {
                "n_pool": sets.pool_size(rule.passes()[c], nrn, ac.min_nrn)
            }
            memo: dict = {}
            for frac in ac.fracs:
                ids = sets.targeted_latents(rule.score[c], rule.passes()[c], nrn, frac, ac.min_nrn)
                row = {
                    "frac": float(frac),
                    "set": selection.describe(
                        ids, nrn, rule.score[c], config.analysis.distilled_only_min, labels
                    ),
                }
                block["by_frac"].append(row)
                if not len(ids):
                    row["reason"] = f"no latent passes the {rule_name} rule with NRN > {ac.min_nrn}"
                    continue
                if not len(idx):
                    row["reason"] = "no marker occurrence in the held-out documents"
                    continue
                key = tuple(ids.tolist())
                if key not in memo:
                    memo[key] = _measure_set(
                        meas,
                        idx,
                        ids,
                        nrn,
                        dec_norms,
                        ac,
                        roles,
                        clusters_all[idx],
                        [ac.seed, c, r_i, len(ids)],
                    )
                row.update(memo[key])
        _headline(entry, c, meas, cats, cat_of, clusters_all, ac, roles)
    bar.close()
    results["seconds"] = round(time.time() - start, 1)
    return stage.commit(out_dir, RESULTS, results, {FIGURE: lambda p: plot_ablation(results, p)})


def _measure_set(meas, idx, ids, nrn, dec_norms, ac, roles, clusters, seed) -> dict:
    """Per model: `effects.set_effects`; and distilled - base of targeted - random."""
    row, diffs = {}, {}
    for m, role in enumerate(roles):
        rng = np.random.default_rng([*seed, m])
        eff = set_effects(meas, m, idx, ids, nrn, dec_norms[:, m], ac, clusters, rng)
        diffs[role] = eff.pop("targeted_minus_random_values")
        row[role] = eff
    if "base" in roles and "distilled" in roles:
        if diffs["base"] is None or diffs["distilled"] is None:
            row["distilled_minus_base"] = unmeasured(
                len(idx), "a model's random control at matched activity is unreachable"
            )
        else:  # draws of the two models are independent: draw k pairs with draw k
            row["distilled_minus_base"] = stats.cluster_bootstrap_ci(
                diffs["distilled"] - diffs["base"], clusters, seed=ac.seed
            )
    return row


def _headline(entry, c: int, meas, cats, cat_of, clusters_all, ac, roles) -> None:
    """The declared test of category `c` (HEADLINE_RULE at headline_frac) and its specificity
    matrix: the set's effect on every category's markers, each at its own held-out positions,
    and on the clean model's top non-marker tokens at this category's positions."""
    rows = entry["rules"][HEADLINE_RULE]["by_frac"]
    row = next(r for r in rows if abs(r["frac"] - ac.headline_frac) < 1e-12)
    head = {"rule": HEADLINE_RULE, "frac": row["frac"], "set": row["set"]}
    for key in (*roles, "distilled_minus_base", "reason"):
        if key in row:
            head[key] = row[key]
    entry["headline"] = head
    ids = [lat["id"] for lat in row["set"]["latents"]]
    if not ids or "reason" in row:
        return
    boot = lambda v, sel: stats.cluster_bootstrap_ci(v[sel], clusters_all[sel], seed=ac.seed)
    all_idx = np.arange(len(meas.where))
    own = np.flatnonzero(cat_of == c)
    head["matrix"], head["others"], head["own_minus_others"] = {}, {}, {}
    for m, role in enumerate(roles):
        ch = meas.change(m, all_idx, ids)
        head["matrix"][role] = {
            cat_b: boot(ch["categories"][b], np.flatnonzero(cat_of == b))
            if np.any(cat_of == b)
            else unmeasured(0, "no held-out occurrence")
            for b, cat_b in enumerate(cats)
        }
        head["others"][role] = boot(ch["others"], own)
        # Paired per position: the own marker token's change minus the other likely tokens'.
        head["own_minus_others"][role] = boot(ch["own"] - ch["others"], own)
