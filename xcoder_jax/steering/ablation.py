"""The ablation experiment: do a category's distilled-leaning latents predict its markers?

Per reasoning category C and frac: rank all latents by how many of C's marker occurrences in
the store they fire on (read at `fire_offset` from the marker: by default at the position
that predicts it, where the logit is measured), keep the top `frac` share of latents (with
at least one firing) and, of those, the ones with NRN > `ablation.min_nrn` (0.5): the
targeted set S. On held-out
documents of the extraction corpus (the store's held-out shards, re-tokenised), S is ablated
at block L in each model at every position >= 1 (`hooks.ablate`, reconstruction error kept),
and the logit of the marker's first token at the position before each occurrence of one of
C's markers (the logit that predicts the marker) is compared with the clean model's. The
control ablates |S| latents drawn uniformly from all latents, `n_random` seeded draws.

Writes ablation/results.json and ablation/ablation.png.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import workdir as wd
from xcoder_jax.activations import ActivationStore
from xcoder_jax.analysis import check_pair, marker_groups, splice
from xcoder_jax.lexicon import find_marker
from xcoder_jax.steering import common
from xcoder_jax.steering.hooks import ExportedCrosscoder, ablate, site_inputs
from xcoder_jax.train import split_shards

ABLATION_FORMAT = 1  # bump when results change meaning, to redo old runs
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

    Both models' block-L inputs are computed once per batch and reused by every ablation.
    """

    def __init__(self, models, xcoder, docs, batch_size: int, pad_id: int, first_position: int):
        self.models, self.xcoder, self.first = models, xcoder, first_position
        device = next(models[0].parameters()).device
        self.batches = []
        for lo in range(0, len(docs), batch_size):
            ids, mask = splice.pad_documents(docs[lo : lo + batch_size], pad_id, device)
            x = site_inputs(models, xcoder.layer, ids, mask)
            self.batches.append((lo, ids, mask, x))

    @torch.no_grad()
    def logits(self, target: int, latents, where) -> np.ndarray:
        """Logits [n] at `where` [(doc, position, token)] with `latents` ablated in `target`."""
        out = np.zeros(len(where))
        for lo, ids, mask, x in self.batches:
            sel = [k for k, (d, _, _) in enumerate(where) if lo <= d < lo + len(ids)]
            if not sel:
                continue
            # The model is causal: positions after the last one read change nothing before it.
            n = max(where[k][1] for k in sel) + 1
            ids_n, mask_n, x_n = ids[:, :n], mask[:, :n], x[:, :n]
            with ablate(self.models, target, self.xcoder, latents, ids_n, mask_n, self.first, x_n):
                logits = self.models[target](input_ids=ids_n, attention_mask=mask_n).logits
            d = torch.tensor([where[k][0] - lo for k in sel])
            p = torch.tensor([where[k][1] for k in sel])
            t = torch.tensor([where[k][2] for k in sel])
            out[sel] = logits[d, p, t].float().cpu().numpy()
        return out


def _change(probe: LogitProbe, target: int, latents, where, clean: np.ndarray, memo) -> float:
    """Mean logit change at `where` when `latents` are ablated in model `target`."""
    key = (target, tuple(np.asarray(latents).tolist()))
    if key not in memo:  # fracs often select the same set
        memo[key] = float((probe.logits(target, list(key[1]), where) - clean).mean())
    return memo[key]


def _fingerprint(config, workdir: str, store) -> dict:
    return {
        "format": ABLATION_FORMAT,
        "export": common.export_hash(workdir),
        "ablation": config.ablation.to_dict(),
        "norm": config.analysis.norm,
        "bare_markers": config.analysis.bare_markers,
        "store": store.manifest.get("fingerprint"),
        "eval_shards": int(config.train.eval_shards),
        "data": common.digest(config.data.to_dict()),
        "models": common.digest(config.models.to_dict()),
    }


def run_ablation(config, workdir: str) -> dict:
    """The ablation experiment on `workdir`'s export; returns (and writes) ablation/results.json."""
    ac = config.ablation
    out_dir = wd.stage_dir(workdir, "ablation")
    paths = [os.path.join(out_dir, n) for n in (RESULTS, FIGURE)]
    store = ActivationStore(wd.activations_dir(workdir), verify=config.train.verify_store)
    tensors, export_config = ckpt.load_export(wd.export_dir(workdir), "numpy")
    check_pair(store, export_config)
    fp = _fingerprint(config, workdir, store)
    old = common.done(paths[0], fp, paths[1:])
    if old is not None:
        return old
    start = time.time()
    roles = common.role_order(export_config)
    models, tokenizer = common.load_pair(config, workdir, roles)
    device = next(models[0].parameters()).device
    xcoder = ExportedCrosscoder(tensors, export_config, device)
    nrn = common.nrn(tensors, export_config, config.analysis.norm)
    h = len(nrn)
    cats = list(ac.categories)

    _, heldout = split_shards(store, config.train.eval_shards)
    stored, n_cut = splice.heldout_documents(store, heldout or [len(store.shards) - 1], ac.n_docs)
    docs = splice.rebuild_documents(config.data, workdir, tokenizer, stored)
    docs = [d[: config.data.max_tokens] for d in docs]
    first = int(store.manifest.get("first_position", 1))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probe = LogitProbe(models, xcoder, docs, ac.batch_size, pad_id, first)
    forms = marker_groups(tokenizer, bare=config.analysis.bare_markers).forms
    counts = common.marker_counts(store, xcoder, forms, cats, ac.fire_offset)

    results = {
        "fingerprint": fp,
        "roles": roles,
        "fracs": [float(f) for f in ac.fracs],
        "n_random": ac.n_random,
        "n_docs": len(docs),
        "docs_partly_trained": n_cut,
        "measure": "mean change of the marker's first-token logit at the position before "
        "each marker occurrence (ablated - clean)",
        "random": "latents drawn uniformly without replacement from all latents",
        "categories": {},
    }
    rng = np.random.default_rng(ac.seed)
    for c, cat in enumerate(cats):
        where = marker_positions(docs, forms[cat], first)
        entry = {"occurrences": len(where), "by_frac": []}
        results["categories"][cat] = entry
        if not where:
            continue
        clean = [probe.logits(m, [], where) for m in range(len(models))]
        memo: dict = {}
        entry["clean_logit"] = {r: float(clean[m].mean()) for m, r in enumerate(roles)}
        for frac in results["fracs"]:
            ids = targeted_latents(counts[c], nrn, frac, ac.min_nrn)
            row = {"frac": frac, "n_latents": len(ids), "latents": ids.tolist()}
            draws = [rng.choice(h, len(ids), replace=False) for _ in range(ac.n_random)]
            for m, role in enumerate(roles):
                if len(ids) == 0:
                    row[role] = {"targeted": 0.0, "random": 0.0, "random_draws": []}
                    continue
                rand = [_change(probe, m, s, where, clean[m], memo) for s in draws]
                row[role] = {
                    "targeted": _change(probe, m, ids, where, clean[m], memo),
                    "random": float(np.mean(rand)),
                    "random_draws": rand,
                }
            entry["by_frac"].append(row)
    results["seconds"] = round(time.time() - start, 1)
    os.makedirs(out_dir, exist_ok=True)
    plot_ablation(results, paths[1])
    common.write_json(paths[0], results)
    return json.loads(json.dumps(results))


def plot_ablation(results: dict, path: str) -> None:
    """Targeted vs random logit change against frac, one panel per category and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(results["categories"])
    roles = results["roles"]
    fig, axes = plt.subplots(
        len(roles), max(len(cats), 1), figsize=(3.2 * max(len(cats), 1), 2.8 * len(roles)),
        squeeze=False,
    )  # fmt: skip
    for j, cat in enumerate(cats):
        rows = results["categories"][cat]["by_frac"]
        for i, role in enumerate(roles):
            ax = axes[i, j]
            if rows:
                fr = [r["frac"] for r in rows]
                ax.plot(fr, [r[role]["targeted"] for r in rows], "o-", label="targeted")
                rand = [r[role]["random"] for r in rows]
                spread = [np.ptp(r[role]["random_draws"] or [0.0]) / 2 for r in rows]
                ax.errorbar(fr, rand, yerr=spread, fmt="s--", capsize=3, label="random")
                ax.set_xscale("log")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{cat} ({role})", fontsize=9)
            ax.set_xlabel("frac")
            if j == 0:
                ax.set_ylabel("marker logit change")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def summarize_ablation(results: dict, frac: float = 0.1) -> str:
    """One line: targeted vs random logit change per category at `frac` (distilled model)."""
    role = "distilled" if "distilled" in results["roles"] else results["roles"][-1]
    parts, wins, n = [], 0, 0
    for cat, entry in results["categories"].items():
        row = next((r for r in entry["by_frac"] if abs(r["frac"] - frac) < 1e-9), None)
        if row is None or not row["n_latents"]:
            continue
        t, r = row[role]["targeted"], row[role]["random"]
        wins, n = wins + (t < r), n + 1
        parts.append(f"{cat} {t:+.2f} vs {r:+.2f}")
    if not parts:
        return f"ablation: no category had targeted latents at frac {frac}"
    return (
        f"ablation at frac {frac} ({role}, targeted vs random logit change): "
        + ", ".join(parts)
        + f"; targeted lower in {wins}/{n}"
    )
