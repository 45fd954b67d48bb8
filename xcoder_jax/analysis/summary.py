"""`analyze`: the content of analysis/summary.json but splice-in (relative decoder norms, one
streaming pass over the store, reasoning categories, latent scaling, held-out FVE, L0 and
dead fraction) and analysis/latents.jsonl, from an export and the store it was trained on.
"""

from __future__ import annotations

import os

import numpy as np

from xcoder_jax import checkpoint as ckpt
from xcoder_jax import strict_json as strict
from xcoder_jax.analysis import categories as cats
from xcoder_jax.analysis import norms, scaling
from xcoder_jax.analysis.latents import LatentTable, write_latents
from xcoder_jax.analysis.stream import scan_store
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import ExportedCrosscoder

LATENTS = "latents.jsonl"


def analyze(
    store,
    tensors,
    export_config,
    ac,
    heldout,
    tokenizer,
    out_dir: str,
    progress: bool = True,
    hist=None,
) -> tuple[dict, dict[int, dict]]:
    """Everything but splice-in and the report: returns (summary, kept latent lines) and
    writes latents.jsonl. Usable on any store/export pair (the benchmark calls it). `hist`
    (a `browser.ActivationHistogram`), when given, is filled during the store pass.

    Raises ConfigError without held-out shards (`train.eval_shards = 0`): FVE, L0, the dead
    fraction and the firing frequencies are measured on held-out rows, and training rows
    are never reported as held-out ones."""
    if not list(heldout):
        raise ConfigError(
            "the store has no held-out shards (train.eval_shards = 0): the analysis measures "
            "FVE, L0, dead latents and firing frequencies on rows the crosscoder was not "
            "trained on; set train.eval_shards >= 1 (and retrain)"
        )
    roles = ckpt.role_order({"models": export_config.get("models") or store.manifest.get("models")})
    base, dist = roles.index("base"), roles.index("distilled")
    w_norm = ckpt.normalised_decoder(tensors, export_config)  # [h, m, d] normalised
    n_l1 = norms.decoder_norms(w_norm, "l1")
    n_l2 = norms.decoder_norms(w_norm, "l2")
    nrn = norms.latent_nrn(w_norm, roles, ac.norm)
    # The NRN bands alone: which latents get a latent-scaling fit is decided before the store
    # pass that tells which latents are dead.
    bands = norms.classify(nrn, ac.base_only_max, ac.distilled_only_min)
    cosine = norms.decoder_cosine(w_norm, base, dist)
    h = len(nrn)

    groups = cats.marker_groups(tokenizer, bare=ac.bare_markers)
    encoder = ExportedCrosscoder(tensors)
    # Base-only and distilled-only latents get a latent-scaling fit, the most extreme of each
    # side first (bounded work per row).
    exclusive, owner = scaling.select_latents(nrn, bands, ac.scaling_max_latents, base, dist)
    scales = np.asarray(export_config["scales"], np.float32)
    fitter = scaling.LatentScaling(
        exclusive, owner, w_norm, tensors["b_dec"] * scales[:, None], scales
    )
    heldout = list(heldout)
    scan = scan_store(
        store,
        encoder,
        groups.groups,
        set(heldout),
        ac.top_k_examples,
        ac.batch_rows,
        scaling=fitter,
        progress=progress,
        hist=hist,
    )
    freq_held = scan.fire_heldout / max(scan.heldout_rows, 1)
    freq_store = scan.fire_count / max(store.n_rows, 1)
    alive = scan.fire_heldout > 0  # held-out: the rows of the FVE and dead fraction
    # Alive for NRN baselines: active on any store row, the rows the categories are read on.
    alive_store = scan.fire_count > 0
    # What every output reports: the NRN band, or dead (never fired on a held-out row).
    classes = norms.classify(nrn, ac.base_only_max, ac.distilled_only_min, alive)

    categories, tags = cats.category_stats(
        groups,
        scan.group_rows,
        scan.group_fire,
        scan.group_act,
        scan.fire_count,
        nrn,
        classes,
        ac.firing_share,
        ac.top_latents,
        ac.nrn_bins,
    )
    # Latent scaling is reported per NRN band: a dead latent of a band was selected (and
    # could not be fitted: it has no held-out row).
    scaling_lines, scaling_summary = scaling.report(
        exclusive,
        owner,
        bands,
        fitter.result(ac.scaling_min_rows),
        {"base": base, "distilled": dist},
        ac.scaling_false_ratio,
        ac.scaling_min_rows,
    )

    # Report tables: the most exclusive latents that fire on held-out rows.
    live = lambda ids: ids[alive[ids]]
    order_d = np.lexsort((-scan.fire_count, -nrn))
    order_b = np.lexsort((-scan.fire_count, nrn))
    top_d = live(order_d[classes[order_d] == 2])[: ac.top_latents]
    top_b = live(order_b[classes[order_b] == 0])[: ac.top_latents]
    keep = set(top_d.tolist()) | set(top_b.tolist())
    for c in categories.values():
        keep |= {t["id"] for t in c["top_latents"]}

    table = LatentTable(
        nrn,
        classes,
        n_l1,
        n_l2,
        cosine,
        freq_held,
        freq_store,
        tags,
        scaling_lines,
        dec_norm_diff=norms.dec_norm_diff(n_l2, base, dist),
    )
    labels, kept = write_latents(
        os.path.join(out_dir, LATENTS),
        store,
        table,
        scan.top_values,
        scan.top_rows,
        groups.forms,
        tokenizer,
        ac.context_before,
        ac.context_after,
        keep,
        ac.label_min_share,
    )
    for c in categories.values():
        for t in c["top_latents"]:
            t["label"] = labels[t["id"]]
            # The firing token in [[...]], for reading the summary without the report.
            t["examples"] = [
                f"{e['left'][-60:]}[[{e['token']}]]{e['right']}"
                for e in kept[t["id"]]["top_examples"][:3]
            ]

    shared = classes == 1
    total_var = store.total_variance
    # A model whose activations never vary has no FVE (None rather than a division by 0).
    fve = [
        1.0 - float(e) / (max(scan.heldout_rows, 1) * float(v)) if v > 0 else None
        for e, v in zip(scan.sq_err, total_var)
    ]
    n_class = lambda mask: {n: int((classes[mask] == k).sum()) for k, n in enumerate(CLASS_KEYS)}
    summary = {
        "models": export_config.get("models"),
        "roles": {"base": base, "distilled": dist},
        "layer": store.layer,
        "d_model": store.d_model,
        "n_latents": h,
        "loss": export_config.get("loss"),
        "store_rows": store.n_rows,
        "first_position": int(store.manifest.get("first_position", 1)),
        "heldout_shards": heldout,
        "heldout_rows": scan.heldout_rows,
        "skipped_rows": scan.skipped_rows,
        "fve": fve,
        "l0": scan.l0_sum / max(scan.heldout_rows, 1),
        "dead_fraction": float(1.0 - alive.mean()),
        "export_eval": strict.finite_or_none(export_config.get("eval")),
        "tokens_trained": export_config.get("tokens_trained"),
        "distinct_tokens_trained": export_config.get("distinct_tokens_trained"),
        "norm": ac.norm,
        "bands": {"base_only_max": ac.base_only_max, "distilled_only_min": ac.distilled_only_min},
        "nrn_hist": norms.histogram(nrn, ac.nrn_bins),
        **{f"n_{k}": v for k, v in n_class(np.ones(h, bool)).items()},
        "alive_heldout": {"n": int(alive.sum()), **n_class(alive)},
        "alive_latents": int(alive_store.sum()),
        "mean_nrn": float(nrn.mean()),
        "mean_nrn_alive": float(nrn[alive_store].mean()) if alive_store.any() else None,
        "nrn_hist_alive": norms.histogram(nrn[alive_store], ac.nrn_bins),
        "cosine_shared": {
            "mean": float(cosine[shared].mean()) if shared.any() else None,
            "median": float(np.median(cosine[shared])) if shared.any() else None,
            "hist": norms.histogram(cosine[shared], 40, -1.0, 1.0),
        },
        "firing_share": ac.firing_share,
        "categories": categories,
        "latent_scaling": scaling_summary,
        "top_distilled_only": top_d.tolist(),
        "top_base_only": top_b.tolist(),
    }
    return summary, kept


CLASS_KEYS = norms.CLASSES
