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


def verdict_html(verdicts: Sequence[Verdict], reference_label: str) -> str:
    """The summary table: one row per claim, grouped by write-up, the verdict cell coloured."""
    rows = []
    for v in verdicts:
        css = "holds" if v.verdict == HOLDS else "untestable" if v.verdict == NOT_TESTABLE else "fails"
        cells = (v.source, v.claim, v.measured, v.reference, v.verdict)
        rows.append("<tr>" + "".join(
            f'<td class="{css}" title="{html.escape(v.rule)}">{html.escape(c)}</td>' if i == 4 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ("write-up", "claim", "measured", reference_label, "verdict"))
    return (f'<table class="verdicts" id="verdicts"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="note">Each verdict is computed from the rule shown when hovering over it (see '
            "<code>lensdyn.verdicts</code> and each analysis's <code>CLAIMS</code>); the reference column applies the same "
            "measurement to the reference run.</p>")


def render_html(title: str, sections: list[Section], subtitle: str = "", verdicts: Sequence[Verdict] = (),
                reference_label: str = "control") -> str:
    """The report page as one HTML string with plotly.js inlined; the verdict table first when given."""
    from plotly.offline import get_plotlyjs

    body = [f"<h2>Summary: the write-ups' claims on this model</h2>{verdict_html(verdicts, reference_label)}"] if verdicts else []
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
               reference_label: str = "control") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title, sections, subtitle, verdicts, reference_label), encoding="utf-8")
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
