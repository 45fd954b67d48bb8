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
from xcoder_jax.errors import ConfigError, MissingInputError
from xcoder_jax.geometry.bootstrap import (
    GAINS,
    gain_formula,
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
    split_template,
    word_vectors,
)
from xcoder_jax.geometry.trend import ordered_pairs, size_trend
from xcoder_jax.stats import format_ci, sign

FORMAT = 4  # bump when the metric or the results layout changes, to invalidate old results
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


def _tally(cis) -> dict:
    signs = [sign(ci) for ci in cis]  # +1 / -1: the interval lies above / below 0
    return {"above": signs.count(1), "below": signs.count(-1), "undecided": signs.count(0)}


def verdicts(relations: dict) -> dict:
    """Per str(k), over the scored relations of one pair: {"n_relations", "distilled_vs_base":
    {"below", "above", "undecided"}, "true_vs_shuffled": {role: {"below", "above",
    "undecided"}}, "structure_gain": {"below", "above", "undecided"}[, "sham_gain": the
    same]}. Distilled is below base where the base - distilled interval lies above 0, a
    pairing below its control where true - shuffled lies below 0, the distilled model more
    structured than the base (the sham) where the structure (sham) gain lies below 0; an
    interval including 0 or missing (< 3 pairs) is undecided."""
    scored = [r["by_k"] for r in relations.values() if "by_k" in r]
    out = {}
    for k in scored[0] if scored else ():
        gap = _tally(s[k]["base_minus_distilled"] for s in scored)
        roles = scored[0][k]["true_minus_shuffled"]
        out[k] = {
            "n_relations": len(scored),
            "distilled_vs_base": {
                "below": gap["above"],
                "above": gap["below"],
                "undecided": gap["undecided"],
            },
            "true_vs_shuffled": {
                role: _tally(s[k]["true_minus_shuffled"][role] for s in scored) for role in roles
            },
            **{g: _tally(s[k][g] for s in scored) for g in GAINS if g in scored[0][k]},
        }
    return out


def check_config(gc) -> None:
    """Raise a one-line ConfigError (a ValueError) for a geometry config that cannot run."""
    ks = tuple(gc.n_components)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ConfigError(f"geometry.n_components must be distinct positive ints, got {ks}")
    if gc.plot_n_components not in ks:
        raise ConfigError(f"geometry.plot_n_components={gc.plot_n_components} is not in {ks}")
    if gc.n_shuffles < 1 or gc.batch_size < 1 or gc.n_boot < 1:
        raise ConfigError("geometry.n_shuffles, n_boot and batch_size must be positive")
    split_template(gc.template)


def _key(config, workdir: str, entries: list[dict]) -> dict:
    """What the results depend on; results.json recording the same key is reused."""
    zoo_hash = None
    if any(e["zoo"] for e in entries):
        from xcoder_jax.zoo import config_hash

        zoo_hash = config_hash(config)
        path = wd.zoo_report_path(workdir)
        if not os.path.exists(path):
            raise MissingInputError(f"no zoo in {workdir}: build it first (launch/build_zoo.py)")
        with open(path) as f:
            if json.load(f).get("config_hash") != zoo_hash:
                raise ConfigError(f"the zoo in {workdir} was built from another zoo config")
    geometry = config.geometry.to_dict()
    geometry["pairs"] = [dict(p) for p in config.geometry.pairs]
    sham = [e["name"] for e in entries if e["zoo"] and _sham_missing(workdir, e) is None]
    key = {
        "format": FORMAT,
        "geometry": geometry,
        "seed": config.seed,
        "extract_layer": config.extract.layer,
        "zoo_config_hash": zoo_hash,
        "pairs": entries,
        "sham_models": sham,  # a sham built into an existing zoo adds its gain
        "torch_dtype": config.models.torch_dtype,
    }
    return stage.canonical(key)  # tuples become lists, as they come back from disk


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


def summarize(results: dict) -> str:
    """One line at `plot_n_components`: per pair, on how many relations the distilled model
    is below / above the base (mean loss, 95% CI excluding 0) or undecided, on how many each
    model's true pairing is below its shuffled control, the pooled base - distilled,
    structure gain and sham gain (or why there is none), and the two gains' slopes over
    sizes (when there is a trend)."""
    k = str(results["plot_n_components"])
    gap, control, pool, skipped = [], [], [], []
    gains = {g: [] for g in GAINS}
    for name in ordered_pairs(results["pairs"]):
        p = results["pairs"][name]
        skipped += [f"{rel}@{name}" for rel, r in p["relations"].items() if "by_k" not in r]
        c = p["counts"].get(k)
        if c is None:  # no relation scored
            continue
        n, d, t = c["n_relations"], c["distilled_vs_base"], c["true_vs_shuffled"]
        gap.append(
            f"distilled below base (CI excludes 0) on {d['below']}/{n} relations at {name}, "
            f"above on {d['above']}/{n}, undecided {d['undecided']}/{n}"
        )
        control.append(" & ".join(f"{role} {v['below']}/{n}" for role, v in t.items()))
        control[-1] += f" at {name}"
        pool.append(f"{name} {format_ci(p['pooled'][k]['base_minus_distilled'], '{:+.3g}')}")
        for g, other in GAINS.items():
            ci = p["pooled"][k].get(g)
            if ci is None:
                gains[g].append(f"{name} n/a ({p.get(other, 'not measured')})")
                continue
            below = c.get(g, {}).get("below", 0)
            gains[g].append(f"{name} {format_ci(ci, '{:+.3g}')} (below 0 on {below}/{n} relations)")
    line = (
        f"geometry (k={k}, 95% bootstrap CIs over word pairs): " + "; ".join(gap)
        + "; below shuffled control (CI excludes 0): " + ", ".join(control)
        + "; pooled base - distilled mean loss: " + ", ".join(pool)
    )  # fmt: skip
    for g, values in gains.items():
        line += f"; pooled {g.replace('_', ' ')} ({gain_formula(g)}): " + ", ".join(values)
    trend = results.get("trend")
    if trend is not None:
        n = len(trend["pairs"])
        slope = trend["slope"]
        text = format_ci(slope, "{:+.3g}") if slope else f"n/a ({trend['reason']})"
        line += f"; structure gain per decade of parameters over {n} sizes: {text}"
        sham = trend.get("sham_gain_slope")
        text = format_ci(sham, "{:+.3g}") if sham else f"n/a ({trend.get('sham_gain_reason')})"
        m = n - len(trend.get("sham_gain_excluded", {}))
        line += f"; sham gain per decade of parameters over {m} sizes: {text}"
    return line + (f"; skipped (< 2 single-token pairs): {', '.join(skipped)}" if skipped else "")
