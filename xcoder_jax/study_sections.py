"""The study report's stage sections: analysis, steering, ablation and geometry.

Each takes the stage's results as the stage wrote them (analysis/summary.json, steering/,
ablation/ and geometry/results.json) and returns the section's HTML: its figures (linked),
a compact table of its headline numbers and the latents it used, each linked to the feature
browser with its label (`study_html.Latents`).
"""

from __future__ import annotations

import os
from collections import Counter

from xcoder_jax import selection
from xcoder_jax.errors import ConfigError
from xcoder_jax.lexicon import ANCHORS, CATEGORY_NAMES
from xcoder_jax.study_html import E, Latents, ci, figure, fmt, table

TOP_SHOWN = 10  # top distilled-only latents listed in the analysis section
CATEGORY_SHOWN = 5  # analysis latents listed per category
STEERING_METRICS = ("reflection_rounds", "tokens", "accuracy")
COMPARISONS = (("vs_clean", "vs clean"), ("vs_random_direction", "vs random direction"),
               ("vs_random_latent", "vs random latent"))  # fmt: skip
CATEGORY_HEAD = ["category", "occurrences", "analysis: firing latents (top ones)", "steered",
                 "ablated (every rule and frac)", "in both"]  # fmt: skip
STEERING_HEAD = ["set", "alpha", "comparison", "own category markers /100 tokens",
                 "reflection rounds", "tokens", "accuracy"]  # fmt: skip
ABLATION_HEAD = ["category", "occurrences", "set: latents", "targeted",
                 "targeted − matched random", "targeted − random direction", "distilled − base",
                 "own marker − other tokens"]  # fmt: skip


def category_of(spec: str) -> str | None:
    """The category of a "<category>:<k>[:<rule>]" latent spec, None for an id spec."""
    try:
        parsed = selection.parse_spec(spec)
    except ConfigError:
        return None
    return None if parsed is None else parsed[0]


def selected_latents(steering: dict | None, ablation: dict | None) -> dict[str, dict]:
    """{category: {"steering": ids, "ablation": ids}}: the latents the two stages selected
    for each category (every steered set of the category; every ablated set, all rules and
    fracs), ascending."""
    out = {c: {"steering": set(), "ablation": set()} for c in CATEGORY_NAMES}
    for spec, ids in ((steering or {}).get("sets") or {}).items():
        cat = category_of(spec)
        if cat in out:
            out[cat]["steering"] |= {int(i) for i in ids}
    for cat, entry in ((ablation or {}).get("categories") or {}).items():
        for block in (entry.get("rules") or {}).values():
            for row in block.get("by_frac", []):
                ids = {int(lat["id"]) for lat in row["set"]["latents"]}
                out.setdefault(cat, {"steering": set(), "ablation": set()})["ablation"] |= ids
    return {c: {k: sorted(v) for k, v in d.items()} for c, d in out.items()}


# --- Analysis ------------------------------------------------------------------------------


def kl_headline(s: dict) -> list[tuple[str, list[dict]]]:
    """The behavioural KL rows of the analysis' headline tables (analysis/kl.py): (label,
    [interval dicts of `stats`]); a figure not measured is a dict with only its reason."""
    sp, h = s.get("splice") or {}, s.get("half_step") or {}
    rows = []
    roles = [r for r, v in sp.items() if isinstance(v, dict) and "kl" in v]
    if roles:
        rows.append((f"splice KL(model ‖ spliced), {' / '.join(roles)} [95% CI]",
                     [sp[r]["kl"] for r in roles]))  # fmt: skip
    if "sets" not in h:
        why = h.get("skipped", "not measured (older analysis)")
        return [*rows, ("half-step KL", [{"mean": None, "reason": why}])]
    sets, diff = h["sets"], h.get("distilled_only_minus_random") or {}
    got = lambda d: d.get("fraction_closed") or {"mean": None, "reason": d.get("reason", "–")}
    n = sets.get("distilled_only", {}).get("n_latents", 0)
    return [*rows,
        ("half-step KL(distilled ‖ base continued from block L) [95% CI]", [h["kl_nothing"]]),
        (f"half-step: share of it closed by the {n} distilled-only latents / activity-matched "
         "random sets / the full difference", [got(sets[k]) for k in
                                               ("distilled_only", "random_matched",
                                                "full_difference")]),
        ("half-step share closed: distilled-only − random (paired by document)", [got(diff)]),
    ]  # fmt: skip


def analysis_section(workdir: str, s: dict, lat: Latents, selected: dict, offset: int) -> str:
    splice = s.get("splice") or {}
    recovered = " / ".join(
        f"{E(r)} {fmt(v.get('fraction_recovered'))}"
        for r, v in splice.items()
        if isinstance(v, dict)
    )
    classes = " / ".join(fmt(s.get(f"n_{c}")) for c in ("base_only", "shared", "distilled_only"))
    dead = s.get("n_dead")
    head = [
        ["latents", fmt(s["n_latents"])],
        ["FVE held-out (base / distilled)", " / ".join(fmt(v) for v in s["fve"])],
        ["L0 held-out", fmt(s["l0"], 1)],
        ["dead fraction held-out", fmt(s["dead_fraction"])],
        ["base-only / shared / distilled-only / dead",
         f"{classes} / {fmt(dead) if dead is not None else 'counted as shared (older analysis)'}"],
        ["mean NRN (all / alive)", f"{fmt(s['mean_nrn'])} / {fmt(s.get('mean_nrn_alive'))}"],
        ["splice-in CE recovered", recovered or E(str(splice.get("skipped", "–")))],
        *[[E(k), " / ".join(ci(c) for c in cis)] for k, cis in kl_headline(s)],
    ]  # fmt: skip
    top = [int(i) for i in s.get("top_distilled_only", [])]
    labels = Counter(lat.label(i) or "–" for i in top)
    tally = ", ".join(f"{E(k)} {n}" for k, n in labels.most_common())
    rows = []
    for i in top[:TOP_SHOWN]:
        line = lat.line(i) or {}
        detail = line.get("label_detail") or {}
        token, share = detail.get("token"), fmt(detail.get("token_share"), 2)
        rows.append([lat.link(i), f"<b>{E(lat.label(i) or '–')}</b>", fmt(line.get("nrn")),
                     fmt(line.get("firing_freq"), 4),
                     "–" if token is None else f"{E(repr(token))} ({share})"])  # fmt: skip
    cats = []
    for name, c in (s.get("categories") or {}).items():
        firing = {int(i) for i in c.get("firing_latents", [])}
        sel = selected.get(name, {"steering": [], "ablation": []})
        both = sorted(firing & (set(sel["steering"]) | set(sel["ablation"])))
        analysis = [t["id"] for t in c.get("top_latents", [])]
        cats.append([
            E(name), fmt(c.get("occurrences")),
            f"{len(firing)}: {lat.named_list(analysis, CATEGORY_SHOWN)}",
            lat.named_list(sel["steering"]), lat.named_list(sel["ablation"], CATEGORY_SHOWN),
            lat.named_list(both),
        ])  # fmt: skip
    files = (("nrn.png", "NRN histogram"), ("categories.png", "NRN per category"))
    if all(os.path.exists(os.path.join(workdir, "analysis", f)) for f, _ in files):
        figs = "".join(figure(workdir, f"analysis/{f}", alt) for f, alt in files)
    else:  # an analysis older than its PNG files
        figs = "<p class='muted'>Its figures are inside analysis/report.html.</p>"
    return f"""
<p>The crosscoder's latents by relative decoder norm (NRN: 0 base-only, 1 distilled-only). The
full analysis: <a href="analysis/report.html">analysis/report.html</a>; every latent:
<a href="{E(lat.browser)}">the feature browser</a>.</p>
{table([], head, "head")}
{figs}
<h3>Top distilled-only latents</h3>
<p>Labels of the top {len(top)}: {tally or "none"}.</p>
{table(["id", "label", "NRN", "firing (held-out)", "top token (share)"], rows, "top")}
<h3>Category latents and the latents the experiments selected</h3>
<p>The analysis reads a category's latents at {E(ANCHORS["read"])};
steering and ablation select theirs at offset {offset} from the marker's first token
(<code>selection.fire_offset</code>; -1 is {E(ANCHORS["predict"])}), by specificity or
attribution on the training shards. The two are not necessarily the same latents: the last
column lists those in both (any of the analysis' firing latents).</p>
{table(CATEGORY_HEAD, cats, "categories")}
"""


# --- Steering ------------------------------------------------------------------------------


def steering_section(workdir: str, rel: str, r: dict, lat: Latents) -> str:
    """rel: the steering directory relative to the report ("steering", "no_loop/steering")."""
    desc = r.get("set_descriptions") or {}
    sets = []
    for spec, ids in (r.get("sets") or {}).items():
        d = desc.get(spec) or {}
        sets.append([E(spec), E(str(d.get("rule", "ids"))), lat.named_list(ids),
                     fmt((d.get("nrn") or {}).get("mean"))])  # fmt: skip
    sets += [[E(spec), "", f"not steered: {E(why)}", ""]
             for spec, why in (r.get("skipped_sets") or {}).items()]  # fmt: skip
    rows = []
    for spec, h in (r.get("headline") or {}).items():
        cat = category_of(spec)
        for key, label in COMPARISONS:
            vs = h.get(key) or {}
            own = ci(vs.get(f"{cat}_per_100")) if cat else "–"
            rows.append([E(spec), fmt(h.get("alpha")), label, own,
                         *(ci(vs.get(m)) for m in STEERING_METRICS)])  # fmt: skip
    skipped = "".join(
        f"<li>{E(spec)}: {E(why)}</li>" for spec, why in (r.get("headline_skipped") or {}).items()
    )
    return f"""
<p>Generations of the steered model with each latent set's decoder rows added at block L
(alpha in {E(str(r.get("convention")))} units), paired with the clean model and two random
controls over {fmt(r.get("n_prompts"))} prompts ({fmt(r.get("samples_per_prompt"))} samples
each); mean paired difference with its 95% CI, bold where it excludes 0.</p>
{table(["set", "rule", "latents", "mean NRN"], sets, "sets")}
<h3>Headline: the largest positive alpha</h3>
{table(STEERING_HEAD, rows, "headline")}
{f"<ul>{skipped}</ul>" if skipped else ""}
{figure(workdir, f"{rel}/steering.png", "steering sweep")}
"""


# --- Ablation ------------------------------------------------------------------------------


def ablation_section(workdir: str, r: dict, lat: Latents) -> str:
    from xcoder_jax.ablation.report import HALF_STEP_HEAD, half_step_rows

    roles = r.get("roles") or []
    role = "distilled" if "distilled" in roles else (roles[-1] if roles else "distilled")
    rows, sets = [], []
    for cat, entry in (r.get("categories") or {}).items():
        head = entry.get("headline") or {}
        ids = [lat_["id"] for lat_ in (head.get("set") or {}).get("latents", [])]
        where = f"{E(str(head.get('rule')))} @ {fmt(head.get('frac'), 2)}: {lat.named_list(ids)}"
        e = head.get(role)
        if e is None:
            cells = [f"not measured: {E(str(head.get('reason', 'no targeted set')))}"] + [""] * 4
        else:
            own = (head.get("own_minus_others") or {}).get(role)
            cells = [ci(e.get("targeted")), ci(e.get("targeted_minus_random")),
                     ci(e.get("targeted_minus_direction")), ci(head.get("distilled_minus_base")),
                     ci(own)]  # fmt: skip
        rows.append([E(cat), fmt(entry.get("occurrences")), where, *cells])
        for rule, block in (entry.get("rules") or {}).items():
            sets.append([E(cat), E(rule), *_nested_sets(block.get("by_frac", []), lat)])
    return f"""
<p>The targeted latents of each category removed at block L in each model, on held-out
documents: the change of the log-probability of the marker's first token where it comes next
({E(str(r.get("headline", {}).get("rule")))} sets at frac
{fmt(r.get("headline", {}).get("frac"), 2)}; {E(role)} model; 95% bootstrap CI over documents,
bold where it excludes 0).</p>
{table(ABLATION_HEAD, rows, "headline")}
{figure(workdir, "ablation/ablation.png", "ablation")}
<h3>Half-step KL of the headline sets</h3>
<p>The base model to block L plus a set's share of the reconstruction difference, continued in the
distilled model: the fraction of KL(distilled || base continued) closed, on
{fmt(len((r.get("half_step_kl") or {}).get("documents") or []))} held-out documents, beside
random sets of the same size matched on activity (95% CI over documents).</p>
{table(HALF_STEP_HEAD, half_step_rows(r, ci, E), "half-step")}
<h3>Every ablated set</h3>
<p>Per category and rule, the targeted set at each frac: the top latents of one ranking, so a
smaller frac takes the first ones of a larger frac's set.</p>
{table(["category", "rule", "set size per frac", "latents, in rank order"], sets, "sets")}
"""


def _nested_sets(rows: list[dict], lat: Latents) -> list[str]:
    """[sizes per frac, the largest set's latents] when every set is the first latents of
    the largest (each a top frac of one ranking); else every set listed per frac."""
    sets = [(row["frac"], [int(x["id"]) for x in row["set"]["latents"]]) for row in rows]
    if not sets:
        return ["", "<span class='muted'>none</span>"]
    largest = max((ids for _, ids in sets), key=len)
    sizes = ", ".join(f"{fmt(float(f), 2)}: {len(ids)}" for f, ids in sets)
    if all(ids == largest[: len(ids)] for _, ids in sets):
        return [sizes, lat.named_list(largest)]
    per = "<br>".join(f"frac {fmt(float(f), 2)}: {lat.named_list(ids)}" for f, ids in sets)
    return [sizes, per]


# --- Geometry ------------------------------------------------------------------------------


def _params(n) -> str:
    """A pair's parameter count: one number when its models have the same."""
    if not isinstance(n, dict):
        return fmt(n)
    if len(set(n.values())) == 1:
        return fmt(next(iter(n.values())))
    return " / ".join(f"{E(role)} {fmt(v)}" for role, v in n.items())


def geometry_section(workdir: str, r: dict) -> str:
    from xcoder_jax.geometry.bootstrap import GAINS, gain_formula
    from xcoder_jax.geometry.trend import ordered_pairs

    k = str(r["plot_n_components"])
    rows = []
    for name in ordered_pairs(r["pairs"]):
        p = r["pairs"][name]
        pooled = (p.get("pooled") or {}).get(k) or {}
        gains = [ci(pooled[g]) if pooled.get(g) else E(str(p.get(other, "not measured")))
                 for g, other in GAINS.items()]  # fmt: skip
        rows.append([E(name), _params(p.get("n_params")), fmt(pooled.get("n_relations")),
                     ci(pooled.get("base_minus_distilled")), *gains])  # fmt: skip
    trend = r.get("trend") or {}
    slopes = [["structure gain per decade of parameters", ci(trend.get("slope"))],
              ["sham gain per decade of parameters", ci(trend.get("sham_gain_slope"))]]  # fmt: skip
    gain_heads = [f"{g.replace('_', ' ')}: {gain_formula(g)}" for g in GAINS]
    figs = "".join(figure(workdir, f"geometry/{n}", n) for n in ("loss_vs_size.png", "cdf.png"))
    return f"""
<p>Parallelogram loss of word relations in each model pair's activations (PCA to k = {E(k)}),
pooled over relations; 95% bootstrap CI over word pairs, bold where it excludes 0. Base −
distilled above 0: the distilled model's loss is lower; a gain below 0: the distilled model's
relations beat their shuffled pairings by more than the other model's.</p>
{table(["pair", "parameters", "relations", "base − distilled", *gain_heads], rows, "pairs")}
{table(["trend over sizes", ""], slopes, "trend")}
{figs}
"""
