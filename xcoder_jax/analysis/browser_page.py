"""The feature browser's page: HTML, CSS and script, all inline (no server, no network).

`render(blob)` puts the JSON of `browser.browser_data` in a non-executed script element that
the script parses. Every piece of data text enters the page through `textContent`, never as
HTML. The URL fragment drives the page as a user would, through the controls' own events:
`browser.html#class=distilled_only&cat=self_reflection&nrn_min=0.6&nrn_max=1&q=Wait&
sort=nrn&dir=desc&open=first` sets the filters, sorts, and clicks the first listed latent
(or `open=<id>`: that latent's row, if the filters list it). `browser.html#latent=<id>` (or
the "latent id" box) opens ANY latent's detail, whatever the filters and however far down a
table that lists at most `MAX_ROWS` rows it is: what other pages link to. Headless tests read
the result with `chromium --dump-dom`.
"""

from __future__ import annotations

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;font-size:13px}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:10px 0 4px}
#wrap{display:flex;gap:16px;align-items:flex-start} #left{flex:0 0 46%} #right{flex:1}
#controls{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0} #controls label{font-size:12px}
input[type=number]{width:5em} #tablebox{max-height:80vh;overflow:auto;border:1px solid #ddd}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #eee;padding:2px 5px;
text-align:left;white-space:nowrap} th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}
td.n{text-align:right} tr:hover{background:#fff6d8;cursor:pointer} tr.sel{background:#ffe8a3}
.muted{color:#777;font-size:12px} .ex{display:flex;gap:10px;margin:4px 0}
.side{flex:1;font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;
border:1px solid #eee;padding:3px} .tok{border-radius:2px} .centre{outline:1px solid #333}
.roles{display:flex;gap:10px;font-weight:600} .roles div{flex:1} ol{margin:2px 0 2px 18px;
padding:0} .prom{display:flex;gap:10px} .prom div{flex:1} .cls-base_only{color:#1565c0}
.cls-distilled_only{color:#c62828} .cls-dead{color:#9e9e9e}
.note{background:#f7f7f7;padding:6px;font-size:12px}
"""

HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Crosscoder latents</title>
<style>{css}</style></head><body>
<h1>Crosscoder latents: base vs distilled</h1>
<p class="note">Click a latent. Contexts: the crosscoder computes one activation f per
token from both models' activations together; each side is shaded by that latent's
contribution to the model's reconstruction, f &times; ||W_dec[i, model]|| (raw units), on
one scale per latent, so the sides differ by the latent's decoder-norm ratio. Promoted tokens:
the model's decoder row through its final-norm gain and unembedding (a logit-lens reading of
the direction alone). Histogram: nonzero activations over every store row, log-spaced bins.
Excluded positions (special tokens, the first positions) are not in the store and not shown.
</p>
<div id="wrap"><div id="left">
<div id="controls">
<label>class <select id="f-class"><option value="">all</option></select></label>
<label>category <select id="f-cat"><option value="">all</option></select></label>
<label>NRN <input id="f-min" type="number" step="0.05" min="0" max="1" value="0"> to
<input id="f-max" type="number" step="0.05" min="0" max="1" value="1"></label>
<label>top tokens <input id="f-q" type="search" placeholder="e.g. Wait"></label>
<label>latent id <input id="f-id" type="number" min="0" step="1"></label>
</div>
<p id="count" class="muted"></p>
<div id="tablebox"><table><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
</div></div>
<div id="right"><div id="detail"><p class="muted">No latent selected.</p></div></div></div>
<script type="application/json" id="data">{blob}</script>
<script>{js}</script>
</body></html>
"""

JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const MAX_ROWS = 1000;
const COLS = [["id", "id", 0], ["label", "label", -1], ["class", "class", -1],
  ["nrn", "NRN", 3], ["cosine", "cos", 3], ["freq", "freq", 4],
  ["ratio_error", "scaling err", 2], ["ratio_reconstruction", "scaling rec", 2],
  ["categories", "categories", -1]];
const state = {key: "id", dir: 1};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function fmt(v, nd) {
  if (v === null || v === undefined) return "\u2013";
  if (Array.isArray(v)) return v.join(", ");
  return nd >= 0 && typeof v === "number" ? v.toFixed(nd) : String(v);
}
function show(s) { return s.replace(/\n/g, "\u21b5"); }

function matches(l) {
  const cls = $("f-class").value, cat = $("f-cat").value;
  const lo = parseFloat($("f-min").value), hi = parseFloat($("f-max").value);
  const q = $("f-q").value.trim().toLowerCase();
  if (cls && l.class !== cls) return false;
  if (cat && !l.categories.includes(cat)) return false;
  if (!isNaN(lo) && l.nrn < lo) return false;
  if (!isNaN(hi) && l.nrn > hi) return false;
  if (q) {
    const prom = (D.details[l.id] && D.details[l.id].promoted) || [];
    const words = l.top_tokens.concat(prom.flat().map((p) => D.vocab[p[0]] || ""));
    if (!words.some((w) => w.toLowerCase().includes(q))) return false;
  }
  return true;
}

function sortValue(l) {
  const v = l[state.key];
  return Array.isArray(v) ? v.join(",") : v;
}

function renderTable() {
  const list = D.latents.filter(matches);
  list.sort((a, b) => {
    const x = sortValue(a), y = sortValue(b);
    if (x === y) return a.id - b.id;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * state.dir;
  });
  const body = $("rows");
  body.replaceChildren();
  for (const l of list.slice(0, MAX_ROWS)) {
    const tr = el("tr");
    tr.dataset.id = l.id;
    for (const [key, , nd] of COLS) {
      const td = el("td", fmt(l[key], nd), nd >= 0 ? "n" : "");
      if (key === "class") td.classList.add("cls-" + l.class);
      tr.append(td);
    }
    tr.addEventListener("click", () => { select(tr); showLatent(l.id); });
    body.append(tr);
  }
  const more = list.length > MAX_ROWS
    ? ` (first ${MAX_ROWS} listed; any latent opens from the id box)` : "";
  $("count").textContent = `${list.length} of ${D.latents.length} latents match${more}`;
  $("count").dataset.n = list.length;
}

function select(tr) {
  for (const r of document.querySelectorAll("#rows tr.sel")) r.classList.remove("sel");
  if (tr) tr.classList.add("sel");
}

// Any latent by id, listed or not: its row is marked when the table lists it.
function openLatent(value) {
  const id = Number(value), box = $("detail");
  if (String(value).trim() === "" || !Number.isInteger(id) || id < 0 || id >= D.latents.length) {
    box.replaceChildren(el("p", `No latent ${value}: ids run from 0 to ${D.latents.length - 1}.`,
      "muted"));
    delete box.dataset.id;
    return;
  }
  const tr = document.querySelector(`#rows tr[data-id="${id}"]`);
  select(tr);
  if (tr) tr.scrollIntoView({block: "nearest"});
  showLatent(id);
}

function histogram(h) {
  const NS = "http://www.w3.org/2000/svg", W = 420, H = 120;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("id", "hist");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 18);
  const top = Math.max(...h.counts), bw = W / h.counts.length;
  h.counts.forEach((c, k) => {
    const r = document.createElementNS(NS, "rect"), ht = top ? (H * c) / top : 0;
    r.setAttribute("x", k * bw); r.setAttribute("width", Math.max(bw - 1, 1));
    r.setAttribute("y", H - ht); r.setAttribute("height", ht); r.setAttribute("fill", "#607d8b");
    r.dataset.count = c;
    const t = document.createElementNS(NS, "title");
    const lo = D.hist_edges[h.first + k], hi = D.hist_edges[h.first + k + 1];
    t.textContent = `${lo} < f \u2264 ${hi}: ${c}`;
    r.append(t); svg.append(r);
  });
  for (const [x, v, a] of [[0, D.hist_edges[h.first], "start"],
                           [W, D.hist_edges[h.first + h.counts.length], "end"]]) {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 14); t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", a); t.textContent = "f = " + v; svg.append(t);
  }
  return svg;
}

function showLatent(id) {
  const l = D.latents[id], d = D.details[id], box = $("detail");
  box.replaceChildren();
  box.dataset.id = id;
  box.append(el("h2", `Latent ${id}`));
  box.append(el("p", `NRN ${fmt(l.nrn, 3)}, ${l.class}, cosine ${fmt(l.cosine, 3)}, ` +
    `firing ${fmt(l.freq, 4)} (held-out), categories: ${fmt(l.categories) || "none"}. ` +
    `Label: ${l.label}`));
  if (!d) {
    box.append(el("p", "Contexts not kept: the latent never fires, or it is beyond the " +
      `browser_latents limit (${D.limits.browser_latents}).`, "muted"));
    return;
  }
  box.append(el("h2", "Max-activating contexts"));
  const roles = el("div", null, "roles");
  D.roles.forEach((r, m) => roles.append(el("div", `${r} (||W_dec|| ${d.dec_norm[m]})`)));
  box.append(roles);
  let top = 0;
  for (const e of d.examples) for (const f of e.f) top = Math.max(top, f * Math.max(...d.dec_norm));
  d.examples.forEach((e, k) => {
    const row = el("div", null, "ex");
    row.dataset.example = k;
    D.roles.forEach((role, m) => {
      const side = el("div", null, "side");
      side.dataset.role = role;
      if (e.doc_start) side.append(el("span", "[doc start] ", "muted"));
      e.tokens.forEach((t, j) => {
        const c = e.f[j] * d.dec_norm[m];
        const s = el("span", show(D.vocab[t] || `[${t}]`), "tok");
        s.dataset.f = e.f[j]; s.dataset.c = c;
        if (j === e.centre) s.classList.add("centre");
        const a = top > 0 ? c / top : 0;
        s.style.background = `rgba(255,120,0,${a.toFixed(3)})`;
        s.title = `f ${e.f[j]}; contribution ${c.toPrecision(4)}`;
        side.append(s);
      });
      row.append(side);
    });
    box.append(row);
    box.append(el("div", `doc ${e.doc}, position ${e.position}, f ${e.f[e.centre]}`, "muted"));
  });
  if (d.promoted) {
    box.append(el("h2", "Top promoted tokens"));
    const prom = el("div", null, "prom");
    D.roles.forEach((role, m) => {
      const col = el("div"), ol = el("ol");
      col.append(el("b", role));
      ol.dataset.role = role;
      for (const [t, v] of d.promoted[m]) {
        const li = el("li", `${show(D.vocab[t])} (${v})`);
        li.dataset.token = t; ol.append(li);
      }
      col.append(ol); prom.append(col);
    });
    box.append(prom);
  }
  box.append(el("h2", "Activation histogram"));
  if (d.hist) {
    box.append(histogram(d.hist));
    const n = d.hist.counts.reduce((a, b) => a + b, 0);
    box.append(el("p", `${n} nonzero of ${D.store_rows} store rows`, "muted"));
  }
}

function setup() {
  for (const c of D.classes) $("f-class").append(new Option(c, c));
  for (const c of D.categories) $("f-cat").append(new Option(c, c));
  for (const [key, name] of COLS) {
    const th = el("th", name);
    th.dataset.key = key;
    th.addEventListener("click", () => {
      state.dir = state.key === key ? -state.dir : 1;
      state.key = key;
      renderTable();
    });
    $("head").append(th);
  }
  for (const id of ["f-class", "f-cat", "f-min", "f-max", "f-q"])
    $(id).addEventListener("input", renderTable);
  $("f-id").addEventListener("change", () => openLatent($("f-id").value));
  renderTable();
}

// Drives the controls from the URL fragment, through the same events a user fires.
function applyHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const keys = {class: "f-class", cat: "f-cat", nrn_min: "f-min", nrn_max: "f-max", q: "f-q"};
  for (const [k, id] of Object.entries(keys)) {
    if (!p.has(k)) continue;
    $(id).value = p.get(k);
    $(id).dispatchEvent(new Event("input"));
  }
  if (p.has("sort")) {
    const th = document.querySelector(`#head th[data-key="${p.get("sort")}"]`);
    if (th) { th.click(); if (p.get("dir") === "desc") th.click(); }
  }
  if (p.has("open")) {
    const o = p.get("open");
    const tr = document.querySelector(o === "first" ? "#rows tr" : `#rows tr[data-id="${o}"]`);
    if (tr) tr.click();
  }
  if (p.has("latent")) {
    $("f-id").value = p.get("latent");
    openLatent(p.get("latent"));
  }
}

setup();
applyHash();
window.addEventListener("hashchange", applyHash);
"""


def render(blob: str) -> str:
    """The page around `blob`, the JSON of the data with '</' already escaped."""
    return HTML.format(css=CSS, blob=blob, js=JS)
