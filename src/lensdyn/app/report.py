"""Self-contained HTML reports: plotly.js is embedded once, so a report opens offline.

The page opens with the verdict table (``lensdyn.verdicts``): every write-up claim the chosen
analyses test, the value measured on the model, the same measurement on the reference (the
untrained control or a ``--compare`` model), and the verdict its stated rule gives. Then one
section per analysis (``analysis_section``): its declared heading, its figure, its text summary.
"""
from __future__ import annotations

import html
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lensdyn.verdicts import HOLDS, NOT_TESTABLE, Verdict


@dataclass(frozen=True)
class Section:
    """One heading, one figure, and the text table under it."""

    heading: str
    figure: object  # a plotly Figure
    text: str = ""


def analysis_section(analysis, model, reference=None) -> Section:
    """The section of one analysis (a ``registry.Analysis``): its result on the model, and a reference
    run where the result keeps one apart (a result holding its control draws that itself)."""
    heading = f"{analysis.heading} of {model.provenance.model}"
    if reference is None or not analysis.keeps_reference_apart:
        return Section(heading, model.figure(), model.summary())
    return Section(heading, model.figure(control=reference), f"{model.summary()}\n\n{reference.summary()}")


def _verdict_css(verdict: str) -> str:
    return "holds" if verdict == HOLDS else "untestable" if verdict == NOT_TESTABLE else "fails"


def _evidence(v: Verdict) -> str:
    """The hover text of a verdict: its rule, effect against its floor, raw and corrected p, and any note."""
    parts = [f"rule: {v.rule}"]
    if v.effect is not None:
        parts.append(f"effect {v.effect:.3g} ({v.effect_units}; floor {v.effect_floor:g})")
    if v.p_value is not None:
        corrected = f", Holm-corrected {v.p_corrected:.3g}" if v.p_corrected is not None else ""
        draws = f" from {v.null_draws} null draws" if v.null_draws is not None else ""
        parts.append(f"p {v.p_value:.3g}{draws}{corrected}")
    if v.note:
        parts.append(v.note)
    return "; ".join(parts)


def verdict_html(verdicts: Sequence[Verdict], reference_label: str,
                 other_sets: dict[str, Sequence[Verdict]] | None = None) -> str:
    """The summary table: one row per claim, the verdict cell coloured, its robustness beside it, and
    (``other_sets``: prompt set -> its verdicts on the same claims) the verdict on each other set."""
    other_sets = other_sets or {}
    rows = []
    for i, v in enumerate(verdicts):
        cells = [html.escape(c) for c in (v.source, v.claim, v.measured, v.reference)]
        cells.append(f'<td class="{_verdict_css(v.verdict)}" title="{html.escape(_evidence(v))}">{html.escape(v.verdict)}</td>')
        cells.append(f'<td class="robust-{v.robustness.replace(" ", "-")}" title="{html.escape(v.note)}">'
                     f"{html.escape(v.robustness_text)}</td>")
        for theirs in other_sets.values():
            o = theirs[i]
            cells.append(f'<td class="{_verdict_css(o.verdict)}" title="{html.escape(_evidence(o))}">'
                         f"{html.escape(o.verdict)} ({html.escape(o.robustness)})</td>")
        if other_sets:
            agree = all(theirs[i].verdict == v.verdict for theirs in other_sets.values())
            cells.append(f"<td>{'yes' if agree else 'no'}</td>")
        rows.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = ["write-up", "claim", "measured", reference_label, "verdict", "robustness"]
    heads += [f"on {name!r}" for name in other_sets] + (["sets agree"] if other_sets else [])
    header = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    return (f'<table class="verdicts" id="verdicts"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="note">Each verdict is computed from its rule (hover over it for the rule, the effect against its '
            "floor, and the raw and Holm-corrected p; see <code>lensdyn.verdicts</code> and each analysis's "
            "<code>CLAIMS</code>). Robustness: the share of bootstrap resamples of the prompts in which the rule holds; "
            "robust when at least 95% of them agree with the verdict. The reference column applies the same "
            "measurement to each reference run (one value per untrained-control seed).</p>")


def matrix_html(rows: Sequence[dict], models: Sequence[str]) -> str:
    """A claims x models table (``lensdyn.app.study.verdict_matrix`` rows): per cell the verdict, coloured,
    its robustness and measured value, the control's under it; the rule and any note on hover."""
    def cell(c: dict) -> str:
        hover = "; ".join(x for x in (f"rule: {c['rule']}", c.get("note", "")) if x)
        text = html.escape(c["verdict"]) + (f" ({html.escape(c['robustness'])})" if c["robustness"] else "")
        if c["measured"]:
            text += f"<br>{html.escape(c['measured'])}"
        if c["reference"] and c["reference"] != "-":
            text += f'<br><span class="note">control: {html.escape(c["reference"])}</span>'
        return f'<td class="{_verdict_css(c["verdict"])}" title="{html.escape(hover)}">{text}</td>'

    header = "".join(f"<th>{html.escape(h)}</th>" for h in ("write-up", "claim", *models))
    body = "".join(f"<tr><td>{html.escape(r['source'])}</td><td>{html.escape(r['claim'])}</td>"
                   + "".join(cell(r["cells"][m]) for m in models) + "</tr>" for r in rows)
    return f'<table class="verdicts" id="matrix"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


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
        if section.text:
            body.append(f"<pre>{html.escape(section.text)}</pre>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}
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


def find_chromium() -> str | None:
    """A Chromium or Chrome on PATH (kaleido drives it for static export), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


def export_figures(figures: dict[str, object], directory: str | Path, formats: Sequence[str]) -> list[Path]:
    """Write every figure as ``<directory>/<name>.<format>`` (png, svg) through kaleido in one browser session.

    Where kaleido or a Chromium is missing, prints one line saying so and writes nothing.
    """
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
    pio.write_images([figures[p.stem] for p in paths], paths, width=1100)
    return paths
