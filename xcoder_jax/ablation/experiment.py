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
import torch
from tqdm import tqdm

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import selection, site, stage, stats
from xcoder_jax import workdir as wd
from xcoder_jax.ablation import controls
from xcoder_jax.activations.models import load_pair
from xcoder_jax.analysis import load_inputs, marker_groups, splice
from xcoder_jax.errors import ConfigError, XcoderError
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.lexicon import find_marker
from xcoder_jax.train import split_shards

ABLATION_FORMAT = 3  # bump when results change meaning, to redo old runs
RESULTS, FIGURE = "results.json", "ablation.png"


def targeted_latents(counts: np.ndarray, nrn: np.ndarray, frac: float, min_nrn: float):
    """Ids in the top `frac` of latents by marker firing count (count > 0) with NRN > min_nrn."""
    top = np.argsort(-counts, kind="stable")[: max(1, math.ceil(frac * len(counts)))]
    top = top[counts[top] > 0]
    return np.sort(top[nrn[top] > min_nrn])


def marker_positions(docs: list[np.ndarray], forms, first_position: int):
    """[(doc, position before the marker, marker's first token id)] of every occurrence."""
    out = []
    for d, ids in enumerate(docs):
        for form in forms:
            for s in find_marker(ids, form):
                if s - 1 >= first_position:
                    out.append((d, int(s) - 1, int(form[0])))
    return out


class LogitProbe:
    """Marker logits of both models on fixed documents, clean and under ablation.

    Each batch is run once per model (`site.SiteReplay`); an ablation then reruns only the
    blocks from L on, from the recorded block-L input less the ablated latents' contribution
    (the same intervention as `hooks.ablate`, reconstruction error kept).
    """

    def __init__(self, models, xcoder, docs, batch_size: int, pad_id: int, first_position: int):
        self.xcoder, self.first, self.n_models = xcoder, first_position, len(models)
        device = next(models[0].parameters()).device
        self.batches = []
        for lo in range(0, len(docs), batch_size):
            ids, mask = splice.pad_documents(docs[lo : lo + batch_size], pad_id, device)
            replays = [site.SiteReplay.record(m, xcoder.layer, ids, mask) for m in models]
            x = torch.stack([r.hidden.float() for r in replays], 2)  # [b, s, m, d] raw
            self.batches.append((lo, len(ids), replays, x))

    def _in_batches(self, where):
        """Per batch: (its replays, x, indices into `where` [k], rows [k], positions [k],
        tokens [k]) of the occurrences it holds; batches holding none are left out."""
        for lo, n, replays, x in self.batches:
            sel = [k for k, (d, _, _) in enumerate(where) if lo <= d < lo + n]
            if sel:
                d, p, t = (torch.tensor([where[k][i] for k in sel]) for i in range(3))
                yield replays, x, sel, d - lo, p, t

    @torch.no_grad()
    def logits(self, target: int, latents, where) -> np.ndarray:
        """Logits [n] at `where` [(doc, position, token)] with `latents` ablated in `target`."""
        out = np.zeros(len(where))
        for replays, x, sel, d, p, t in self._in_batches(where):
            hidden = replays[target].hidden
            if len(latents):
                delta = self.xcoder.ablation_delta(x, latents, target)
                hidden = hidden.clone()
                hidden[:, self.first :] -= delta[:, self.first :].to(hidden.dtype)
            logits = replays[target].logits(hidden, d, p)
            out[sel] = logits[torch.arange(len(sel)), t].float().cpu().numpy()
        return out

    @torch.no_grad()
    def latent_acts(self, where) -> np.ndarray:
        """f [n, h] of every latent at `where` [(doc, position, token)] (clean inputs)."""
        out = np.zeros((len(where), self.xcoder.n_latents), np.float32)
        all_ids = list(range(self.xcoder.n_latents))
        for _, x, sel, d, p, _ in self._in_batches(where):
            out[sel] = self.xcoder.latent_acts(x[d, p], all_ids).cpu().numpy()
        return out


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
    train, heldout = split_shards(store, config.train.eval_shards)
    stored = measurement_documents(store, config, heldout)
    models, tokenizer = load_pair(config, workdir, roles)
    device = next(models[0].parameters()).device
    xcoder = ExportedCrosscoder(tensors, export_config, device)
    nrn = selection.export_nrn(tensors, export_config, config.analysis.norm)
    dec_norms = np.linalg.norm(np.asarray(tensors["W_dec"], np.float64), axis=-1)  # [h, m] raw
    cats = list(ac.categories)

    doc_ids = sorted(stored)
    docs = splice.rebuild_documents(config.data, workdir, tokenizer, stored)
    docs = [d[: config.data.max_tokens] for d in docs]
    first = int(store.manifest.get("first_position", 1))
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
        where = marker_positions(docs, forms[cat], first)
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
        probe = LogitProbe(models, xcoder, [docs[d] for d in held], ac.batch_size, pad_id, first)
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


def _series(rows, role: str, key: str):
    """(fracs, means, [lower errors, upper errors]) of the computed CIs `key` in `rows`."""
    got = [(r["frac"], r[role][key]) for r in rows if role in r and r[role][key]["lo"] is not None]
    fr = [g[0] for g in got]
    mean = [g[1]["mean"] for g in got]
    err = [[g[1]["mean"] - g[1]["lo"] for g in got], [g[1]["hi"] - g[1]["mean"] for g in got]]
    return fr, mean, err


def plot_ablation(results: dict, path: str) -> None:
    """Targeted, matched and uniform random logit change (95% CI) against frac, one panel per
    category and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(results["categories"])
    roles = results["roles"]
    fig, axes = plt.subplots(
        len(roles), max(len(cats), 1), figsize=(3.2 * max(len(cats), 1), 2.8 * len(roles)),
        squeeze=False,
    )  # fmt: skip
    styles = [("targeted", "o-"), ("matched_random", "s--"), ("uniform_random", "^:")]
    for j, cat in enumerate(cats):
        rows = results["categories"][cat]["by_frac"]
        for i, role in enumerate(roles):
            ax = axes[i, j]
            for key, fmt in styles:
                fr, mean, err = _series(rows, role, key)
                if fr:
                    ax.errorbar(fr, mean, yerr=err, fmt=fmt, capsize=3, label=key.replace("_", " "))
            if len(results["fracs"]) > 1:
                ax.set_xscale("log")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{cat} ({role})", fontsize=9)
            ax.set_xlabel("frac")
            if j == 0:
                ax.set_ylabel("marker logit change")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7)
    fig.suptitle("Ablation on held-out documents: mean and 95% CI", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summarize_ablation(results: dict, frac: float = 0.1) -> str:
    """One line: per category at `frac` (distilled model), targeted vs matched random logit
    change and how many categories have targeted - matched below 0 with its CI excluding 0."""
    role = "distilled" if "distilled" in results["roles"] else results["roles"][-1]
    parts, wins, n = [], 0, 0
    for cat, entry in results["categories"].items():
        row = next((r for r in entry["by_frac"] if abs(r["frac"] - frac) < 1e-9), None)
        if row is None or role not in row:
            continue
        e = row[role]
        diff = e["targeted_minus_matched"]
        wins, n = wins + (stats.sign(diff) < 0), n + 1
        t, m = stats.format_ci(e["targeted"]), stats.format_ci(e["matched_random"])
        parts.append(f"{cat} {t} vs matched {m}")
    if not parts:
        return f"ablation: no category had targeted latents at frac {frac}"
    return (
        f"ablation at frac {frac} ({role}, held-out marker logit change, targeted vs "
        "activity-matched random): "
        + "; ".join(parts)
        + f"; targeted below matched (95% CI) in {wins}/{n}"
    )
