"""Self-contained HTML reports: plotly.js is embedded once, so a report opens offline.

The page opens with the verdict table (``lensdyn.verdicts``): every write-up claim the chosen
analyses test, the value measured on the model, the same measurement on the reference (the
untrained control or a ``--compare`` model), and the verdict its stated rule gives, the rule and
the units in the table and what else a verdict rests on in numbered footnotes, so that it prints;
then the write-ups cited (``lensdyn.citations``). Then one section per analysis
(``analysis_section``): its declared heading, its figure, a download of its per-layer table as CSV (a
``data:`` URI, ``Result.to_csv``), its text summary (wrapped, never scrolled sideways).
"""
from __future__ import annotations

import base64
import html
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lensdyn.citations import cite
from lensdyn.verdicts import HOLDS, NOT_TESTABLE, Verdict


@dataclass(frozen=True)
class Section:
    """One heading, one figure, and the text table under it."""

    heading: str
    figure: object  # a plotly Figure
    text: str = ""
    csv: str = ""  # its per-layer table (``Result.to_csv(per_layer=True)``), offered as a download
    name: str = ""  # the file stem of the download (the analysis's name)


def analysis_section(analysis, model, reference=None) -> Section:
    """The section of one analysis (a ``registry.Analysis``): its result on the model, and a reference
    run where the result keeps one apart (a result holding its control draws that itself)."""
    heading = f"{analysis.heading} of {model.provenance.model}"
    if reference is None or not analysis.keeps_reference_apart:
        return Section(heading, model.figure(), model.summary(), model.to_csv(per_layer=True), analysis.name)
    return Section(heading, model.figure(control=reference), f"{model.summary()}\n\n{reference.summary()}",
                   model.to_csv(reference=reference, per_layer=True), analysis.name)


def _verdict_css(verdict: str) -> str:
    return "holds" if verdict == HOLDS else "untestable" if verdict == NOT_TESTABLE else "fails"


def _evidence(v: Verdict) -> str:
    """What a verdict rests on beyond its rule: effect against its floor, raw and corrected p, and any note."""
    parts = []
    if v.effect is not None:
        parts.append(f"effect {v.effect:.3g} ({v.effect_units}; floor {v.effect_floor:g})")
    if v.p_value is not None:
        corrected = f", Holm-corrected {v.p_corrected:.3g}" if v.p_corrected is not None else ""
        draws = f" from {v.null_draws} null draws" if v.null_draws is not None else ""
        parts.append(f"p {v.p_value:.3g}{draws}{corrected}")
    if v.note:
        parts.append(v.note)
    return "; ".join(parts)


def _source_cell(source: str) -> str:
    """A claim's write-up, linked to its entry in the references under the table where it is cited."""
    found = cite(source)
    text = html.escape(source)
    return f'<a href="#ref-{found.key}">{text}</a>' if found else text


def _with_units(value: str, units: str) -> str:
    return html.escape(value) + (f'<br><span class="units">{html.escape(units)}</span>' if units else "")


def verdict_html(verdicts: Sequence[Verdict], reference_label: str,
                 other_sets: dict[str, Sequence[Verdict]] | None = None) -> str:
    """The summary table, printable: one numbered row per claim with its write-up (linked to its reference),
    the rule, the measured value and the reference's with their units, the verdict coloured and its robustness;
    (``other_sets``: prompt set -> its verdicts on the same claims) the verdict on each other set; what a
    verdict rests on beyond its rule (effect, p, notes) as numbered footnotes under the table; then the
    references cited."""
    other_sets = other_sets or {}
    rows, notes = [], []
    for i, v in enumerate(verdicts):
        evidence = _evidence(v)
        mark = ""
        if evidence:
            notes.append(f'<li id="note-{i + 1}" value="{i + 1}">{html.escape(evidence)}</li>')
            mark = f'<sup><a href="#note-{i + 1}">{i + 1}</a></sup>'
        cells = [f"<td>{i + 1}</td>", f"<td>{_source_cell(v.source)}</td>", f"<td>{html.escape(v.claim)}</td>",
                 f'<td class="rule">{html.escape(v.rule)}</td>', f"<td>{_with_units(v.measured, v.units)}</td>",
                 f"<td>{html.escape(v.reference)}</td>",
                 f'<td class="{_verdict_css(v.verdict)}">{html.escape(v.verdict)}{mark}</td>',
                 f'<td class="robust-{v.robustness.replace(" ", "-")}">{html.escape(v.robustness_text)}</td>']
        for theirs in other_sets.values():
            o = theirs[i]
            cells.append(f'<td class="{_verdict_css(o.verdict)}" title="{html.escape(_evidence(o))}">'
                         f"{html.escape(o.verdict)} ({html.escape(o.robustness)})</td>")
        if other_sets:
            agree = all(theirs[i].verdict == v.verdict for theirs in other_sets.values())
            cells.append(f"<td>{'yes' if agree else 'no'}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    heads = ["#", "write-up", "claim", "rule", "measured", reference_label, "verdict", "robustness"]
    heads += [f"on {name!r}" for name in other_sets] + (["sets agree"] if other_sets else [])
    header = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    footnotes = f'<ol class="footnotes">{"".join(notes)}</ol>' if notes else ""
    return (f'<table class="verdicts" id="verdicts"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f"{footnotes}"
            '<p class="note">Each verdict is computed from its rule (see <code>lensdyn.verdicts</code> and each '
            "analysis's <code>CLAIMS</code>); a numbered note gives the effect against its floor, the raw and "
            "Holm-corrected p, and why a claim is not testable. Robustness: the share of bootstrap resamples of the "
            "prompts in which the rule holds; robust when at least 95% of them agree with the verdict. The reference "
            "column applies the same measurement to each reference run (one value per untrained-control seed).</p>"
            + references_html(v.source for v in verdicts))


def references_html(sources) -> str:
    """The references of the write-ups ``sources`` name, in order of first citation, each with its anchor."""
    cited = [c for c in dict.fromkeys(cite(s) for s in sources) if c is not None]
    if not cited:
        return ""
    items = "".join(f'<li id="ref-{c.key}"><b>{html.escape(c.source)}</b>: {_citation_html(c)}</li>' for c in cited)
    return f'<h3>References</h3><ol class="references">{items}</ol>'


def _citation_html(c) -> str:
    text = html.escape(f"{c.authors} ({c.year}). {c.title}.")
    if c.identifier:
        text += " " + html.escape(c.identifier)
    if c.url:
        text += f' <a href="{html.escape(c.url)}">{html.escape(c.url)}</a>'
    return text + (f" ({html.escape(c.note)})" if c.note else "")


def matrix_html(rows: Sequence[dict], models: Sequence[str]) -> str:
    """A claims x models table (``lensdyn.app.study.verdict_matrix`` rows): the rule in its own column, per
    cell the verdict, coloured, its robustness and measured value, the control's under it (any note also on
    hover); the write-ups cited under it."""
    def cell(c: dict) -> str:
        hover = "; ".join(x for x in (f"rule: {c['rule']}", c.get("note", "")) if x)
        text = html.escape(c["verdict"]) + (f" ({html.escape(c['robustness'])})" if c["robustness"] else "")
        if c["measured"]:
            text += f"<br>{html.escape(c['measured'])}"
        if c["reference"] and c["reference"] != "-":
            text += f'<br><span class="note">control: {html.escape(c["reference"])}</span>'
        return f'<td class="{_verdict_css(c["verdict"])}" title="{html.escape(hover)}">{text}</td>'

    def rule(r: dict) -> str:  # one claim's rule is the same on every model
        return html.escape(next((c["rule"] for c in r["cells"].values() if c.get("rule")), ""))

    header = "".join(f"<th>{html.escape(h)}</th>" for h in ("write-up", "claim", "rule", *models))
    body = "".join(f"<tr><td>{_source_cell(r['source'])}</td><td>{html.escape(r['claim'])}</td>"
                   f'<td class="rule">{rule(r)}</td>' + "".join(cell(r["cells"][m]) for m in models) + "</tr>"
                   for r in rows)
    return (f'<table class="verdicts" id="matrix"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'
            + references_html(r["source"] for r in rows))


def render_html(title: str, sections: list[Section], subtitle: str = "", verdicts: Sequence[Verdict] = (),
                reference_label: str = "control", other_sets: dict[str, Sequence[Verdict]] | None = None,
                tables: Sequence[tuple[str, str]] = ()) -> str:
    """The report page as one HTML string with plotly.js inlined; the verdict table first when given, then
    ``tables`` (heading, HTML) before the sections."""
    from plotly.offline import get_plotlyjs

    body = [f"<h2>Summary: the write-ups' claims on this model</h2>{verdict_html(verdicts, reference_label, other_sets)}"]
    body = body if verdicts else []
    body += [f"<h2>{html.escape(heading)}</h2>{table}" for heading, table in tables]
    for i, section in enumerate(sections):
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        body.append(section.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}"))
        if section.csv:
            body.append(download_link(section.csv, f"{section.name or f'figure-{i}'}.csv"))
        if section.text:
            body.append(f'<div class="summary">{html.escape(section.text)}</div>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
.summary {{ background: #f6f6f6; padding: 1em; font-family: ui-monospace, monospace; font-size: 12px;
  white-space: pre-wrap; overflow-wrap: anywhere; }}
.units {{ color: #666; font-size: 11px; }} td.rule {{ font-size: 12px; color: #333; }}
ol.footnotes, ol.references {{ font-size: 12px; color: #444; padding-left: 2em; }}
a.download {{ font-size: 13px; }}
@media print {{ body {{ max-width: none; }} a {{ color: inherit; }} .download {{ display: none; }} }}
h1 {{ margin-bottom: 0.2em; }} .subtitle {{ color: #666; }} .note {{ color: #666; font-size: 12px; }}
table.verdicts {{ border-collapse: collapse; font-size: 13px; width: 100%; }}
table.verdicts th, table.verdicts td {{ border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }}
td.robust-fragile {{ color: #a15c00; }} td.robust-not-testable {{ color: #777; }}
td.holds {{ background: #d9f2d9; }} td.fails {{ background: #f8d7d7; }} td.untestable {{ background: #eeeeee; color: #555; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="subtitle">{html.escape(subtitle)}</p>
{chr(10).join(body)}
</body>
</html>
"""


def write_html(path: str | Path, title: str, sections: list[Section], subtitle: str = "", verdicts: Sequence[Verdict] = (),
               reference_label: str = "control", other_sets: dict[str, Sequence[Verdict]] | None = None,
               tables: Sequence[tuple[str, str]] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title, sections, subtitle, verdicts, reference_label, other_sets, tables), encoding="utf-8")
    return path


def download_link(text: str, filename: str) -> str:
    """A link that downloads ``text`` as ``filename`` from a ``data:`` URI, so the page stays self-contained."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return (f'<p><a class="download" download="{html.escape(filename)}" href="data:text/csv;base64,{payload}">'
            f"download this figure's per-layer table: {html.escape(filename)}</a> (long format, conventions in its "
            f"# header; every number, per-token ones too: <code>csv/{html.escape(filename)}</code> beside the report)</p>")


def find_chromium() -> str | None:
    """A Chromium or Chrome on PATH (kaleido drives it for static export), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


FIGURE_WIDTH = 1100  # px: the page's width, at which a figure without its own width is laid out and exported
FIGURE_HEIGHT = 500  # px: plotly's default, for a figure without its own height
STATIC_SCALE = 2.0  # kaleido's scale: 2 device pixels per layout pixel


def figure_size(figure) -> tuple[int, int]:
    """``(width, height)`` in layout pixels: the figure's own, else ``FIGURE_WIDTH`` x ``FIGURE_HEIGHT``."""
    return int(figure.layout.width or FIGURE_WIDTH), int(figure.layout.height or FIGURE_HEIGHT)


def static_dpi(scale: float | int = STATIC_SCALE) -> float:
    """The DPI a static image has when printed at its layout size: a layout pixel is a CSS pixel, 1/96 inch.

    >>> static_dpi(2)
    192.0
    """
    return 96.0 * scale


def export_figures(figures: dict[str, object], directory: str | Path, formats: Sequence[str],
                   scale: float | int = STATIC_SCALE) -> list[Path]:
    """Write every figure as ``<directory>/<name>.<format>`` (png, svg) through kaleido in one browser session,
    each at its own layout size (``figure_size``) times ``scale`` (a PNG of width ``w`` is ``w * scale``
    pixels wide: ``static_dpi(scale)`` at the layout size; an SVG keeps the layout size).

    Where kaleido or a Chromium is missing, prints one line saying so and writes nothing.
    """
    if not (scale > 0 and math.isfinite(scale)):
        from lensdyn.errors import ArgumentError

        raise ArgumentError(f"the static export scale must be a positive number, not {scale}")
    unknown = sorted(set(formats) - {"png", "svg"})
    if unknown:
        from lensdyn.errors import ArgumentError

        raise ArgumentError(f"static export formats are png and svg, not {unknown}")
    if not formats or not figures:
        return []
    try:
        import kaleido  # noqa: F401
    except ImportError:
        print("lensdyn: static export skipped: kaleido is not installed (pip install 'lensdyn[export]')", file=sys.stderr)
        return []
    browser = find_chromium()
    if browser is None:
        print("lensdyn: static export skipped: no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return []
    import os

    import plotly.io as pio

    os.environ.setdefault("BROWSER_PATH", browser)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.{fmt}" for fmt in formats for name in figures]
    sizes = [figure_size(figures[p.stem]) for p in paths]
    pio.write_images([figures[p.stem] for p in paths], paths, scale=scale,
                     width=[w for w, _ in sizes], height=[h for _, h in sizes])
    # kaleido's batch has been seen to drop one figure without an error (one of six, once in a report): each
    # one missing is written again on its own, and one still missing is an error, never a silent gap.
    for path, (w, h) in zip(paths, sizes):
        if not path.exists():
            pio.write_image(figures[path.stem], path, scale=scale, width=w, height=h)
        if not path.exists():
            raise RuntimeError(f"kaleido wrote no {path}")
    return paths
