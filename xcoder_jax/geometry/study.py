"""The geometry study: every relation in every model pair, written to geometry/.

Pairs are every size of the zoo (when the models are the zoo) or the configured pair, plus
`geometry.pairs`. Every comparison (base vs distilled, true pairing vs shuffled control, and
the difference of the two models' true - shuffled gaps, "structure_gain") is a paired
difference with a bootstrap interval over word pairs (`bootstrap`), per relation and pooled
over relations; a difference counts only where its interval excludes 0. A zoo size with a
sham model (the base fine-tuned like the distilled one, without reasoning traces) also gets
"sham_gain", the distilled model's gap minus the sham's, on the same resamples; a pair
without one records why under "sham". The pooled statistics are fitted against
log10(parameters) over the sizes (`trend`).

Results whose fingerprint matches (geometry config, seed, layer, zoo config hash or model
ids, which sizes have a sham model) are reused; the figures and results.json are committed
by `stage.commit`, results last.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
from tqdm import tqdm

from xcoder_jax import site, stage
from xcoder_jax import workdir as wd
from xcoder_jax.errors import ConfigError
from xcoder_jax.geometry.bootstrap import (
    intervals,
    pooled_intervals,
    pooled_replicates,
    relation_replicates,
)
from xcoder_jax.geometry.metric import derangements, loss_scores, relation_losses
from xcoder_jax.geometry.relations import (
    Pair,
    RelationError,
    filter_relation,
    relation_sets,
    word_vectors,
)
from xcoder_jax.geometry.results_key import FORMAT, check_config, results_key
from xcoder_jax.geometry.summary import summarize, verdicts
from xcoder_jax.geometry.trend import size_trend

RESULTS = "results.json"
FIGURES = ("cdf.png", "loss_vs_size.png")


def model_pairs(config) -> list[dict]:
    """The pairs studied: every zoo size (when the models are the zoo) or the configured
    pair, named "main", then every `geometry.pairs` entry {name, base, distilled}."""

    def real(name, base, distilled, base_rev=None, distilled_rev=None):
        return {"name": name, "size": None, "zoo": False, "base": base, "distilled": distilled,
                "base_revision": base_rev, "distilled_revision": distilled_rev}  # fmt: skip

    m = config.models
    if "zoo" in (m.base, m.distilled):
        entries = [{"name": f"h{s}", "size": int(s), "zoo": True} for s in config.zoo.sizes]
    else:
        entries = [real("main", m.base, m.distilled, m.base_revision, m.distilled_revision)]
    entries += [real(p["name"], p["base"], p["distilled"]) for p in config.geometry.pairs]
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"the studied model pairs need distinct names, got {names}")
    return entries


def _sham_missing(workdir: str, entry: dict) -> str | None:
    """Why a pair has no sham model (only the zoo builds one), None when it has one."""
    if not entry["zoo"]:
        return "no sham model: a pair of configured models has none"
    from xcoder_jax.zoo.load import model_path

    if model_path(workdir, "sham", entry["size"]) is not None:
        return None
    base = model_path(workdir, "base", entry["size"])  # the sham is built beside it
    where = os.path.join(os.path.dirname(base), "sham") if base else f"size {entry['size']}"
    return f"no sham model at {where}"


def _load_pair(config, workdir: str, entry: dict, sham: bool):
    """(tokenizer, {role: () -> model}), the sham among the roles when `sham`; real models
    load one at a time (memory)."""
    if entry["zoo"]:
        from xcoder_jax.zoo.load import load_model as load_zoo_model
        from xcoder_jax.zoo.load import load_pair

        base, distilled, tok = load_pair(workdir, entry["size"])
        loaders = {"base": lambda: base, "distilled": lambda: distilled}
        if sham:
            loaders["sham"] = lambda: load_zoo_model(workdir, "sham", entry["size"])
        return tok, loaders
    from xcoder_jax.activations.models import (
        check_same_tokenizer,
        load_model,
        load_tokenizer,
        torch_device,
    )

    toks = {r: load_tokenizer(entry[r], entry[f"{r}_revision"]) for r in wd.ROLES}
    check_same_tokenizer(toks)
    device, dtype = torch_device(config.models.device), config.models.torch_dtype
    loaders = {
        r: lambda r=r: load_model(entry[r], entry[f"{r}_revision"], dtype, device) for r in wd.ROLES
    }
    # The base's tokenizer encodes for both, so both read the same ids (R1-Distill's own
    # would prepend a BOS the base never had).
    return toks["base"], loaders


def study_pair(
    config, workdir: str, entry: dict, relations: dict[str, list[Pair]]
) -> tuple[dict, dict]:
    """One model pair: (result, `bootstrap.pooled_replicates` of its relations).

    result: {"layer", "n_layers", "d_model", "n_params": {role: int}, "relations": {name:
    {"kept", "total", "models": {role: {str(k): metric.loss_scores}}, "by_k": {str(k):
    {"base_minus_distilled": CI, "true_minus_shuffled": {role: CI}, "structure_gain": CI,
    "sham_gain": CI}}}}, "pooled": {str(k): {the same, "n_relations"}}, "counts":
    `verdicts`[, "sham": why there is no sham model]}, CI the interval dicts of
    `bootstrap`, roles base, distilled and sham. Without a sham model there is no "sham"
    role nor "sham_gain" anywhere. A relation keeping fewer than 2 single-token pairs has
    "skipped" (the reason) instead of "models" and "by_k". The replicates (arrays, not
    stored) feed the trend over sizes."""
    gc = config.geometry
    missing = _sham_missing(workdir, entry)
    tokenizer, loaders = _load_pair(config, workdir, entry, sham=missing is None)
    rels, out = [], {"relations": {}}
    if missing is not None:
        out["sham"] = missing
    for name, pairs in relations.items():
        try:
            rels.append(filter_relation(name, pairs, tokenizer, gc, config.seed))
        except RelationError as e:  # recorded; another tokenizer may cover the relation
            out["relations"][name] = {"kept": e.kept, "total": e.total, "skipped": str(e)}
    if not rels:
        raise ConfigError(f"{entry['name']}: no relation keeps 2 single-token pairs")
    prompts = {w: ids for r in rels for w, ids in r.prompts.items()}
    words = sorted(prompts)
    row = {w: i for i, w in enumerate(words)}
    requested = gc.layer if gc.layer is not None else config.extract.layer
    vectors = {}
    for role, load in loaders.items():
        model = load()
        n_layers = site.num_layers(model)
        layer = site.resolve_layer(requested, n_layers)
        if vectors and (out["layer"], out["n_layers"]) != (layer, n_layers):
            raise ConfigError(f"{entry['name']}: the models have different depths")
        vectors[role] = word_vectors(model, [prompts[w] for w in words], layer, gc.batch_size)
        out.update(layer=layer, n_layers=n_layers, d_model=int(vectors[role].shape[1]))
        out.setdefault("n_params", {})[role] = int(sum(p.numel() for p in model.parameters()))
        del model
    replicates = []
    for r in rels:
        ia, ib = [row[a] for a, _ in r.pairs], [row[b] for _, b in r.pairs]
        # Seeded per relation, so every pair and every model see the same shuffles, and
        # the resampled word pairs (a stream of their own) are the same for every statistic
        # and for every model pair scoring the same word pairs (resampled jointly in the
        # trend over sizes); other word pairs get another stream.
        crc = zlib.crc32(r.name.encode())
        rng = np.random.default_rng([config.seed, crc])
        shuffles = derangements(len(r.pairs), gc.n_shuffles, rng)
        ks = tuple(gc.n_components)
        raw = {role: relation_losses(v[ia], v[ib], ks, shuffles) for role, v in vectors.items()}
        words = zlib.crc32(json.dumps(r.pairs).encode())
        replicates.append(relation_replicates(raw, gc.n_boot, [config.seed, crc, 1, words]))
        out["relations"][r.name] = {
            "kept": r.kept,
            "total": r.total,
            "models": {role: {k: loss_scores(x) for k, x in v.items()} for role, v in raw.items()},
            "by_k": intervals(replicates[-1], gc.n_boot),
        }
    out["relations"] = {name: out["relations"][name] for name in relations}  # set order
    pool = pooled_replicates(replicates)
    out["pooled"] = pooled_intervals(pool, gc.n_boot)
    out["counts"] = verdicts(out["relations"])
    return out, pool


def _key(config, workdir: str, entries: list[dict]) -> dict:
    """What the results depend on (`results_key`); results.json recording it is reused."""
    return results_key(config, workdir, entries, lambda e: _sham_missing(workdir, e) is None)


def fingerprint(config, workdir: str) -> dict:
    """The fingerprint `run_geometry` compares with `stage.done` for this config and workdir."""
    return _key(config, workdir, model_pairs(config))


def run_geometry(config, workdir: str) -> dict:
    """Scores every relation in every model pair; writes and returns geometry/results.json.

    {"format", "fingerprint" (what the results depend on), "n_components",
    "plot_n_components", "n_boot", "summary", "largest" (the zoo pair of the largest hidden
    size, or None), "pairs": {name: {"size", ... `study_pair`}}, "trend" (`trend.size_trend`
    at plot_n_components: the pooled structure gain, sham gain and base - distilled against
    log10 parameters over the sizes, slopes with intervals), "trend_by_k" ({str(k): the
    same})}. Figures: cdf.png (loss CDFs, base vs distilled (and sham), per pair and
    relation) and loss_vs_size.png (mean loss, base - distilled, true - shuffled and the
    structure and sham gains with their intervals, per pair and relation, and pooled; the
    trend's fits).
    """
    from xcoder_jax.geometry import plots

    gc = config.geometry
    check_config(gc)
    out_dir = wd.stage_dir(workdir, "geometry")
    entries = model_pairs(config)
    key = _key(config, workdir, entries)
    done = stage.done(out_dir, RESULTS, key, FIGURES)
    if done is not None:
        return done
    relations = relation_sets(gc)
    results = {
        "format": FORMAT,
        "fingerprint": key,
        "n_components": list(gc.n_components),
        "plot_n_components": gc.plot_n_components,
        "n_boot": gc.n_boot,
        "pairs": {},
    }
    pools = {}
    for entry in tqdm(entries, desc="geometry", unit="pair"):
        res, pools[entry["name"]] = study_pair(config, workdir, entry, relations)
        results["pairs"][entry["name"]] = {"size": entry["size"], **res}
    sized = [e for e in entries if e["size"] is not None]
    results["largest"] = max(sized, key=lambda e: e["size"])["name"] if sized else None
    results["trend_by_k"] = {
        str(k): size_trend(results["pairs"], pools, str(k), gc.n_boot) for k in gc.n_components
    }
    results["trend"] = results["trend_by_k"][str(gc.plot_n_components)]
    results["summary"] = summarize(results)
    draw = zip(FIGURES, (plots.plot_cdfs, plots.plot_loss_vs_size), strict=True)
    outputs = {name: lambda p, plot=plot: plot(results, p) for name, plot in draw}
    return stage.commit(out_dir, RESULTS, results, outputs)
