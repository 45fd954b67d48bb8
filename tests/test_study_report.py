"""The study report (report.html) on synthetic stage results, and the latent labels."""

from __future__ import annotations

import html
import json
import os
import re

import pytest

from tests.test_analysis import CHROMIUM, _dump_dom, synthetic_browser_data
from xcoder_jax import workdir as wd
from xcoder_jax.analysis.browser import write_browser
from xcoder_jax.analysis.examples import label
from xcoder_jax.analysis.labels import latent_label, token_group
from xcoder_jax.study_report import summarize_report, write_study_report

# --- Labels --------------------------------------------------------------------------------


def _ex(*tokens, marker=None) -> list[dict]:
    return [{"token": t, "marker": marker} for t in tokens]


def test_token_groups():
    assert token_group("7") == token_group(" 42") == "digit"
    assert token_group(".") == "full stop" and token_group(" +") == "plus sign"
    assert token_group(" ") == "space" and token_group("\n\n") == "newline"
    assert token_group(" Wait") == "marker ' Wait'"  # a lexicon marker word
    assert token_group("Wait") == "marker 'Wait'"  # bare, as at the start of a line
    assert token_group("atively", marker="alternative") == "marker 'atively'"  # ends one
    assert token_group(" wait") == "word ' wait'"  # markers are case-sensitive
    assert token_group(" apples") == "word ' apples'"
    assert token_group("→") == "symbol '→'"


def test_latent_label_on_hand_made_examples():
    # Digits: at least min_share of the examples fire on a digit token.
    assert latent_label(_ex("7", "3", "12", "7", "0", " x", " y", ".", ":", " "), 0.5) == "digit"
    four = _ex("7", "3", "12", "7", " x", " y", ".", ":", " ", ",")
    assert latent_label(four, 0.5) == "mixed"  # 4/10 digits, nothing else holds half
    assert latent_label(four, 0.4) == "digit"
    assert latent_label(_ex(*["."] * 10)) == "full stop"
    assert latent_label(_ex(*[" Wait"] * 6, *"1234", marker="self_reflection")) == (
        "marker ' Wait'"
    )
    assert latent_label(_ex(*[" apples"] * 6, " pears", "3", ".", ":")) == "word ' apples'"
    # No one group holds half: a category's markers together, or words together, do.
    assert latent_label(_ex(*[" Therefore"] * 3, *[" Thus"] * 3, *"1234")) == "deductive markers"
    books = _ex(" books", " books", " books", " pens", " pens", " toys", "7", "8", ".", ".")
    assert latent_label(books) == "words ' books', ' pens'"
    assert latent_label([]) == "never fires"
    # The analysis' label: this rule, with the dominant token beside it.
    got = label(_ex("5", "5", "6", " x"), 0.5)
    assert got == {"label": "digit", "token": "5", "token_share": 0.5}


# --- A workdir of synthetic stage results --------------------------------------------------

N_LATENTS = 1500
LABELLED = {  # latent id -> its top examples
    1234: _ex(*"767676", " apples", " pears", ".", ":"),  # digit (past row 1,000)
    17: _ex(*[" Wait"] * 8, ".", ".", marker="self_reflection"),  # marker ' Wait'
    40: _ex(*["."] * 10),  # full stop
    458: _ex(*"0123456789"),  # digit
    907: _ex(" toys", " toys", " toys", " toys", " books", " books", " pens", "1", "2", "."),
    5: _ex(*["."] * 10),
}


def _ci(mean, lo, hi, n=50) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "method": "synthetic"}


UNREACHABLE = "a model's random control at matched activity is unreachable"
NOT_MEASURED = {"mean": None, "lo": None, "hi": None, "n": 0, "method": "not measured",
                "reason": UNREACHABLE}  # fmt: skip


def _write_json(path, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _latents(path, n: int, labelled: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            exs = labelled.get(i, _ex(" x"))
            f.write(json.dumps({"id": i, "nrn": 0.5, "class": "shared", "firing_freq": 0.01,
                                "label": "old label", "top_examples": exs,
                                "label_detail": {"token": exs[0]["token"], "token_share": 0.6}})
                    + "\n")  # fmt: skip


def _png(path) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)


def _steering(sets: dict) -> dict:
    head = {
        "vs_clean": {"tokens": _ci(36.9, 11.0, 62.7)},
        "vs_random_direction": {"tokens": _ci(62.7, 38.3, 87.1),
                                "reflection_rounds": _ci(1.22, 0.741, 1.7),
                                "self_reflection_per_100": _ci(0.113, -0.0396, 0.266)},
        "vs_random_latent": {"tokens": _ci(-42.8, -74.4, -11.3)},
    }  # fmt: skip
    return {
        "n_prompts": 50, "samples_per_prompt": 4, "convention": "norm", "sets": sets,
        "set_descriptions": {s: {"rule": "specificity", "nrn": {"mean": 0.95}} for s in sets},
        "skipped_sets": {"verification:2": "only 1 latents with NRN > 0.5 pass the rule"},
        "headline": {s: {"alpha": 0.4, **head} for s in sets}, "headline_skipped": {},
        "fingerprint": {"selection": {"fire_offset": -1}},
    }  # fmt: skip


def _ablation() -> dict:
    sr = {
        "occurrences": 17,
        "rules": {"specificity": {"by_frac": [
            {"frac": 0.5, "set": {"latents": [{"id": 1234}, {"id": 17}]}},
            {"frac": 0.1, "set": {"latents": [{"id": 1234}]}}]}},
        "headline": {
            "rule": "specificity", "frac": 0.1, "set": {"latents": [{"id": 1234}]},
            "distilled": {"targeted": _ci(-0.0101, -0.027, 0.0183),
                          "targeted_minus_random": _ci(-0.0179, -0.0443, 0.0114),
                          "targeted_minus_direction": _ci(-0.203, -0.386, -0.0623)},
            "distilled_minus_base": NOT_MEASURED,
            "own_minus_others": {"distilled": _ci(0.436, 0.115, 1.06)}},
    }  # fmt: skip
    why = "no latent passes the specificity rule with NRN > 0.5"
    empty = {"latents": []}
    ded = {"occurrences": 0, "rules": {"specificity": {"by_frac": [
        {"frac": f, "set": empty, "reason": why} for f in (0.5, 0.1)]}},
        "headline": {"rule": "specificity", "frac": 0.1, "set": empty, "reason": why}}  # fmt: skip
    closed = lambda *v: {"kl": _ci(0.5, 0.4, 0.6), "fraction_closed": _ci(*v)}
    half = {"documents": [3, 4, 5], "categories": {
        "self_reflection": {"n_latents": 1, "latents": [1234], "set": closed(0.12, 0.05, 0.2),
                            "random": closed(0.01, -0.01, 0.03),
                            "minus_random": closed(0.11, 0.04, 0.19)},
        "deductive": {"n_latents": 0, "reason": why}}}  # fmt: skip
    return {"roles": ["base", "distilled"], "fracs": [0.5, 0.1],
            "headline": {"rule": "specificity", "frac": 0.1},
            "categories": {"self_reflection": sr, "deductive": ded},
            "half_step_kl": half}  # fmt: skip


def _geometry() -> dict:
    def pair(size, gain):
        pooled = {"n_relations": 5, "base_minus_distilled": _ci(-0.0261, -0.0901, 0.0394),
                  "structure_gain": _ci(gain, gain - 0.07, gain + 0.06),
                  "sham_gain": _ci(0.0776, -0.00753, 0.152)}  # fmt: skip
        return {"size": size, "n_params": {"base": size * 100, "distilled": size * 100},
                "pooled": {"2": pooled}}  # fmt: skip

    return {"plot_n_components": 2, "largest": "h96",
            "pairs": {"h96": pair(96, 0.0218), "h32": pair(32, -0.5)},
            "trend": {"slope": _ci(-0.0133, -0.0895, 0.0589),
                      "sham_gain_slope": _ci(0.0811, 0.000377, 0.159)}}  # fmt: skip


def _summary() -> dict:
    cat = lambda firing: {"occurrences": 377, "firing_latents": firing,
                          "top_latents": [{"id": i} for i in firing],
                          "nrn_minus_alive": _ci(0.101, -0.0206, 0.223),
                          "top_distilled_only": {"excess": _ci(-0.06, -0.06, 0.33)}}  # fmt: skip
    return {"n_latents": N_LATENTS, "fve": [0.945, 0.94], "l0": 9.7, "dead_fraction": 0.001,
            "n_base_only": 149, "n_shared": 1200, "n_distilled_only": 150, "n_dead": 1,
            "mean_nrn": 0.508, "mean_nrn_alive": 0.507,
            "splice": {"base": {"fraction_recovered": 1.005},
                       "distilled": {"fraction_recovered": 0.989}},
            "top_distilled_only": [458, 907, 1234],
            "categories": {"self_reflection": cat([17, 40]), "deductive": cat([40])}}  # fmt: skip


def make_workdir(root, stages=("analysis", "steering", "ablation", "geometry", "no_loop")) -> str:
    """A workdir holding synthetic results of `stages` (and their figures)."""
    w = str(root)
    a = wd.stage_dir(w, "analysis")
    if "analysis" in stages:
        _write_json(os.path.join(a, "summary.json"), _summary())
        _latents(os.path.join(a, "latents.jsonl"), N_LATENTS, LABELLED)
        write_browser(os.path.join(a, "browser.html"),
                      synthetic_browser_data(N_LATENTS, dead=(3,), detailed=(1234,)))  # fmt: skip
        for name in ("nrn.png", "categories.png"):
            _png(os.path.join(a, name))
    results = {"steering": (_steering({"self_reflection:1": [1234], "deductive:1": [5]}),
                            ["steering.png"]),
               "ablation": (_ablation(), ["ablation.png"]),
               "geometry": (_geometry(), ["cdf.png", "loss_vs_size.png"])}  # fmt: skip
    for stage in stages:
        if stage in results:
            obj, figures = results[stage]
            _write_json(os.path.join(wd.stage_dir(w, stage), "results.json"), obj)
            for name in figures:
                _png(os.path.join(wd.stage_dir(w, stage), name))
    if "no_loop" in stages:
        nl = wd.control_pair_dir(w)
        _latents(os.path.join(wd.stage_dir(nl, "analysis"), "latents.jsonl"), 20,
                 {7: _ex(*[" apples"] * 10)})  # fmt: skip
        open(os.path.join(wd.stage_dir(nl, "analysis"), "browser.html"), "w").close()
        _write_json(os.path.join(wd.stage_dir(nl, "steering"), "results.json"),
                    _steering({"self_reflection:1": [7]}))  # fmt: skip
        _png(os.path.join(wd.stage_dir(nl, "steering"), "steering.png"))
    return w


@pytest.fixture(scope="module")
def config():
    from configs import tiny

    return tiny.get_config()


def _rows(dom: str, cls: str) -> list[list[str]]:
    """The cells (tags stripped, text unescaped) of every row of the first table of class
    `cls`."""
    body = re.search(rf'<table class="{cls}">(.*?)</table>', dom, re.S).group(1)
    strip = lambda c: html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", c)).strip())
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    return [[strip(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r, re.S)] for r in rows]


def _section(dom: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', dom, re.S).group(1)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="headless Chromium is not installed")
def test_report_sections_tables_and_links_in_headless_chromium(tmp_path, config):
    w = make_workdir(tmp_path / "w")
    path = write_study_report(config, w)
    assert path == wd.study_report_path(w) == os.path.join(w, "report.html")
    dom = _dump_dom(f"file://{path}")
    status = dict(re.findall(r'<section id="(\w+)" data-status="(\w+)"', dom))
    assert status == dict.fromkeys(
        ["analysis", "steering", "ablation", "geometry", "no_loop", "family"], "ran"
    )
    # Analysis: the top distilled-only latents with their labels, linked to the browser.
    an = _section(dom, "analysis")
    assert [r[:2] for r in _rows(an, "top")[1:]] == [
        ["458", "digit"], ["907", "words ' toys', ' books'"], ["1234", "digit"]
    ]  # fmt: skip
    assert "Labels of the top 3: digit 2, words ' toys', ' books' 1." in an
    # Category latents (read at the marker's last token) against the selected ones.
    cats = {r[0]: r for r in _rows(an, "categories")[1:]}
    assert cats["self_reflection"][2] == "2: 17 marker ' Wait', 40 full stop"
    assert cats["self_reflection"][3] == "1234 digit"  # steered
    assert cats["self_reflection"][5] == "17 marker ' Wait'"  # analysis and ablation both
    assert cats["deductive"][3] == "5 full stop" and cats["deductive"][5] == "none"
    assert "offset -1 from the marker's first token" in re.sub(r"\s+", " ", an)
    # Steering: the sets' latents and the headline comparisons.
    st = _section(dom, "steering")
    assert ["self_reflection:1", "specificity", "1234 digit", "0.950"] in _rows(st, "sets")
    head = {(r[0], r[2]): r for r in _rows(st, "headline")[1:]}
    assert head["self_reflection:1", "vs random direction"][3:6] == [
        "+0.113 [-0.0396, +0.266]", "+1.22 [+0.741, +1.7]", "+62.7 [+38.3, +87.1]"
    ]  # fmt: skip
    assert head["deductive:1", "vs random latent"][3] == "n/a (not measured)"
    assert 'src="steering/steering.png"' in st
    # Ablation: each category's headline set, its effects or why there are none.
    ab = {r[0]: r for r in _rows(_section(dom, "ablation"), "headline")[1:]}
    assert ab["self_reflection"][2] == "specificity @ 0.10: 1234 digit"
    assert ab["self_reflection"][4] == "-0.0179 [-0.0443, +0.0114]"
    assert ab["self_reflection"][6] == f"n/a ({UNREACHABLE})"
    why = "not measured: no latent passes the specificity rule with NRN > 0.5"
    assert ab["deductive"][2:4] == ["specificity @ 0.10: none", why]
    sets = {tuple(r[:2]): r[2:] for r in _rows(_section(dom, "ablation"), "sets")[1:]}
    assert sets["self_reflection", "specificity"] == [
        "0.50: 2, 0.10: 1", "1234 digit, 17 marker ' Wait'"
    ]  # fmt: skip
    # Geometry: pairs by size, the trend's slopes.
    geo = _section(dom, "geometry")
    assert [r[0] for r in _rows(geo, "pairs")[1:]] == ["h32", "h96"]
    assert _rows(geo, "pairs")[2][1:5] == ["9600", "5", "-0.0261 [-0.0901, +0.0394]",
                                           "+0.0218 [-0.0482, +0.0818]"]  # fmt: skip
    assert ["sham gain per decade of parameters", "+0.0811 [+0.000377, +0.159]"] in _rows(
        geo, "trend"
    )
    # The no-loop pair's latents are its own crosscoder's: they link to its browser.
    nl = _section(dom, "no_loop")
    assert 'href="no_loop/analysis/browser.html#latent=7"' in nl
    assert ["self_reflection:1", "specificity", "7 word ' apples'", "0.950"] in _rows(nl, "sets")
    # The family, one seed: the steering finding read from the headline above.
    fam = {r[0]: r for r in _rows(_section(dom, "family"), "family")[1:]}
    row = fam["steering along self_reflection:1 lengthens traces, against a random direction"]
    assert row[1:] == ["+", "+62.7 [+38.3, +87.1]", "excludes 0 on the expected side"]
    row = fam["largest size: the distilled model's relations beat shuffled pairings by more "
              "than the base's (structure gain)"]  # fmt: skip
    assert row[3] == "includes 0"
    assert "<b>One seed</b> (seed 0; exploratory" in _section(dom, "family")
    # A latent link opens that latent in the browser, past the table's first 1,000 rows.
    href = re.search(r'href="(analysis/browser\.html#latent=1234)"', an).group(1)
    page = _dump_dom(f"file://{os.path.join(w, href)}")
    assert re.search(r'id="detail" data-id="(\d+)"', page).group(1) == "1234"
    assert "<h2>Latent 1234</h2>" in page


def test_report_when_stages_are_missing_or_unreadable(tmp_path, config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = write_study_report(config, "empty")
    with open(empty) as f:
        page = f.read()
    for sid, script in (("analysis", "analyze"), ("steering", "steer"), ("ablation", "ablate"),
                        ("geometry", "geometry")):  # fmt: skip
        assert f'<section id="{sid}" data-status="missing">' in page
        assert f"Not run yet: launch/{script}.py." in _section(page, sid)
    assert 'id="family"' not in page and 'id="no_loop"' not in page
    assert summarize_report(empty) == "report.html: no stage has run (open empty/report.html)"

    w = make_workdir(tmp_path / "part", stages=("analysis", "steering", "geometry"))
    with open(os.path.join(w, "geometry", "results.json"), "w") as f:
        f.write('{"pairs": ')  # cut short
    path = write_study_report(config, "part")
    with open(path, "rb") as f:
        first = f.read()
    page = first.decode()
    status = dict(re.findall(r'<section id="(\w+)" data-status="(\w+)"', page))
    assert status == {"analysis": "ran", "steering": "ran", "ablation": "missing",
                      "geometry": "error", "family": "ran"}  # fmt: skip
    assert "Its results cannot be read (JSONDecodeError" in _section(page, "geometry")
    assert "rerun launch/geometry.py" in _section(page, "geometry")
    # Ablation missing: the analysis still lists what steering selected, none ablated.
    cats = {r[0]: r for r in _rows(_section(page, "analysis"), "categories")[1:]}
    assert cats["self_reflection"][3:] == ["1234 digit", "none", "none"]
    assert summarize_report(path) == (
        "report.html: analysis, steering, family (open part/report.html)"
    )
    # Idempotent: the same files give the same bytes, and the page is not rewritten.
    stat = lambda: (os.stat(path).st_ino, os.stat(path).st_mtime_ns)
    before = stat()
    write_study_report(config, "part")
    with open(path, "rb") as f:
        assert f.read() == first
    assert stat() == before
    long = write_study_report(config, make_workdir(tmp_path / ("x" * 40)))
    line = summarize_report(long)
    assert line == f"report.html: 6/6 sections (open {long})"  # names would pass 80 characters


def test_report_lists_the_half_step_kl_of_the_ablation_sets(tmp_path, config):
    with open(write_study_report(config, make_workdir(tmp_path / "w"))) as f:
        page = f.read()
    ab = _section(page, "ablation")
    rows = _rows(ab, "half-step")
    assert rows[0][:3] == ["category", "latents", "KL closed by the set"]
    assert rows[1] == ["self_reflection", "1", "+0.12 [+0.05, +0.2]", "+0.01 [-0.01, +0.03]",
                       "+0.11 [+0.04, +0.19]"]  # fmt: skip
    assert rows[2][:3] == ["deductive", "0", "no latent passes the specificity rule with NRN > 0.5"]
    assert "on 3 held-out documents" in re.sub(r"\s+", " ", ab)
