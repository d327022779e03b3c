"""The latent browser in a real headless Chromium: loads from disk, renders highlighted contexts, escapes
tokens, searches, and logs nothing to the console.

Needs the Debian package `chromium` (/usr/bin/chromium): skipped locally when it is absent, failed in CI.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sae_pipeline import layout
from sae_pipeline.features import run
from sae_pipeline.interpret import browser
from sae_pipeline.interpret.browser import read_report
from tests.helpers import DEAD, features_cfg, make_sae_run

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(autouse=True)
def chromium_present():
    """Locally the browser tests skip, with the reason, when Chromium is absent; in CI (CI=true, where
    `make setup` installs it) its absence is a failure, so CI cannot silently skip them."""
    if shutil.which(CHROMIUM) is None:
        why = f"{CHROMIUM} is absent (`make browser` installs Debian's chromium as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)


NASTY = ['<b id="inj">x</b>', "&amp; 'q' \"qq\"", "</script><i>", "\n"]


def dump_dom(page: Path, fragment: str, tmp: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console lines Chromium logged."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri() + fragment,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a hang guard, not a speed bar
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


class Nodes(HTMLParser):
    """Flat list of (tag, attrs, text) for every element, text being its direct text."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.nodes: list[list] = []
        self.stack: list[list] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = [tag, dict(attrs), ""]
        self.nodes.append(node)
        if tag not in ("meta", "br", "input", "link", "img"):
            self.stack.append(node)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2] += data

    def find(self, tag=None, cls=None, **attrs):
        return [
            n
            for n in self.nodes
            if (tag is None or n[0] == tag)
            and (cls is None or cls in n[1].get("class", "").split())
            and all(n[1].get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A real features report, with a few token strings replaced by text that must be escaped."""
    tmp = tmp_path_factory.mktemp("browser")
    out = run(features_cfg(make_sae_run(tmp), f"features.out_dir={tmp / 'features'}", "features.n_weak=2"))
    report = read_report(out)
    live = next(r for r in report["latents"] if not r["dead"])
    peak = live["top"][0]
    for tok_id, text in zip(dict.fromkeys(peak["toks"]), NASTY, strict=False):
        report["tokens"][str(tok_id)] = text
    browser.write_browser(out, report)
    return out / layout.FEATURES_HTML, report, live, tmp


def test_latent_view_highlights_its_contexts(page):
    html_path, report, live, tmp = page
    dom, console = dump_dom(html_path, f"#latent-{live['id']}", tmp)
    assert console == [], console
    nodes = Nodes(dom)
    assert nodes.find("body")[0][1].get("data-view") == f"latent-{live['id']}"
    assert nodes.find("div", id="errors")[0][2] == ""
    assert nodes.find("h2")[0][2] == f"Latent {live['id']}"
    highlighted = nodes.find("span", cls="hl")
    examples = live["top"] + live["weak"]
    assert len(highlighted) == sum(a > 0 for ex in examples for a in ex["acts"])
    assert all("255, 152, 0" in n[1]["style"] and "\u2192" in n[1]["title"] for n in highlighted)
    assert len(nodes.find("span", cls="peak")) == len(examples)
    shown = {n[2] for n in nodes.find("span", cls="tok")}
    for text in NASTY[:3]:  # shown literally, never parsed as markup
        assert text in shown
    assert "\u21b5" in shown  # the newline token is drawn as a visible symbol
    assert not nodes.find("b", id="inj") and not nodes.find("i")
    assert nodes.find("svg") and len(nodes.find("rect", cls="bar")) == len(live["hist"]["counts"])
    assert len(nodes.find("span", cls="up")) == len(live["promoted"])


def test_dead_latent_and_index(page):
    html_path, report, live, tmp = page
    dom, console = dump_dom(html_path, f"#latent-{DEAD[0]}", tmp)
    assert console == [], console
    assert "Dead: never fired" in dom and "(dead)" in dom
    dom, console = dump_dom(html_path, "", tmp)
    assert console == [], console
    nodes = Nodes(dom)
    assert nodes.find("body")[0][1].get("data-view") == "index"
    rows = nodes.find("tr", cls=None)[1:]  # the header row first
    assert len(rows) == len(report["latents"])
    dead_rows = nodes.find("tr", cls="dead")
    assert sorted(int(r[1]["data-latent"]) for r in dead_rows) == sorted(DEAD)
    densities = [r["density"] for r in sorted(report["latents"], key=lambda r: (-r["density"], r["id"]))]
    order = [int(r[1]["data-latent"]) for r in rows]
    assert [next(x["density"] for x in report["latents"] if x["id"] == i) for i in order] == densities


def test_search_finds_latents_by_the_tokens_where_they_fire(page):
    html_path, report, live, tmp = page

    def latents_firing_on(word: str) -> list[int]:
        return sorted(
            r["id"]
            for r in report["latents"]
            if any(
                a > 0 and report["tokens"][str(t)].strip().lower() == word
                for ex in r["top"] + r["weak"]
                for t, a in zip(ex["toks"], ex["acts"], strict=True)
            )
        )

    def shown_but_silent(word: str) -> bool:  # a latent whose contexts show the token without firing on it
        return any(
            r["id"] not in latents_firing_on(word)
            and any(report["tokens"][str(t)].strip().lower() == word for ex in r["top"] for t in ex["toks"])
            for r in report["latents"]
        )

    # a token some latents fire on and others only show in their contexts, so the search must tell them apart
    words = {
        report["tokens"][str(t)].strip().lower()
        for r in report["latents"]
        for ex in r["top"]
        for t in ex["toks"]
    }
    word = next(
        w
        for w in sorted(words)
        if w.isalpha() and 0 < len(latents_firing_on(w)) < len(report["latents"]) - 2 and shown_but_silent(w)
    )
    want = latents_firing_on(word)
    dom, console = dump_dom(html_path, f"#q={word}&size=1000", tmp)
    assert console == [], console
    got = sorted(int(n[1]["data-latent"]) for n in Nodes(dom).find("tr") if "data-latent" in n[1])
    assert got == want
    dom, _ = dump_dom(html_path, f"#q={live['id']}", tmp)
    got = [int(n[1]["data-latent"]) for n in Nodes(dom).find("tr") if "data-latent" in n[1]]
    assert live["id"] in got


def test_index_pages_through_every_latent(page):
    html_path, report, live, tmp = page
    order = [r["id"] for r in sorted(report["latents"], key=lambda r: (-r["density"], r["id"]))]
    size, n = 10, len(order)
    last = -(-n // size)
    seen = []
    for number in range(1, last + 1):
        dom, console = dump_dom(html_path, f"#page={number}&size={size}", tmp)
        assert console == [], console
        nodes = Nodes(dom)
        rows = [int(n[1]["data-latent"]) for n in nodes.find("tr") if "data-latent" in n[1]]
        assert rows == order[(number - 1) * size : number * size]
        assert f"page {number} of {last}" in dom
        assert ("disabled" in nodes.find("button", id="next")[0][1]) == (number == last)
        seen += rows
    assert sorted(seen) == sorted(order)  # every latent is reachable from the index


def test_data_is_written_once(page):
    html_path, report, live, tmp = page
    folder = html_path.parent
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(
        [layout.FEATURES_DATA_JS, layout.FEATURES_HTML]
    )
    assert read_report(folder) == report  # the page's data is the report, nothing lost or added
    assert len(html_path.read_text()) < 40_000  # the page itself holds no data


def test_missing_data_script_is_reported(page, tmp_path):
    html_path, *_ = page
    lonely = tmp_path / layout.FEATURES_HTML
    lonely.write_text(html_path.read_text())
    dom, _ = dump_dom(lonely, "", tmp_path)
    assert "features_data.js did not load" in dom


def test_explanations_show_on_the_latent_page_and_in_the_index(page, tmp_path):
    """What sae-explain writes (explanations.jsonl records) appears on its latent's page and in the index."""
    from sae_pipeline.interpret import explanations

    _, report, live, _ = page
    rec = {"latent": live["id"], "explanation": "<b>kings</b> & crowns", "detection": 0.875, "fuzzing": 0.5,
           "detection_shuffled": 0.5, "fuzzing_shuffled": 0.25}  # fmt: skip
    out = tmp_path / "explained"
    out.mkdir()
    html = browser.write_browser(
        out, explanations.attach(copy.deepcopy(report), [rec])
    )  # the fixture's stays
    dom, console = dump_dom(html, f"#latent-{live['id']}", tmp_path)
    assert console == [], console
    nodes = Nodes(dom)
    assert [n[2] for n in nodes.find("p", cls="explanation")] == ["Explanation: <b>kings</b> & crowns"]
    assert "detection 0.88 (shuffled 0.50) \u00b7 fuzzing 0.50 (shuffled 0.25)" in dom
    dom, console = dump_dom(html, "", tmp_path)
    assert console == [], console
    cells = Nodes(dom).find("td", cls="explanation")
    assert len(cells) == min(100, len(report["latents"])) and [c[2] for c in cells if c[2]] == [
        rec["explanation"]
    ]
