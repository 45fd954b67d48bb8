"""<workdir>/report.html: the whole study on one page.

Sections, in the pipeline's order: the analysis (headline numbers, the top distilled-only
latents, each category's latents beside the latents steering and ablation selected), steering,
ablation, geometry, the no-loop pair's steering (when its directory exists) and the declared
family's findings read from this one workdir. Each section reads its stage's results file (the
files `replicate.STAGE_RESULTS` names, as the stage wrote them); a stage that has not run is
one sentence naming its launch script, and a results file the page cannot read is said so in
its section, so the page is written whatever ran.

Every latent id links to its page in the feature browser of the crosscoder it belongs to
(`analysis/browser.html#latent=<id>`; the no-loop pair's own crosscoder under `no_loop/`) and
carries its label (`analysis.labels.latent_label`, recomputed from latents.jsonl so an older
analysis gets it too).

The page is cheap (no figure is drawn, no model loaded) and its bytes depend only on the
workdir's files and the config: the pipeline rewrites it after its last stage.

    path = write_study_report(config, workdir)
    print(summarize_report(path))
"""

from __future__ import annotations

import os
import re

from xcoder_jax import stats
from xcoder_jax import study_sections as sections
from xcoder_jax import workdir as wd
from xcoder_jax.fileio import atomic_write_bytes
from xcoder_jax.study_html import E, Latents, ci, read_json, table

# (section id, title, the script that runs its stage). Figures are LINKED relative to the
# workdir, not embedded: every stage already writes its figures as PNG files beside its
# results, so the page draws nothing, stays small (the figures weigh megabytes), and its links
# keep working when the workdir is moved or copied whole.
STAGES = (
    ("analysis", "Analysis: which latents belong to which model", "launch/analyze.py"),
    ("steering", "Steering: adding latents while the distilled model generates", "launch/steer.py"),
    ("ablation", "Ablation: removing latents before a marker", "launch/ablate.py"),
    ("geometry", "Geometry: word relations across sizes", "launch/geometry.py"),
)
NO_LOOP = ("no_loop", "The no-loop pair's steering (negative control)", "launch/pipeline.py")
FAMILY = ("family", "The declared family, on this one workdir", None)
READ_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;font-size:14px}
h1{font-size:22px} h2{font-size:18px;margin-top:34px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 4px} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 7px;vertical-align:top;text-align:left}
th{background:#f4f4f4} .muted{color:#888;font-size:12px} img{max-width:100%;margin:6px 0}
.lab{color:#6a1b9a;font-size:12px} a.lat{font-family:ui-monospace,monospace}
.status-missing,.status-error{color:#b71c1c} nav li{margin:2px 0}
"""


def _results(workdir: str) -> dict[str, dict | None | Exception]:
    """{family stage name: its results, None when absent, the error when unreadable}."""
    from xcoder_jax.replicate import STAGE_RESULTS

    out = {}
    for name, (stage, filename, pair) in STAGE_RESULTS.items():
        pair_dir = wd.control_pair_dir(workdir) if pair == "no_loop" else workdir
        try:
            out[name] = read_json(os.path.join(wd.stage_dir(pair_dir, stage), filename))
        except (OSError, ValueError) as e:
            out[name] = e
    return out


def _fire_offset(config, results: dict) -> int:
    """`selection.fire_offset` as the steering or ablation run recorded it (the config's
    when neither ran)."""
    for name in ("steering", "ablation"):
        r = results.get(name)
        if isinstance(r, dict):
            off = ((r.get("fingerprint") or {}).get("selection") or {}).get("fire_offset")
            if off is not None:
                return int(off)
    return int(config.selection.fire_offset)


def family_section(results: dict, seed: int) -> str:
    """Each declared finding's estimate and 95% CI in this workdir's results."""
    from xcoder_jax import family

    rows, hits, measured = [], 0, 0
    for f in family.FAMILY:
        c = f.read(results)
        side = stats.sign(c)
        if c is None or c.get("mean") is None:
            reading = "not measured"
        else:
            measured += 1
            hits += side == f.sign
            reading = {f.sign: "excludes 0 on the expected side", -f.sign: "excludes 0 on the "
                       "other side"}.get(side, "includes 0")  # fmt: skip
        rows.append([E(f.claim), "+" if f.sign > 0 else "−", ci(c), reading])
    kind = (
        "exploratory: the seed looked at while the study was built, never pooled"
        if seed in family.EXPLORATORY_SEEDS
        else "one confirmatory seed, shown alone"
    )
    return f"""
<p><b>One seed</b> (seed {seed}; {kind}). The {len(family.FAMILY)} findings of the declared
family (version {family.FAMILY_VERSION}, <code>xcoder_jax/family.py</code>), each read from the
results above: {measured} measured, {hits} with a 95% CI that excludes 0 on the expected side.
Single-seed intervals without multiplicity correction: they confirm nothing. The confirmatory
table pools the confirmatory seeds with Holm's correction over the whole family:
<code>make replicate</code> writes it to replication.md (it also checks every results file
against its config, which this page does not).</p>
{table(["finding", "expected sign", "estimate [95% CI]", "CI"], rows, "family")}
"""


def _sections(config, workdir: str) -> list[tuple[str, str, str, str]]:
    """[(id, title, status, body HTML)]; status "ran", "missing" or "error"."""
    results = _results(workdir)
    share = float(config.analysis.label_min_share)
    main, no_loop = Latents(workdir, "", share), Latents(workdir, "no_loop", share)
    ok = {k: v for k, v in results.items() if isinstance(v, dict)}
    selected = sections.selected_latents(ok.get("steering"), ok.get("ablation"))
    offset = _fire_offset(config, ok)
    draw = {
        "analysis": lambda r: sections.analysis_section(workdir, r, main, selected, offset),
        "steering": lambda r: sections.steering_section(workdir, "steering", r, main),
        "ablation": lambda r: sections.ablation_section(workdir, r, main),
        "geometry": lambda r: sections.geometry_section(workdir, r),
        "steering_no_loop": lambda r: sections.steering_section(
            workdir, "no_loop/steering", r, no_loop
        ),
    }
    stages = [(*s, s[0]) for s in STAGES]
    if os.path.isdir(wd.stage_dir(wd.control_pair_dir(workdir), "steering")):
        stages.append((*NO_LOOP, "steering_no_loop"))
    out = []
    for sid, title, script, name in stages:
        r = results.get(name)
        if r is None:
            out.append((sid, title, "missing", f"<p>Not run yet: {E(script)}.</p>"))
            continue
        try:
            if isinstance(r, Exception):
                raise r
            out.append((sid, title, "ran", draw[name](r)))
        except READ_ERRORS + (OSError,) as e:
            why = f"{type(e).__name__}: {e}"
            body = f"<p>Its results cannot be read ({E(why)}); rerun {E(script)}.</p>"
            out.append((sid, title, "error", body))
    if ok:
        out.append((FAMILY[0], FAMILY[1], "ran", family_section(ok, int(config.seed))))
    return out


def render(config, workdir: str) -> str:
    parts = _sections(config, workdir)
    nav = "".join(
        f'<li><a href="#{sid}">{E(title)}</a>'
        + ("" if status == "ran" else f' <span class="status-{status}">({status})</span>')
        + "</li>"
        for sid, title, status, _ in parts
    )
    body = "".join(
        f'<section id="{sid}" data-status="{status}"><h2>{E(title)}</h2>{html}</section>\n'
        for sid, title, status, html in parts
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Crosscoder study</title>
<style>{CSS}</style></head><body>
<h1>Crosscoder study: what distillation changed inside the model</h1>
<p class="muted">{E(workdir)}, seed {int(config.seed)}. Latent ids open the feature browser
at that latent; the purple text beside an id is its label, from the tokens its top examples
fire on.</p>
<nav><ul>{nav}</ul></nav>
{body}</body></html>
"""


def write_study_report(config, workdir: str) -> str:
    """Writes <workdir>/report.html atomically (whatever stages have run) and returns its
    path. A page already holding the same bytes is left untouched (its mtime too)."""
    path = wd.study_report_path(workdir)
    page = render(config, workdir).encode("utf-8")
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == page:
                return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_bytes(path, lambda f: f.write(page))
    return path


def summarize_report(path: str) -> str:
    """One line naming the sections whose stage ran, e.g. "report.html: analysis, steering,
    ablation, geometry (open runs/x/report.html)"; counts instead of names when the line
    would pass 80 characters."""
    with open(path, encoding="utf-8") as f:
        found = re.findall(r'<section id="([\w-]+)" data-status="(\w+)"', f.read())
    ran = [sid for sid, status in found if status == "ran"]
    line = f"report.html: {', '.join(ran) or 'no stage has run'} (open {path})"
    if len(line) > 80:
        line = f"report.html: {len(ran)}/{len(found)} sections (open {path})"
    return line
