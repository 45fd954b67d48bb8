"""analysis/report.html: one self-contained page (figures inline as base64 PNG, no scripts).

Figures (drawn in `report_figures` with matplotlib's Agg backend): the NRN histogram, NRN of
each reasoning category's latents beside the alive latents (dead ones have no meaningful NRN),
the decoder cosine of shared latents, and the training curves of metrics.jsonl; the first
three are also written as PNG files beside the page (`FIGURE_FILES`, for the study report).
Tables list the headline numbers, the categories (mean NRN against the alive baseline, with
95% CIs), splice-in CE, latent scaling per side (base-only, distilled-only), and the top
distilled-only and base-only latents with their labels (`labels.latent_label`) and
max-activating contexts (firing token highlighted). Every latent id links to its page in the
feature browser. Every piece of text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os

from xcoder_jax.analysis.groups import groups_html
from xcoder_jax.analysis.report_figures import fig_categories, fig_cosine, fig_nrn, fig_training
from xcoder_jax.fileio import atomic_write_bytes
from xcoder_jax.study_sections import kl_headline

E = html.escape
BROWSER = "browser.html"  # the feature browser, beside this page (`browser.BROWSER`)
# Figures also written as files beside the page: {figure: file name}.
FIGURE_FILES = {"nrn": "nrn.png", "categories": "categories.png", "cosine": "cosine.png"}


def latent_href(i: int, browser: str = BROWSER) -> str:
    """The browser page of latent `i` (`browser.html#latent=<id>` opens any id)."""
    return f"{browser}#latent={int(i)}"


def latent_link(i: int, browser: str = BROWSER) -> str:
    return f'<a href="{E(latent_href(i, browser))}">{int(i)}</a>'


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- HTML --------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;font-size:14px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 7px;
vertical-align:top;text-align:left} th{background:#f4f4f4} td.n{text-align:right}
.ctx{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;display:block;
margin:2px 0;color:#444} mark{background:#ffd54f;color:#000;padding:0 1px}
.muted{color:#888;font-size:12px} img{max-width:100%} .doc0{color:#999}
"""


def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return E(str(v))


def _ci(ci: dict | None, nd: int = 3) -> str:
    """A CI dict of `xcoder_jax.stats` as "mean [lo, hi]", or its reason when missing."""
    if not ci or ci.get("mean") is None:
        return E((ci or {}).get("reason", "–"))
    if ci.get("lo") is None:
        return f"{_fmt(ci['mean'], nd)} <span class='muted'>({E(ci.get('reason', 'no CI'))})</span>"
    return f"{_fmt(ci['mean'], nd)} [{_fmt(ci['lo'], nd)}, {_fmt(ci['hi'], nd)}]"


def _quantiles(q: dict) -> str:
    """Median [p10, p90] (n) of a ratio's quantile dict, or its reason when missing."""
    if q.get("median") is None:
        return E(q.get("reason", "–"))
    return f"{_fmt(q['median'])} [{_fmt(q['p10'])}, {_fmt(q['p90'])}] (n {q['n']})"


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    """Cells are HTML already (escaped by the caller); header names are escaped here."""
    head = "<tr>" + "".join(f"<th>{E(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _context(e: dict, first_position: int = 1) -> str:
    show = lambda s: E(s.replace("\n", "\u21b5 "))
    notes = {0: "[doc start] ", 1: "[doc start; position 0 not stored] "}
    note = notes.get(first_position, f"[doc start; positions < {first_position} not stored] ")
    start = f'<span class="doc0">{note}</span>' if e["doc_start"] else ""
    return (
        f'<span class="ctx">{start}{show(e["left"])}<mark>{show(e["token"])}</mark>'
        f'{show(e["right"])} <span class="muted">({e["activation"]:.3g}, doc {e["doc"]} '
        f"pos {e['position']})</span></span>"
    )


def _latent_table(ids: list[int], kept: dict[int, dict], n_examples: int, first: int) -> str:
    rows = _latent_rows(ids, kept, n_examples, first)
    if not rows:
        return "<p class='muted'>none (no latent of this class fires on held-out rows)</p>"
    head = ["id", "NRN", "freq", "cos", "scaling ratio err / rec", "label / categories",
            "top examples"]  # fmt: skip
    return _table(head, rows)


def _latent_rows(
    ids: list[int], kept: dict[int, dict], n_examples: int, first: int
) -> list[list[str]]:
    rows = []
    for i in ids:
        line = kept.get(i)
        if line is None:
            continue
        sc = line.get("scaling") or {}
        detail, n = line.get("label_detail") or {}, len(line["top_examples"])
        top = (
            f"top token {E(repr(detail['token']))} "
            f"({round(detail.get('token_share', 0) * n)}/{n})<br>"
            if detail.get("token") is not None
            else ""
        )
        rows.append(
            [
                latent_link(i),
                _fmt(line["nrn"]),
                _fmt(line["firing_freq"], 4),
                _fmt(line["cosine"]),
                f"{_fmt(sc.get('ratio_error'))} / {_fmt(sc.get('ratio_reconstruction'))}",
                f"<b>{E(line['label'])}</b><br><span class='muted'>{top}"
                + E(", ".join(line["categories"])) + "</span>",
                "".join(_context(e, first) for e in line["top_examples"][:n_examples]),
            ]
        )  # fmt: skip
    return rows


def _head_rows(s: dict) -> list[list[str]]:
    """The headline table: models, sizes, loss, FVE, L0, dead fraction, classes."""
    models = ", ".join(f"{m.get('role')}: {m.get('source')}" for m in s.get("models") or [])
    return [
        ["models", E(models)],
        ["layer / d_model / latents", f"{s['layer']} / {s['d_model']} / {s['n_latents']}"],
        ["loss", E(str(s.get("loss")))],
        ["FVE (held-out, base / distilled)", " / ".join(_fmt(v) for v in s["fve"])],
        ["L0 (held-out)", _fmt(s["l0"], 1)],
        ["dead fraction (held-out)", _fmt(s["dead_fraction"])],
        ["tokens trained / distinct",
         f"{s.get('tokens_trained')} / {s.get('distinct_tokens_trained')}"],
        ["base-only / shared / distilled-only / dead (no held-out firing)",
         f"{s['n_base_only']} / {s['n_shared']} / {s['n_distilled_only']} / "
         f"{s.get('n_dead', 0)}"],
        ["mean NRN (all / alive)", f"{_fmt(s['mean_nrn'])} / {_fmt(s['mean_nrn_alive'])}"],
        ["alive latents (active on a store row)", f"{s['alive_latents']} of {s['n_latents']}"],
        *[[f"{k} base-only / distilled-only", f"{v['base_only']} / {v['distilled_only']}"]
          for k, v in (s.get("exclusive") or {}).items() if k != "structural_alive"],
        *[[E(k), " / ".join(_ci(c) for c in cis)] for k, cis in kl_headline(s)],
    ]  # fmt: skip


def _category_table(s: dict) -> str:
    cat_rows = []
    for name, c in s["categories"].items():
        markers = "<br>".join(
            f"{E(repr(t))} {E(str(m['token_ids']))}: {m['occurrences']}"
            for t, m in c["markers"].items()
        )
        top = "<br>".join(
            f"#{latent_link(t['id'])} NRN {t['nrn']:.2f} {E(t.get('label', ''))}"
            for t in c["top_latents"][:5]
        )
        td = c["top_distilled_only"]
        top_d = (f"{td['count']} / {td['n_top']} (alive share {_fmt(td['alive_share'])})"
                 f"<br>excess {_ci(td['excess'])}")  # fmt: skip
        name_cell = f"{E(name)}<br><span class='muted'>{c['occurrences']} occurrences</span>"
        cat_rows.append([name_cell, markers, str(c["n_firing_latents"]), _fmt(c["mean_nrn"]),
                         _fmt(c["mean_nrn_alive"]), _ci(c["nrn_minus_alive"]), top_d,
                         top])  # fmt: skip
    cat_head = ["category", "markers (ids): occurrences", "firing latents", "mean NRN",
                "alive baseline", "firing − other alive [95% CI]",
                "distilled-only in top latents", "top latents"]  # fmt: skip
    return _table(cat_head, cat_rows)


def _splice_html(s: dict) -> str:
    sp = s.get("splice", {})
    if "skipped" in sp:
        return f"<p class='muted'>skipped: {E(sp['skipped'])}</p>"
    return _table(
        ["model", "clean CE", "spliced CE", "zero-ablation CE", "fraction recovered", "tokens",
         "KL(model ‖ spliced) [95% CI]"],
        [[E(r), _fmt(v["clean_ce"]), _fmt(v["spliced_ce"]), _fmt(v["zero_ce"]),
          _fmt(v["fraction_recovered"]), str(v["tokens"]), _ci(v.get("kl"), 4)]
         for r, v in sp.items()],
    )  # fmt: skip


def _scaling_table(ls: dict) -> str:
    sc_rows = []
    for side in ("distilled_only", "base_only"):
        q = ls[side]
        sc_rows.append([E(side), str(q["n_latents"]), str(q["n_selected"]), str(q["n_fitted"]),
                        str(q["n_false_exclusive"]), _ci(q["share_false_exclusive"]),
                        _quantiles(q["ratio_error"]),
                        _quantiles(q["ratio_reconstruction"])])  # fmt: skip
    sc_head = ["side", "latents", "selected", "fitted", "flagged", "share flagged",
               "error ratio: median [p10, p90]",
               "reconstruction ratio: median [p10, p90]"]  # fmt: skip
    return _table(sc_head, sc_rows)


def render_html(summary: dict, kept: dict[int, dict], figures: dict[str, str | None]) -> str:
    s = summary
    img = lambda k, alt: (
        f'<img alt="{E(alt)}" src="data:image/png;base64,{figures[k]}">' if figures.get(k) else ""
    )
    ls = s["latent_scaling"]
    n_ex = 3
    first = int(s.get("first_position", 1))
    training = img("training", "training curves") or "<p class='muted'>no metrics.jsonl</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Crosscoder analysis</title>
<style>{CSS}</style></head><body>
<h1>Crosscoder analysis: base vs distilled</h1>
<p class="muted">{E(s.get("workdir", ""))}. Every latent id opens the
<a href="{BROWSER}">feature browser</a> at that latent.</p>
{_table(None, [[E(k), v] for k, v in _head_rows(s)])}
<h2>Shared vs exclusive latents</h2>
{img("nrn", "NRN histogram")}
{img("cosine", "cosine histogram")}
{groups_html(s)}
<h2>Reasoning categories</h2>
<p>Latents active on more than {s.get("firing_share", 0.1):.0%} of the largest number of a
category's marker occurrences any latent is active on (a marker counts at its last token);
their NRN against the {s["alive_latents"]} alive latents (active on at least one store row;
mean NRN {_fmt(s["mean_nrn_alive"])}): the difference of the firing latents' mean NRN and
that of the other alive latents, Welch-t 95% CI; and the distilled-only latents among the
top latents against their share of the alive latents, Wilson 95% CI.</p>
{_category_table(s)}
{img("categories", "NRN per category")}
<h2>Splice-in (held-out documents)</h2>
{_splice_html(s)}
<p>KL at stored positions, 95% bootstrap over documents. Half-step (headline table): the base
model to block L plus a set's share of the difference, Σ f_i (W_dec[i, d] − W_dec[i, b]), the
distilled model's blocks from L on; share closed = 1 − KL(distilled ‖ with the set) /
KL(distilled ‖ with nothing). The full difference adds x̂_distilled − x̂_base.</p>
<h2>Latent scaling of exclusive latents</h2>
<p>Per exclusive latent, the other model's beta over the owning model's (the model with
the larger decoder row), on two targets. Error ratio near 1: the other model carries the
direction but no latent reconstructs it there (complete shrinkage); above
{_fmt(ls["false_ratio"], 2)} the latent is flagged as falsely exclusive. Reconstruction ratio
near 1: other latents reconstruct it there (latent decoupling). Near 0: truly exclusive.</p>
{_scaling_table(ls)}
<h2>Top distilled-only latents</h2>
{_latent_table(s["top_distilled_only"], kept, n_ex, first)}
<h2>Top base-only latents</h2>
{_latent_table(s["top_base_only"], kept, n_ex, first)}
<h2>Training</h2>
{training}
</body></html>
"""


def draw_figures(summary: dict, metrics: str) -> dict[str, str | None]:
    """The page's figures as base64 PNGs ({name: PNG or None}); `metrics`: metrics.jsonl."""
    return {
        "nrn": fig_nrn(summary),
        "categories": fig_categories(summary),
        "cosine": fig_cosine(summary),
        "training": fig_training(read_metrics(metrics)),
    }


def figure_writers(figures: dict[str, str | None]) -> dict:
    """{file name: writer(path)} of the figures of `FIGURE_FILES` (for `stage.commit`)."""

    def writer(data: str):
        def write(path: str) -> None:
            with open(path, "wb") as f:
                f.write(base64.b64decode(data))

        return write

    return {name: writer(figures[k]) for k, name in FIGURE_FILES.items()}


def write_report(
    path: str, summary: dict, kept: dict[int, dict], figures: dict, *, workdir: str = ""
) -> None:
    """Writes the page atomically; `figures` from `draw_figures`."""
    page = render_html({**summary, "workdir": workdir}, kept, figures)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_bytes(path, lambda f: f.write(page.encode("utf-8")))
