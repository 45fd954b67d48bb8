"""analysis/latents.jsonl: one JSON line per latent, written block by block.

A line holds the latent's NRN (ours: 0 base-only, 1 distilled-only, L1 norms by default) and
`dec_norm_diff` (the diffing toolkit's: 1 base-only, 0 distilled-only, L2 norms; see
`norms`) and class, its structural side (a dedicated latent's, else None), decoder norms per
model (normalised units), the cosine of its two decoder rows, firing frequencies, its top
examples with text context, its category tags, an automatic label and, for the base-only and
distilled-only latents given a fit, the latent scaling (`scaling.report`: betas per target,
error and reconstruction ratios; None where the latent was not fitted). Strict JSON (no
NaN). Lines are rendered `block` latents at a time, so a 32768-latent export never has all
its example texts in memory; only the examples of the latents the report shows are kept, and
each line is shown to an `on_line` callback as it is written (the browser keeps what its
table needs). The file is written where the caller says; the analysis stage renders it into
a temporary file in its directory and puts it in place with its other outputs
(`stage.commit`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from xcoder_jax import strict_json as strict
from xcoder_jax.analysis import examples as ex
from xcoder_jax.analysis.facts import LatentFacts
from xcoder_jax.analysis.norms import CLASSES


@dataclass(frozen=True)
class WrittenLatents:
    """What writing latents.jsonl leaves: each latent's label, and the lines of the latents
    the report shows ({id: line})."""

    labels: list[str]
    kept: dict[int, dict]


def _round(values, nd: int = 5) -> list:
    return [round(float(v), nd) for v in values]


def _line(i: int, facts: LatentFacts, extra: dict, *, examples: list[dict], lab: dict) -> dict:
    """Line i; extra: {"tags": {id: categories}, "scaling": {id: latent-scaling line}}."""
    return {
        "id": i,
        "nrn": round(float(facts.nrn[i]), 5),
        "class": CLASSES[facts.classes[i]],
        # A dedicated latent's side by construction (`xcoder_jax.exclusive`), else None.
        "structural": None if facts.structural[i] == 1 else CLASSES[facts.structural[i]],
        "dec_norm_diff": round(float(facts.dec_norm_diff[i]), 5),
        "norms": {"l1": _round(facts.norms_l1[i]), "l2": _round(facts.norms_l2[i])},
        "cosine": round(float(facts.cosine[i]), 5),
        "firing_freq": float(facts.freq_heldout[i]),
        "firing_freq_store": float(facts.freq_store[i]),
        "label": lab["label"],
        "label_detail": {k: v for k, v in lab.items() if k != "label"},
        "categories": extra["tags"].get(i, []),
        "scaling": extra["scaling"].get(i),
        "top_examples": examples,
    }


def write_latents(
    path: str,
    *,
    store,
    facts: LatentFacts,
    tags: dict[int, list[str]],
    scaling: dict[int, dict],
    scan,
    forms: dict[str, list[tuple[int, ...]]],
    tokenizer,
    ac,
    keep: Collection[int],
    on_line: Callable[[dict], None] | None = None,
    block: int = 1024,
) -> WrittenLatents:
    """Writes latents.jsonl to `path`.

    tags: {id: category tags} (`categories.category_stats`); scaling: {id: latent-scaling
    line} (`scaling.report`); scan: the store pass (`top_values`, `top_rows` [n_latents, k]
    from the streaming top-k, row -1: no example); forms: {category: marker id sequences};
    ac: the `analysis` config section (context_before, context_after, label_min_share);
    keep: the latents whose lines are returned. Context windows reach at least as far back
    as the longest marker, so an example's firing token can be checked for being the end of
    a marker.
    """
    longest = max([len(s) for seqs in forms.values() for s in seqs] + [1])
    before = max(ac.context_before, longest - 1)
    extra = {"tags": tags, "scaling": scaling}
    labels: list[str] = []
    kept: dict[int, dict] = {}
    keep = set(int(i) for i in keep)
    with open(path, "wb") as f:
        for lo in range(0, facts.n_latents, block):
            hi = min(lo + block, facts.n_latents)
            rendered = _examples(store, scan, lo, hi, before=before, ac=ac, forms=forms,
                                 tokenizer=tokenizer)  # fmt: skip
            for i, examples in zip(range(lo, hi), rendered):
                lab = ex.label(examples, ac.label_min_share)
                labels.append(lab["label"])
                line = _line(i, facts, extra, examples=examples, lab=lab)
                if i in keep:
                    kept[i] = line
                if on_line is not None:
                    on_line(line)
                f.write((strict.dumps(line) + "\n").encode())
    return WrittenLatents(labels=labels, kept=kept)


def _examples(store, scan, lo: int, hi: int, *, before, ac, forms, tokenizer) -> list[list[dict]]:
    """The rendered top examples of latents lo..hi-1, one list per latent."""
    rows = scan.top_rows[lo:hi]
    valid = rows >= 0
    flat_rows = rows[valid]
    if len(flat_rows):
        windows = ex.gather_windows(store, flat_rows, before, ac.context_after)
        cats = ex.marker_category_at(windows["tokens"], before, forms)
        values = scan.top_values[lo:hi][valid]
        rendered = ex.render(
            windows, values, flat_rows, before, tokenizer=tokenizer, categories=cats
        )
    else:
        rendered = []
    out, start = [], 0
    for n in valid.sum(1):
        out.append(rendered[start : start + n])
        start += n
    return out
