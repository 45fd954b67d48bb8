"""What the study report's sections share: escaped HTML pieces, intervals, and the latents of a
crosscoder as the report names them (a link to the feature browser and a label).
"""

from __future__ import annotations

import html
import json
import os

from xcoder_jax import stats
from xcoder_jax import workdir as wd

E = html.escape


def fmt(v, nd: int = 3) -> str:
    """A number to `nd` decimals (ints as they are), "–" for None; escaped text otherwise."""
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return E(str(v))


def ci(c: dict | None, form: str = "{:+.3g}") -> str:
    """An interval of `stats` as "mean [lo, hi]", bold when it excludes 0; its reason when
    it was not measured."""
    text = E(stats.format_ci(c, form))
    return f"<b>{text}</b>" if stats.excludes_zero(c) else text


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller); header names are escaped here (no
    header row when `header` is empty)."""
    head = "<tr>" + "".join(f"<th>{E(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}{body}</table>' if cls else f"<table>{head}{body}</table>"


def figure(workdir: str, rel: str, alt: str) -> str:
    """A figure of a stage, linked relative to the report (see `study_report`), or a note
    that its file is missing."""
    if not os.path.exists(os.path.join(workdir, rel)):
        return f"<p class='muted'>{E(rel)} is missing.</p>"
    return f'<a href="{E(rel)}"><img src="{E(rel)}" alt="{E(alt)}" loading="lazy"></a>'


def read_json(path: str) -> dict | None:
    """A stage's results, None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class Latents:
    """The latents of one crosscoder as the report shows them: each id links to its page in
    the feature browser (`analysis/browser.html#latent=<id>`, relative to the report) and
    carries its label (`analysis.labels.latent_label` of its top examples in latents.jsonl).

    latents.jsonl holds one line per latent in id order; the file is scanned once for line
    offsets and only the lines shown are parsed (a large dictionary's file is big).
    """

    def __init__(self, workdir: str, pair: str, min_share: float):
        """pair: the crosscoder's workdir relative to the report's ("" or "no_loop")."""
        analysis = wd.stage_dir(os.path.join(workdir, pair), "analysis")
        self.path = os.path.join(analysis, "latents.jsonl")
        self.browser = "/".join(p for p in (pair, "analysis", "browser.html") if p)
        self.has_browser = os.path.exists(os.path.join(analysis, "browser.html"))
        self.min_share = min_share
        self._offsets: list[int] | None = None
        self._lines: dict[int, dict | None] = {}

    def line(self, i: int) -> dict | None:
        """Latent i's line of latents.jsonl, None without one."""
        i = int(i)
        if i not in self._lines:
            self._lines[i] = self._read(i)
        return self._lines[i]

    def _read(self, i: int) -> dict | None:
        if self._offsets is None:
            self._offsets = []
            if os.path.exists(self.path):
                with open(self.path, "rb") as f:
                    pos = 0
                    for raw in f:
                        self._offsets.append(pos)
                        pos += len(raw)
        if not 0 <= i < len(self._offsets):
            return None
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            line = json.loads(f.readline())
        return line if line.get("id") == i else None

    def label(self, i: int) -> str | None:
        from xcoder_jax.analysis.labels import latent_label

        line = self.line(i)
        return None if line is None else latent_label(line["top_examples"], self.min_share)

    def link(self, i: int) -> str:
        """The id, linked to the browser when there is one."""
        i = int(i)
        if not self.has_browser:
            return str(i)
        return f'<a class="lat" href="{E(self.browser)}#latent={i}">{i}</a>'

    def named(self, i: int) -> str:
        """'<linked id> <label>'."""
        lab = self.label(i)
        return self.link(i) + (f' <span class="lab">{E(lab)}</span>' if lab else "")

    def named_list(self, ids, limit: int | None = None) -> str:
        """Latents as '12 digit, 40 full stop', the first `limit` of them (and how many
        more), or "none"."""
        ids = [int(i) for i in ids]
        if not ids:
            return "<span class='muted'>none</span>"
        shown = ids if limit is None else ids[:limit]
        text = ", ".join(self.named(i) for i in shown)
        if len(ids) > len(shown):
            text += f" <span class='muted'>and {len(ids) - len(shown)} more</span>"
        return text
