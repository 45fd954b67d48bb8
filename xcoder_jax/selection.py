"""Which latents steering and the ablation act on: selection rules and latent specs.

Latent sets are named by specs: "17" or "17+230" (ids), or "<category>:<k>", the k latents
with NRN above `min_nrn` (distilled-leaning; `analysis.distilled_only_min` allows only
distilled-only latents) most *specific* to the category's markers, among those that pass
the 95% screen (`xcoder_jax.specificity`: firing on the rows that predict a marker against
rows holding the same token that do not); "<category>:<k>:attribution" ranks by gradient x
activation instead (`xcoder_jax.attribution`). `score_rules` computes both on the training
shards, reading each occurrence at `selection.fire_offset` from the marker's first token (-1,
the lexicon's "predict" anchor: steering acts on what comes next). Raw counts of the marker
occurrences a latent fires on are not used: they rank sentence-boundary latents first (the
token before a marker is nearly always "." or "?").
"""

from __future__ import annotations

import json
import os

import numpy as np

from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.lexicon import CATEGORY_NAMES

RULES = ("specificity", "attribution")


def score_rules(rules, config, workdir, *, store, train, xcoder, models, roles, tokenizer, forms,
                categories):  # fmt: skip
    """{rule: scores} of `rules` (names in RULES) on the TRAINING shards `train`.

    Each scores object has `.score` [C, h] and `.passes()` [C, h] (rows in `categories`
    order): `specificity.Specificity` (from the store alone) or `attribution.Attribution`
    (gradient x activation in the distilled model, on up to `selection.n_docs` training
    documents re-tokenised from the sources); settings from the config's `selection`.
    """
    from xcoder_jax import documents
    from xcoder_jax.activations.exclude import Exclusion
    from xcoder_jax.attribution import marker_attribution
    from xcoder_jax.specificity import specificity_scores

    bad = [r for r in rules if r not in RULES]
    if bad:
        raise ConfigError(f"unknown selection rules {bad}; one of {RULES}")
    out, section = {}, config.selection
    if "specificity" in rules:
        out["specificity"] = specificity_scores(
            store, xcoder, forms, categories, section.fire_offset, train,
            max_controls=section.max_controls, seed=section.seed,
        )  # fmt: skip
    if "attribution" in rules:
        if "distilled" not in roles:
            raise ConfigError("the attribution rule needs a distilled model among the roles")
        stored, _ = documents.shard_documents(store, train, section.n_docs)
        exclusion = Exclusion.from_manifest(store.manifest)
        docs = documents.rebuild_documents(
            config.data, workdir, tokenizer, stored, exclusion=exclusion
        )
        docs = [d[: config.data.max_tokens] for d in docs]
        out["attribution"] = marker_attribution(
            models, roles, xcoder, docs, forms=forms, categories=categories,
            exclusion=exclusion, batch_size=section.batch_size,
            pad_id=documents.pad_token_id(tokenizer),
        )  # fmt: skip
    return out


class TooFewLatents(XcoderError, ValueError):
    """A "<category>:<k>" spec names more latents than qualify in this crosscoder."""


def select_latents(spec: str, nrn: np.ndarray, counts: dict | None, min_nrn: float) -> list[int]:
    """Latent ids of one spec (see the module docstring).

    nrn: [h]; counts: {(category, rule): [h] scores, > 0 where a latent qualifies} (from
    `score_rules`: `scores.score` where `scores.passes()`), needed by category specs only.
    """
    spec = str(spec).strip()
    h = len(nrn)
    if ":" not in spec:
        try:
            ids = [int(s) for s in spec.split("+")]
        except ValueError as e:
            raise ConfigError(f"bad latent spec {spec!r}: ids '17+230' or '<category>:<k>'") from e
        bad = [i for i in ids if not 0 <= i < h]
        if bad:
            raise ConfigError(f"latent ids {bad} out of range: the export has {h} latents")
        return ids
    cat, k, rule = parse_spec(spec)
    c = np.asarray(counts[(cat, rule)])
    order = [int(i) for i in np.argsort(-c, kind="stable") if c[i] > 0 and nrn[i] > min_nrn]
    if len(order) < k:
        raise TooFewLatents(
            f"{spec!r}: only {len(order)} latents with NRN > {min_nrn} pass the {rule} rule"
        )
    return order[:k]


def parse_spec(spec: str) -> tuple[str, int, str] | None:
    """(category, k, rule) of a "<category>:<k>[:<rule>]" spec (rule "specificity" by
    default); None for an id spec ("17+230")."""
    spec = str(spec).strip()
    if ":" not in spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ConfigError(f"bad latent spec {spec!r}: '<category>:<k>' or '<category>:<k>:<rule>'")
    cat, k = parts[0], int(parts[1])
    rule = parts[2] if len(parts) == 3 else "specificity"
    if cat not in CATEGORY_NAMES:
        raise ConfigError(f"unknown category {cat!r} in {spec!r}; one of {CATEGORY_NAMES}")
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r} in {spec!r}; one of {RULES}")
    return cat, k, rule


# --- What a chosen set is ----------------------------------------------------------------


def read_labels(workdir: str) -> dict[int, dict]:
    """{latent id: {"token", "token_share"}} from the analysis' latents.jsonl ({} if absent)."""
    path = os.path.join(wd.stage_dir(workdir, "analysis"), "latents.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            detail = row.get("label_detail") or {}
            out[int(row["id"])] = {
                "token": detail.get("token"),
                "token_share": detail.get("token_share"),
            }
    return out


def describe(ids, nrn, score, *, distilled_min: float, labels: dict[int, dict]) -> dict:
    """What a latent set is: size, NRN summary, distilled-only count, per-latent facts."""
    ids = [int(i) for i in ids]
    v = np.asarray(nrn)[ids] if ids else np.zeros(0)
    tokens = [labels.get(i, {}).get("token") for i in ids]
    common = {}
    for t in tokens:
        common[t] = common.get(t, 0) + 1
    return {
        "n": len(ids),
        "nrn": None
        if not ids
        else {
            "mean": round(float(v.mean()), 4),
            "min": round(float(v.min()), 4),
            "median": round(float(np.median(v)), 4),
            "max": round(float(v.max()), 4),
        },
        "n_distilled_only": int((v > distilled_min).sum()),
        "top_tokens": sorted(
            ([t, n] for t, n in common.items() if t is not None), key=lambda p: -p[1]
        )[:5],
        "latents": [
            {
                "id": i,
                "nrn": round(float(nrn[i]), 4),
                "score": round(float(score[i]), 5),
                "top_token": labels.get(i, {}).get("token"),
                "token_share": labels.get(i, {}).get("token_share"),
            }
            for i in ids
        ],
    }
