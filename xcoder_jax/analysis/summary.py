"""`analyze`: the content of analysis/summary.json but splice-in (relative decoder norms, one
streaming pass over the store, reasoning categories, latent scaling, held-out FVE, L0 and
dead fraction) and analysis/latents.jsonl, from an export and the store it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcoder_jax import strict_json as strict
from xcoder_jax.analysis import categories as cats
from xcoder_jax.analysis import norms, scaling
from xcoder_jax.analysis.facts import DecoderFacts, LatentFacts
from xcoder_jax.analysis.groups import group_summary
from xcoder_jax.analysis.latents import write_latents
from xcoder_jax.analysis.stream import ScanResult, scan_store
from xcoder_jax.errors import ConfigError
from xcoder_jax.exported import ExportedCrosscoder
from xcoder_jax.marker_tokens import marker_groups

LATENTS = "latents.jsonl"
CLASS_KEYS = norms.CLASSES


@dataclass(frozen=True)
class Analysis:
    """What `analyze` leaves: summary.json's content but splice-in, the latents.jsonl lines
    of the latents the report shows ({id: line}), and the facts per latent."""

    summary: dict
    kept: dict[int, dict]
    facts: LatentFacts


def analyze(
    store,
    xcoder: ExportedCrosscoder,
    ac,
    *,
    heldout: list[int],
    tokenizer,
    latents_path: str,
    on_line=None,
    progress: bool = True,
    hist=None,
) -> Analysis:
    """Everything but splice-in and the report, from the export (`xcoder`, with its config)
    and the store it was trained on, with the `analysis` config section `ac`; writes
    latents.jsonl to `latents_path` (`latents.write_latents`; `on_line` sees each line).
    Usable on any store/export pair (the benchmark calls it). `hist` (a
    `histogram.ActivationHistogram`), when given, is filled during the store pass.

    Raises ConfigError without held-out shards (`train.eval_shards = 0`): FVE, L0, the dead
    fraction and the firing frequencies are measured on held-out rows, and training rows
    are never reported as held-out ones."""
    if not list(heldout):
        raise ConfigError(
            "the store has no held-out shards (train.eval_shards = 0): the analysis measures "
            "FVE, L0, dead latents and firing frequencies on rows the crosscoder was not "
            "trained on; set train.eval_shards >= 1 (and retrain)"
        )
    heldout = list(heldout)
    w_norm = xcoder.normalised_decoder()  # [h, m, d] normalised
    decoder = DecoderFacts.build(w_norm, xcoder.roles, ac, xcoder.exclusive)
    groups = marker_groups(tokenizer, bare=ac.bare_markers)
    # Exclusive latents get a latent-scaling fit, the most extreme of each side first (bounded
    # work per row); dedicated latents (exclusive by construction) are fitted apart.
    dedicated = decoder.structural != CLASS_KEYS.index("shared")
    exclusive, owner = scaling.select_latents(
        decoder.nrn, decoder.bands, ac.scaling_max_latents, base=decoder.base,
        distilled=decoder.distilled, structural=dedicated,
    )  # fmt: skip
    b_dec = xcoder.b_dec.cpu().numpy() * xcoder.scales[:, None]  # normalised units
    fitter = scaling.LatentScaling(
        exclusive, owner, w_dec=w_norm, b_dec=b_dec, scales=xcoder.scales
    )
    scan = scan_store(
        store, xcoder, groups=groups.groups, heldout=set(heldout), top_k=ac.top_k_examples,
        batch_rows=ac.batch_rows, scaling=fitter, progress=progress, hist=hist,
    )  # fmt: skip
    facts = LatentFacts.measured(decoder, scan, store_rows=store.n_rows, ac=ac)
    categories, tags = cats.category_stats(groups, scan, facts, ac)
    # Latent scaling is reported per NRN band: a dead latent of a band was selected (and
    # could not be fitted: it has no held-out row).
    scaling_lines, scaling_summary = scaling.report(
        exclusive, owner, decoder.bands, fitter.result(ac.scaling_min_rows),
        roles={"base": decoder.base, "distilled": decoder.distilled},
        false_ratio=ac.scaling_false_ratio, min_rows=ac.scaling_min_rows, structural=dedicated,
    )  # fmt: skip
    top = _top_latents(facts, scan, ac)
    keep = set(top["top_distilled_only"]) | set(top["top_base_only"])
    for c in categories.values():
        keep |= {t["id"] for t in c["top_latents"]}
    written = write_latents(
        latents_path, store=store, facts=facts, tags=tags, scaling=scaling_lines, scan=scan,
        forms=groups.forms, tokenizer=tokenizer, ac=ac, keep=keep, on_line=on_line,
    )  # fmt: skip
    for c in categories.values():
        for t in c["top_latents"]:
            t["label"] = written.labels[t["id"]]
            # The firing token in [[...]], for reading the summary without the report.
            t["examples"] = [
                f"{e['left'][-60:]}[[{e['token']}]]{e['right']}"
                for e in written.kept[t["id"]]["top_examples"][:3]
            ]
    summary = {
        **_measured(store, xcoder, scan, facts, heldout=heldout),
        **_nrn_summary(facts, ac),
        **group_summary(xcoder.latent_groups, facts.classes),  # Matryoshka's groups
        "categories": categories,
        "latent_scaling": scaling_summary,
        **top,
    }
    return Analysis(summary=summary, kept=written.kept, facts=facts)


def _top_latents(facts: LatentFacts, scan: ScanResult, ac) -> dict:
    """Report tables: the most exclusive latents of each side that fire on held-out rows
    (most frequent first among equal NRN), at most `top_latents` each."""
    nrn, classes = facts.nrn, facts.classes
    live = lambda ids: ids[facts.alive[ids]]
    order_d = np.lexsort((-scan.fire_count, -nrn))
    order_b = np.lexsort((-scan.fire_count, nrn))
    top_d = live(order_d[classes[order_d] == 2])[: ac.top_latents]
    top_b = live(order_b[classes[order_b] == 0])[: ac.top_latents]
    return {"top_distilled_only": top_d.tolist(), "top_base_only": top_b.tolist()}


def _measured(store, xcoder, scan: ScanResult, facts: LatentFacts, *, heldout) -> dict:
    """The export and store the analysis read, and what the held-out rows measure: FVE per
    model, L0, the dead fraction."""
    config = xcoder.config
    # A model whose activations never vary has no FVE (None rather than a division by 0).
    fve = [
        1.0 - float(e) / (max(scan.heldout_rows, 1) * float(v)) if v > 0 else None
        for e, v in zip(scan.sq_err, store.total_variance)
    ]
    return {
        "models": config.get("models"),
        "roles": {"base": facts.base, "distilled": facts.distilled},
        "layer": store.layer,
        "d_model": store.d_model,
        "n_latents": facts.n_latents,
        "loss": config.get("loss"),
        "store_rows": store.n_rows,
        "first_position": int(store.manifest.get("first_position", 1)),
        "heldout_shards": heldout,
        "heldout_rows": scan.heldout_rows,
        "skipped_rows": scan.skipped_rows,
        "fve": fve,
        "l0": scan.l0_sum / max(scan.heldout_rows, 1),
        "dead_fraction": float(1.0 - facts.alive.mean()),
        "export_eval": strict.finite_or_none(config.get("eval")),
        "tokens_trained": config.get("tokens_trained"),
        "distinct_tokens_trained": config.get("distinct_tokens_trained"),
    }


def _nrn_summary(facts: LatentFacts, ac) -> dict:
    """NRN and classes over all latents, the alive ones, and the decoder cosine of the shared
    latents."""
    nrn, classes, alive, alive_store = facts.nrn, facts.classes, facts.alive, facts.alive_store
    shared = classes == 1
    cosine = facts.cosine
    n_class = lambda mask: {n: int((classes[mask] == k).sum()) for k, n in enumerate(CLASS_KEYS)}
    return {
        "norm": ac.norm,
        "bands": {"base_only_max": ac.base_only_max, "distilled_only_min": ac.distilled_only_min},
        "nrn_hist": norms.histogram(nrn, ac.nrn_bins),
        **{f"n_{k}": v for k, v in n_class(np.ones(facts.n_latents, bool)).items()},
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
        "exclusive": _exclusive_summary(facts),
    }


def _exclusive_summary(facts: LatentFacts) -> dict:
    """Exclusives by construction apart from learned ones, per side: the dedicated latents
    (`xcoder_jax.exclusive`; all, and those alive on held-out rows) and the latents free to
    use both models whose class is that side (base-only or distilled-only NRN, alive)."""
    free = facts.structural == CLASS_KEYS.index("shared")
    out = {"structural": {}, "structural_alive": {}, "learned": {}}
    for side in ("base_only", "distilled_only"):
        held = facts.structural == CLASS_KEYS.index(side)
        out["structural"][side] = int(held.sum())
        out["structural_alive"][side] = int((held & facts.alive).sum())
        out["learned"][side] = int((free & (facts.classes == CLASS_KEYS.index(side))).sum())
    return out
