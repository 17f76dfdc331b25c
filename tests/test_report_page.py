"""The report page in a real headless Chromium: it loads with no console errors and every figure renders.

A copy of the page gets a small harness at the top of ``<head>`` that records ``console.error``
calls and uncaught errors, and after ``load`` writes them, with what each figure drew, into the
DOM; Chromium's ``--dump-dom`` hands that back. The page itself is not changed. Figure export
(kaleido drives the same Chromium) is tested here too.
"""
import html
import json
import re
import subprocess

import plotly.graph_objects as go
import pytest

from lensdyn import plots
from lensdyn.analyses import registry
from lensdyn.app.report import analysis_section, export_figures, figure_size, find_chromium

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (make test installs Debian's chromium)")

HARNESS = """<script>
window.__errors = [];
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.map(String).join(" ")); __consoleError(...args); };
window.addEventListener("error", e => window.__errors.push("uncaught: " + e.message));
window.addEventListener("unhandledrejection", e => window.__errors.push("unhandled rejection: " + e.reason));
window.addEventListener("load", () => setTimeout(() => {
  const figures = [...document.querySelectorAll(".js-plotly-plot")].map(gd => ({
    id: gd.id, svg: gd.querySelectorAll(".main-svg").length, traces: (gd._fullData || []).length,
  }));
  const table = document.getElementById("verdicts");
  const summaries = [...document.querySelectorAll(".summary")];
  document.body.setAttribute("data-harness", JSON.stringify({
    errors: window.__errors, figures: figures, verdict_rows: table ? table.tBodies[0].rows.length : -1,
    verdict_text: table ? table.innerText : "",
    downloads: [...document.querySelectorAll("a.download")].map(a => a.getAttribute("download")),
    pre: document.querySelectorAll("pre").length, summaries: summaries.length,
    scrolling: summaries.filter(s => s.scrollWidth > s.clientWidth + 1).length,
    menus: [...document.querySelectorAll(".js-plotly-plot")].filter(gd => gd.querySelector(".updatemenu-container")).length,
  }));
}, 500));
</script>"""


def load_in_chromium(page, tmp_path) -> dict:
    """What the harness recorded after Chromium loaded ``page``, plus Chromium's own console lines."""
    source = page.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(source.replace("<head>", "<head>\n" + HARNESS, 1), encoding="utf-8")
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=30000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    found = re.search(r'data-harness="([^"]*)"', run.stdout)
    assert found, f"the page never finished loading in Chromium:\n{run.stderr[-2000:]}"
    recorded = json.loads(html.unescape(found.group(1)))
    recorded["console"] = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    return recorded


@pytest.mark.slow
@needs_chromium
def test_report_page_loads_without_errors_and_every_figure_renders(minilm_report, tmp_path):
    page = minilm_report / "report.html"
    n_figures = page.read_text(encoding="utf-8").count("Plotly.newPlot")
    recorded = load_in_chromium(page, tmp_path)
    assert recorded["errors"] == [], recorded["errors"]
    assert not [line for line in recorded["console"] if "Uncaught" in line or "Error" in line], recorded["console"]
    figures = recorded["figures"]
    assert len(figures) == n_figures == 6  # norms, massive, expansion, gains, metastability, curvature
    for figure in figures:
        assert figure["svg"] >= 1 and figure["traces"] >= 1, f"{figure['id']} did not render: {figure}"
    index = json.loads((minilm_report / "report.json").read_text())
    assert recorded["verdict_rows"] == len(index["verdicts"]) > 0
    # Printable: each rule and measured value is text in the table, not a hover title.
    for v in index["verdicts"]:
        assert v["rule"] in recorded["verdict_text"] and v["measured"] in recorded["verdict_text"]
    assert recorded["downloads"] == [f"{name}.csv" for name in index["analyses"]]
    assert recorded["pre"] == 0 and recorded["summaries"] == n_figures and recorded["scrolling"] == 0
    assert recorded["menus"] == 1  # curvature's prompt selector (two prompts here)


@needs_chromium
def test_the_harness_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><head></head><body><script>console.error('bad'); notAFunction();</script></body></html>")
    recorded = load_in_chromium(page, tmp_path)
    assert "bad" in recorded["errors"] and any("notAFunction" in e for e in recorded["errors"])


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


@pytest.mark.slow
@needs_chromium
def test_each_report_figure_exports_at_its_own_size_and_its_subplot_titles_do_not_collide(minilm_report, tmp_path):
    """Every figure of the report, rebuilt from its JSON, exported as PNG at scale 1.5: its pixel size is its
    layout size (``figure_size``) times 1.5. Subplot titles are checked in paper coordinates by
    ``lensdyn.plots.title_boxes``, an estimate: each glyph as wide as 0.6 em (sans-serif glyphs average
    nearer 0.5 em, so boxes are if anything too wide), each line 1.3 em high, placed by the annotation's
    anchor in the plot area less plotly's margins. No two boxes may overlap, and none may run past the
    figure's left or right edge. It is not a rendering of the text: kaleido's SVG would give the real boxes,
    at the cost of a browser round trip per figure."""
    figures = {}
    for name in json.loads((minilm_report / "report.json").read_text())["analyses"]:
        apart = minilm_report / f"{name}_reference.json"
        reference = registry.load_result(apart) if apart.exists() else None
        section = analysis_section(registry.get(name), registry.load_result(minilm_report / f"{name}.json"), reference)
        figures[name] = section.figure
    paths = export_figures(figures, tmp_path, ["png"], scale=1.5)
    assert [p.stem for p in paths] == list(figures)
    for path in paths:
        figure = figures[path.stem]
        width, height = figure_size(figure)
        assert _png_size(path) == (round(width * 1.5), round(height * 1.5)), path.stem
        boxes = plots.title_boxes(figure, width, height)
        assert plots.overlapping(boxes) == [], path.stem
        left, right = plots.paper_extent(figure, width)
        assert all(left <= x0 and x1 <= right for _, x0, _, x1, _ in boxes), (path.stem, boxes)


@needs_chromium
def test_static_export_writes_png_and_svg(tmp_path):
    figure = go.Figure(go.Scatter(y=[1, 3, 2]))
    paths = export_figures({"toy": figure}, tmp_path, ["png", "svg"])
    assert [p.name for p in paths] == ["toy.png", "toy.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()


def test_static_export_without_chromium_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lensdyn.app.report.find_chromium", lambda: None)
    assert export_figures({"toy": go.Figure()}, tmp_path, ["png"]) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Chromium" in err[0]
