"""The static latent browser: index.html (inline CSS + JS) + features_data.js (the data, written once).

Open index.html straight from disk: the data is loaded by <script src> (file:// pages cannot fetch()),
no CDN, no network; `read_report(folder)` gives Python the same data back. All text goes into the page
through textContent / attributes set from JS, so tokens containing <, &, quotes or newlines are shown
literally. Routes: `#` (index of every latent, paged, sortable by density, max and mean activation,
searchable by latent id or by a token where latents fire; `#q=king&page=2&size=50`) and `#latent-<id>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.files import write_text_atomic


def data_script(report: dict) -> str:
    """The report as a script assigning window.SAE_FEATURES (JSON is valid JS; `</` is escaped anyway)."""
    payload = json.dumps(report, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
    return f"{PREFIX}{payload};\n"


PREFIX = "window.SAE_FEATURES = "


def read_report(folder: Path) -> dict:
    """The report a browser folder holds (its features_data.js, read back as JSON)."""
    text = (Path(folder) / layout.FEATURES_DATA_JS).read_text()
    if not text.startswith(PREFIX):
        raise ValueError(f"{Path(folder) / layout.FEATURES_DATA_JS} is not a features data script")
    return json.loads(text[len(PREFIX) :].rstrip().rstrip(";").replace("<\\/", "</"))


def write_browser(out_dir: Path, report: dict) -> Path:
    """Write features_data.js and index.html into out_dir; returns index.html's path."""
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / layout.FEATURES_DATA_JS, data_script(report))
    page = PAGE.replace("__DATA_JS__", layout.FEATURES_DATA_JS)
    write_text_atomic(out_dir / layout.FEATURES_HTML, page)
    return out_dir / layout.FEATURES_HTML


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 8px 16px; background: #263238; color: #eee; display: flex; gap: 16px; align-items: baseline; }
header a { color: #80cbc4; } main { padding: 12px 16px; }
#errors:empty { display: none; } #errors { background: #fdd; color: #900; padding: 8px 16px; white-space: pre-wrap; }
table { border-collapse: collapse; background: #fff; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; cursor: pointer; user-select: none; background: #eceff1; position: sticky; top: 0; }
th.sorted::after { content: " \\25BE"; } th.sorted.asc::after { content: " \\25B4"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.dead td { color: #999; }
.ctx { font-family: ui-monospace, monospace; white-space: pre; overflow-x: auto; padding: 2px 0; }
.tok { border-radius: 2px; } .tok.peak { outline: 1px solid #e65100; }
.ex { display: flex; align-items: baseline; gap: 8px; } .ex .ctx { flex: 1; }
.label { display: inline-block; min-width: 10ch; color: #666; font-family: ui-monospace, monospace; }
.chips span { display: inline-block; margin: 2px; padding: 1px 5px; border-radius: 3px; font-family: ui-monospace, monospace; white-space: pre; }
.explanation { font-style: italic; } .up { background: #e3f2fd; } .down { background: #fce4ec; }
.cols { display: flex; gap: 32px; flex-wrap: wrap; } .muted { color: #777; }
input[type=search] { width: 28em; padding: 4px; }
svg rect.bar { fill: #ff9800; } svg text { font-size: 10px; fill: #555; }
"""

JS = r"""
"use strict";
(function () {
  const errors = document.getElementById("errors");
  window.addEventListener("error", (e) => { errors.textContent += "error: " + e.message + "\n"; });
  const D = window.SAE_FEATURES;
  const app = document.getElementById("app");
  if (!D) { app.textContent = "features_data.js did not load: keep it next to index.html."; return; }
  const byId = new Map(D.latents.map((l) => [l.id, l]));
  const order = D.latents.map((l) => l.id);

  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") e.textContent = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of kids) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function tokStr(id) { const s = D.tokens[String(id)]; return s === undefined ? "<" + id + ">" : s; }
  function shown(s) { return s === "" ? "\u2205" : s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d"); }
  function num(x, d) { return x === 0 ? "0" : Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3 ? x.toExponential(d || 2) : x.toPrecision(d || 3); }
  function pct(x) { return x === 0 ? "0" : (100 * x).toPrecision(3) + "%"; }

  function context(ex, maxAct) {
    const line = el("div", { class: "ctx" });
    ex.toks.forEach((t, i) => {
      const a = ex.acts[i];
      const s = el("span", { class: "tok" + (a > 0 ? " hl" : "") + (i === ex.peak ? " peak" : ""), text: shown(tokStr(t)) });
      s.title = JSON.stringify(tokStr(t)) + " \u2192 " + num(a, 4);
      if (a > 0) s.style.backgroundColor = "rgba(255,152,0," + Math.min(1, a / maxAct).toFixed(3) + ")";
      line.append(s);
    });
    return line;
  }

  function histogram(h, maxAct) {
    const NS = "http://www.w3.org/2000/svg", W = 420, H = 120, n = h.counts.length;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 18);
    const top = Math.max(...h.counts), bw = W / n;
    h.counts.forEach((c, i) => {
      const r = document.createElementNS(NS, "rect"), y = H * (1 - c / top);
      r.setAttribute("class", "bar"); r.setAttribute("x", i * bw); r.setAttribute("width", Math.max(1, bw - 1));
      r.setAttribute("y", y); r.setAttribute("height", H - y);
      const t = document.createElementNS(NS, "title");
      t.textContent = "[" + num(i * h.bin_width) + ", " + num((i + 1) * h.bin_width) + "): " + c;
      r.append(t); svg.append(r);
    });
    const axis = (x, s, anchor) => { const t = document.createElementNS(NS, "text"); t.setAttribute("x", x);
      t.setAttribute("y", H + 14); t.setAttribute("text-anchor", anchor); t.textContent = s; svg.append(t); };
    axis(0, "0", "start"); axis(W, num(n * h.bin_width), "end");
    return el("div", {}, el("h3", { text: "Activation histogram (firing tokens, max " + num(maxAct) + ")" }), svg);
  }

  function chips(list, cls) {
    const d = el("div", { class: "chips" });
    for (const [t, v] of list) {
      const s = tokStr(t);  // a whitespace-only token would be an empty-looking chip: draw its spaces
      d.append(el("span", { class: cls, text: /^ +$/.test(s) ? s.replace(/ /g, "\u2423") : shown(s), title: num(v, 4) }));
    }
    return d;
  }

  function renderLatent(id) {
    const l = byId.get(id);
    document.body.dataset.view = "latent-" + id;
    if (!l) { app.replaceChildren(el("p", { text: "Latent " + id + " is not in this browser." })); return; }
    const i = order.indexOf(id), nav = el("p");
    if (i > 0) nav.append(el("a", { href: "#latent-" + order[i - 1], text: "\u2190 latent " + order[i - 1] }), " ");
    nav.append(el("a", { href: "#", text: "index" }));
    if (i < order.length - 1) nav.append(" ", el("a", { href: "#latent-" + order[i + 1], text: "latent " + order[i + 1] + " \u2192" }));
    const view = el("div", { id: "latent-view" }, nav, el("h2", { text: "Latent " + id + (l.dead ? " (dead)" : "") }));
    if (l.dead) {
      view.append(el("p", { class: "dead", text: "Dead: never fired on the " + D.n_tokens + " held-out tokens." }));
    } else {
      view.append(el("p", { text: "density " + pct(l.density) + " (" + l.count + " of " + D.n_tokens +
        " tokens, 1 in " + Math.round(1 / l.density) + ") \u00b7 max " + num(l.max_act) + " \u00b7 mean when firing " + num(l.mean_act) }));
    }
    if (l.explanation) {  // written by sae-explain
      const x = l.explanation, f = (v) => v.toFixed(2);
      view.append(el("p", { class: "explanation", text: "Explanation: " + x.text }),
        el("p", { class: "muted", text: "detection " + f(x.detection) + " (shuffled " + f(x.detection_shuffled) +
          ") \u00b7 fuzzing " + f(x.fuzzing) + " (shuffled " + f(x.fuzzing_shuffled) + "), balanced accuracy" }));
    }
    const cols = el("div", { class: "cols" });
    if (l.hist) cols.append(histogram(l.hist, l.max_act));
    if (l.promoted) {
      cols.append(el("div", {}, el("h3", { text: "Promoted tokens" }), chips(l.promoted, "up"),
        el("h3", { text: "Suppressed tokens" }), chips(l.suppressed, "down"),
        el("p", { class: "muted", text: "logit lens: " + D.logit_lens })));
    }
    view.append(cols);
    const section = (title, list, label) => {
      if (!list.length) return;
      const box = el("div", { class: "examples" }, el("h3", { text: title }));
      for (const ex of list) box.append(el("div", { class: "ex" }, el("span", { class: "label", text: label(ex) }), context(ex, l.max_act)));
      view.append(box);
    };
    section("Top activations", l.top, (ex) => num(ex.act));
    section("Weaker activations (one per quantile of a random sample of firings)", l.weak,
      (ex) => num(ex.act) + " q" + Math.round(100 * ex.quantile));
    app.replaceChildren(view);
    window.scrollTo(0, 0);
  }

  // ---- index ----
  const PAGE = 100;
  const state = { key: "density", asc: false, query: "", page: 1, size: PAGE };
  let firingIndex = null;  // token text (trimmed, lower case) -> ids of the latents that fire on it
  function buildIndex() {
    firingIndex = new Map();
    for (const l of D.latents) {
      for (const ex of l.top.concat(l.weak || [])) {
        ex.toks.forEach((t, i) => {
          if (!(ex.acts[i] > 0)) return;
          const key = tokStr(t).trim().toLowerCase();
          if (!firingIndex.has(key)) firingIndex.set(key, new Set());
          firingIndex.get(key).add(l.id);
        });
      }
    }
  }
  function matches(l, q) {
    if (!q) return true;
    if (/^\d+$/.test(q) && l.id === Number(q)) return true;
    if (!firingIndex) buildIndex();
    const hit = firingIndex.get(q.toLowerCase());
    return hit !== undefined && hit.has(l.id);
  }
  const columns = [["id", "latent"], ["density", "density"], ["max_act", "max act"], ["mean_act", "mean act"]];
  const head = el("tr");
  const body = el("tbody");
  const status = el("p", { class: "muted" });
  const prev = el("button", { text: "\u2190 previous", id: "prev" });
  const next = el("button", { text: "next \u2192", id: "next" });
  const pager = el("p", { id: "pager" }, prev, " ", next);
  prev.onclick = () => { state.page -= 1; fill(); };
  next.onclick = () => { state.page += 1; fill(); };
  for (const [key, name] of columns) {
    const th = el("th", { text: name, "data-key": key });
    th.onclick = () => { state.asc = state.key === key ? !state.asc : key === "id"; state.key = key; state.page = 1; fill(); };
    head.append(th);
  }
  const explained = D.latents.some((l) => l.explanation);
  if (explained) head.append(el("th", { text: "explanation" }));
  head.append(el("th", { text: "promoted tokens" }), el("th", { text: "top context" }));
  const search = el("input", { type: "search", placeholder: "latent id, or a token it fires on (e.g. 123, king)" });
  search.oninput = () => { state.query = search.value.trim(); state.page = 1; fill(); };
  const indexView = el("div", { id: "index-view" },
    el("p", { text: D.latents.length + " latents \u00b7 " + D.n_dead + " dead \u00b7 " + D.n_tokens +
      " held-out tokens \u00b7 hook " + D.hook + " \u00b7 " + D.sae.arch + " SAE, d_sae " + D.sae.d_sae }),
    search, status, pager, el("table", {}, el("thead", {}, head), body));

  function fill() {
    for (const th of head.children) {
      th.classList.toggle("sorted", th.dataset.key === state.key); th.classList.toggle("asc", state.asc);
    }
    const rows = D.latents.filter((l) => matches(l, state.query));
    const dir = state.asc ? 1 : -1;
    rows.sort((a, b) => dir * (a[state.key] - b[state.key]) || a.id - b.id);
    const pages = Math.max(1, Math.ceil(rows.length / state.size));
    state.page = Math.min(Math.max(1, state.page), pages);
    const first = (state.page - 1) * state.size;
    body.replaceChildren();
    for (const l of rows.slice(first, first + state.size)) {
      const tr = el("tr", { class: l.dead ? "dead" : "", "data-latent": l.id }, el("td", {}, el("a", { href: "#latent-" + l.id, text: String(l.id) })));
      tr.append(el("td", { class: "num", text: l.dead ? "dead" : pct(l.density) }),
        el("td", { class: "num", text: num(l.max_act) }), el("td", { class: "num", text: num(l.mean_act) }));
      if (explained) tr.append(el("td", { class: "explanation", text: l.explanation ? l.explanation.text : "" }));
      tr.append(el("td", {}, l.promoted ? chips(l.promoted.slice(0, 4), "up") : ""));
      tr.append(el("td", {}, l.top.length ? context(l.top[0], l.max_act) : ""));
      body.append(tr);
    }
    status.textContent = rows.length + " matching latents \u00b7 page " + state.page + " of " + pages +
      (rows.length ? " (" + (first + 1) + "\u2013" + Math.min(rows.length, first + state.size) + ")" : "");
    prev.disabled = state.page <= 1; next.disabled = state.page >= pages;
    const params = new URLSearchParams();
    if (state.query) params.set("q", state.query);
    if (state.page > 1) params.set("page", state.page);
    if (state.size !== PAGE) params.set("size", state.size);
    history.replaceState(null, "", "#" + params.toString());
  }

  function route() {
    const m = location.hash.match(/^#latent-(\d+)$/);
    if (m) { renderLatent(Number(m[1])); return; }
    const params = new URLSearchParams(location.hash.slice(1));
    state.query = (params.get("q") || "").trim(); search.value = state.query;
    state.page = Number(params.get("page")) || 1;
    state.size = Number(params.get("size")) || PAGE;
    document.body.dataset.view = "index";
    fill();
    app.replaceChildren(indexView);
  }
  document.title = "SAE latents \u00b7 " + D.hook;
  document.getElementById("title").textContent = D.run + " \u00b7 " + D.hook;
  window.addEventListener("hashchange", route);
  route();
})();
"""

PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SAE latents</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>"""
    + CSS
    + """</style></head>
<body><header><a href="#">SAE latents</a><span id="title"></span></header>
<div id="errors"></div>
<main id="app">loading&hellip;</main>
<script src="__DATA_JS__"></script>
<script>"""
    + JS
    + """</script>
</body></html>
"""
)
