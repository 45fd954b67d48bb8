"""The geometry study: every relation in every model pair, written to geometry/.

Pairs are every size of the zoo (when the models are the zoo) or the configured pair, plus
`geometry.pairs`. Results recording the same key (geometry config, seed, layer, zoo config
hash or model ids) are reused; figures are written before results.json, each through a
temporary file and a rename, so a results.json on disk always belongs to complete outputs.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
from tqdm import tqdm

from xcoder_jax import site
from xcoder_jax import workdir as wd
from xcoder_jax.geometry.metric import derangements, relation_scores
from xcoder_jax.geometry.relations import (
    Pair,
    RelationError,
    filter_relation,
    relation_sets,
    split_template,
    word_vectors,
)

FORMAT = 1  # bump when the metric or the results layout changes, to invalidate old results
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
        raise ValueError(f"the studied model pairs need distinct names, got {names}")
    return entries


def _load_pair(config, workdir: str, entry: dict):
    """(tokenizer, {role: () -> model}); real models load one at a time (memory)."""
    if entry["zoo"]:
        from xcoder_jax.zoo import load_pair

        base, distilled, tok = load_pair(workdir, entry["size"])
        return tok, {"base": lambda: base, "distilled": lambda: distilled}
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


def study_pair(config, workdir: str, entry: dict, relations: dict[str, list[Pair]]) -> dict:
    """One model pair: {"layer", "n_layers", "d_model", "relations": {name: {"kept",
    "total", "models": {role: relation_scores(...)}}}}. A relation keeping fewer than 2
    single-token pairs has "skipped" (the reason) instead of "models"."""
    gc = config.geometry
    tokenizer, loaders = _load_pair(config, workdir, entry)
    rels, out = [], {"relations": {}}
    for name, pairs in relations.items():
        try:
            rels.append(filter_relation(name, pairs, tokenizer, gc, config.seed))
        except RelationError as e:  # recorded; another tokenizer may cover the relation
            out["relations"][name] = {"kept": e.kept, "total": e.total, "skipped": str(e)}
    if not rels:
        raise ValueError(f"{entry['name']}: no relation keeps 2 single-token pairs")
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
            raise ValueError(f"{entry['name']}: the two models have different depths")
        vectors[role] = word_vectors(model, [prompts[w] for w in words], layer, gc.batch_size)
        out.update(layer=layer, n_layers=n_layers, d_model=int(vectors[role].shape[1]))
        del model
    for r in rels:
        ia, ib = [row[a] for a, _ in r.pairs], [row[b] for _, b in r.pairs]
        # Seeded per relation, so every pair and both models see the same shuffles.
        rng = np.random.default_rng([config.seed, zlib.crc32(r.name.encode())])
        shuffles = derangements(len(r.pairs), gc.n_shuffles, rng)
        ks = tuple(gc.n_components)
        out["relations"][r.name] = {
            "kept": r.kept,
            "total": r.total,
            "models": {
                role: relation_scores(v[ia], v[ib], ks, shuffles) for role, v in vectors.items()
            },
        }
    out["relations"] = {name: out["relations"][name] for name in relations}  # set order
    return out


def check_config(gc) -> None:
    """Raise a one-line ValueError for a geometry config that cannot run."""
    ks = tuple(gc.n_components)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"geometry.n_components must be distinct positive ints, got {ks}")
    if gc.plot_n_components not in ks:
        raise ValueError(f"geometry.plot_n_components={gc.plot_n_components} is not in {ks}")
    if gc.n_shuffles < 1 or gc.batch_size < 1:
        raise ValueError("geometry.n_shuffles and geometry.batch_size must be positive")
    split_template(gc.template)


def _key(config, workdir: str, entries: list[dict]) -> dict:
    """What the results depend on; results.json recording the same key is reused."""
    zoo_hash = None
    if any(e["zoo"] for e in entries):
        from xcoder_jax.zoo import config_hash

        zoo_hash = config_hash(config)
        path = wd.zoo_report_path(workdir)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no zoo in {workdir}: build it first (launch/build_zoo.py)")
        with open(path) as f:
            if json.load(f).get("config_hash") != zoo_hash:
                raise ValueError(f"the zoo in {workdir} was built from another zoo config")
    geometry = config.geometry.to_dict()
    geometry["pairs"] = [dict(p) for p in config.geometry.pairs]
    key = {
        "format": FORMAT,
        "geometry": geometry,
        "seed": config.seed,
        "extract_layer": config.extract.layer,
        "zoo_config_hash": zoo_hash,
        "pairs": entries,
        "torch_dtype": config.models.torch_dtype,
    }
    return json.loads(json.dumps(key))  # tuples become lists, as they come back from disk


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _dump(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def run_geometry(config, workdir: str) -> dict:
    """Scores every relation in every model pair; writes and returns geometry/results.json.

    {"format", "key", "n_components", "plot_n_components", "summary", "pairs": {name:
    {"size", "layer", "n_layers", "d_model", "relations": {relation: {"kept", "total",
    "models": {role: {str(k): scores}}}}}}}, the scores of `metric.relation_scores`.
    Figures: cdf.png (loss CDFs, base vs distilled, per pair and relation) and
    loss_vs_size.png (mean loss per pair, per relation).
    """
    from xcoder_jax.geometry import plots

    gc = config.geometry
    check_config(gc)
    out_dir = wd.stage_dir(workdir, "geometry")
    path = os.path.join(out_dir, RESULTS)
    entries = model_pairs(config)
    key = _key(config, workdir, entries)
    if os.path.exists(path) and all(os.path.exists(os.path.join(out_dir, f)) for f in FIGURES):
        with open(path) as f:
            done = json.load(f)
        if done.get("key") == key:
            return done
    relations = relation_sets(gc)
    results = {
        "format": FORMAT,
        "key": key,
        "n_components": list(gc.n_components),
        "plot_n_components": gc.plot_n_components,
        "pairs": {},
    }
    for entry in tqdm(entries, desc="geometry", unit="pair"):
        res = study_pair(config, workdir, entry, relations)
        results["pairs"][entry["name"]] = {"size": entry["size"], **res}
    results["summary"] = summarize(results)
    os.makedirs(out_dir, exist_ok=True)
    for name, plot in zip(FIGURES, (plots.plot_cdfs, plots.plot_loss_vs_size), strict=True):
        _write_atomic(os.path.join(out_dir, name), lambda p, plot=plot: plot(results, p))
    _write_atomic(path, lambda p: _dump(results, p))  # last: marks the stage complete
    return results


def summarize(results: dict) -> str:
    """One line: per pair, on how many relations the distilled model is more structured
    (lower mean loss) than the base, and how many relations beat their shuffled control."""
    k = str(results["plot_n_components"])
    lower, beat, skipped = [], [], []
    for name, p in results["pairs"].items():
        scored = {rel: r["models"] for rel, r in p["relations"].items() if "models" in r}
        skipped += [f"{rel}@{name}" for rel in p["relations"] if rel not in scored]
        scores = [(m["base"][k], m["distilled"][k]) for m in scored.values()]
        n = len(scores)
        lower.append(f"{name} {sum(d['mean'] < b['mean'] for b, d in scores)}/{n}")
        wins = [sum(s["mean"] < s["control_mean"] for s in col) for col in zip(*scores)]
        beat.append(f"{name} {wins[0]}/{n} & {wins[1]}/{n}")
    line = (
        f"geometry (k={k}): distilled < base on " + ", ".join(lower)
        + " relations; below shuffled control (base & distilled): " + ", ".join(beat)
    )  # fmt: skip
    return line + (f"; skipped (< 2 single-token pairs): {', '.join(skipped)}" if skipped else "")
