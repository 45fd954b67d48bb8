"""Per category: the targeted set of every rule and frac, its effects against the controls,
and the declared test (`HEADLINE_RULE` at `ablation.headline_frac`) with its specificity
matrix. `category_entry` gives one category's entry of results.json["categories"].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcoder_jax import selection, stats
from xcoder_jax.ablation import sets
from xcoder_jax.ablation.effects import Measurer, set_effects, unmeasured
from xcoder_jax.ablation.occurrences import Occurrences

HEADLINE_RULE = "specificity"


@dataclass(frozen=True)
class Study:
    """What every category's measurement reads: the measurer (None without any occurrence),
    the occurrences, the rules' scores ({rule: `selection.score_rules` scores}), NRN [h], raw
    decoder norms [h, m], the analysis' labels, the roles in slot order, the categories, the
    `ablation` config section and the distilled-only NRN cut (`selection.describe`)."""

    meas: Measurer | None
    occ: Occurrences
    rules: dict
    nrn: np.ndarray
    dec_norms: np.ndarray
    labels: dict
    roles: list[str]
    categories: list[str]
    ac: object
    distilled_min: float


def category_entry(study: Study, c: int, progress=None) -> dict:
    """results.json["categories"][category c]: occurrences, clean log-probabilities, every
    rule's sets by frac with their effects, and the headline. `progress(n)` is told of the
    sets done."""
    ac, idx = study.ac, study.occ.of(c)
    entry = {"occurrences": len(idx), "documents": len(set(study.occ.documents[idx].tolist()))}
    entry["clean_log_prob"] = {
        r: float(study.meas.clean[m]["own"][idx].mean()) if len(idx) else None
        for m, r in enumerate(study.roles)
    }
    entry["rules"] = {}
    for r_i, rule_name in enumerate(ac.rules):
        if progress is not None:
            progress(len(ac.fracs))
        entry["rules"][rule_name] = _rule_block(study, c, r_i, rule_name)
    entry["headline"] = _headline(study, entry, c)
    return entry


def _rule_block(study: Study, c: int, r_i: int, rule_name: str) -> dict:
    """One rule's pool and its targeted set at every frac (a set measured once per rule)."""
    ac, nrn, idx = study.ac, study.nrn, study.occ.of(c)
    rule = study.rules[rule_name]
    cat = study.categories[c]
    block = {"by_frac": []}
    block["pool"] = _rule_summary(rule, c, cat) | {
        "n_pool": sets.pool_size(rule.passes()[c], nrn, ac.min_nrn)
    }
    memo: dict = {}
    for frac in ac.fracs:
        ids = sets.targeted_latents(
            rule.score[c], rule.passes()[c], nrn, frac=frac, min_nrn=ac.min_nrn
        )
        described = selection.describe(
            ids, nrn, rule.score[c], distilled_min=study.distilled_min, labels=study.labels
        )
        row = {"frac": float(frac), "set": described}
        block["by_frac"].append(row)
        if not len(ids):
            row["reason"] = f"no latent passes the {rule_name} rule with NRN > {ac.min_nrn}"
            continue
        if not len(idx):
            row["reason"] = "no marker occurrence in the held-out documents"
            continue
        key = tuple(ids.tolist())
        if key not in memo:
            memo[key] = _measure_set(study, idx, ids, seed=[ac.seed, c, r_i, len(ids)])
        row.update(memo[key])
    return block


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


def _measure_set(study: Study, idx, ids, *, seed) -> dict:
    """Per model: `effects.set_effects`; and distilled - base of targeted - random."""
    ac, roles, clusters = study.ac, study.roles, study.occ.documents[idx]
    row, diffs = {}, {}
    for m, role in enumerate(roles):
        rng = np.random.default_rng([*seed, m])
        eff = set_effects(
            study.meas, m, idx, ids, nrn=study.nrn, dec_norms=study.dec_norms[:, m], ac=ac,
            clusters=clusters, rng=rng,
        )  # fmt: skip
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


def _headline(study: Study, entry: dict, c: int) -> dict:
    """The declared test of category `c` (HEADLINE_RULE at headline_frac) and its specificity
    matrix: the set's effect on every category's markers, each at its own held-out positions,
    and on the clean model's top non-marker tokens at this category's positions."""
    ac, occ, meas = study.ac, study.occ, study.meas
    rows = entry["rules"][HEADLINE_RULE]["by_frac"]
    row = next(r for r in rows if abs(r["frac"] - ac.headline_frac) < 1e-12)
    head = {"rule": HEADLINE_RULE, "frac": row["frac"], "set": row["set"]}
    for key in (*study.roles, "distilled_minus_base", "reason"):
        if key in row:
            head[key] = row[key]
    ids = [lat["id"] for lat in row["set"]["latents"]]
    if not ids or "reason" in row:
        return head
    boot = lambda v, sel: stats.cluster_bootstrap_ci(v[sel], occ.documents[sel], seed=ac.seed)
    all_idx = np.arange(len(meas.where))
    own = occ.of(c)
    head["matrix"], head["others"], head["own_minus_others"] = {}, {}, {}
    for m, role in enumerate(study.roles):
        ch = meas.change(m, all_idx, ids)
        head["matrix"][role] = {
            cat_b: boot(ch["categories"][b], occ.of(b))
            if np.any(occ.category == b)
            else unmeasured(0, "no held-out occurrence")
            for b, cat_b in enumerate(study.categories)
        }
        head["others"][role] = boot(ch["others"], own)
        # Paired per position: the own marker token's change minus the other likely tokens'.
        head["own_minus_others"][role] = boot(ch["own"] - ch["others"], own)
    return head
