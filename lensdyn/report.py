"""Self-contained HTML reports: plotly.js is embedded once, so a report opens offline."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Section:
    """One heading, one figure, and the text table under it."""

    heading: str
    figure: object  # a plotly Figure
    text: str = ""


def render_html(title: str, sections: list[Section], subtitle: str = "") -> str:
    """The report page as one HTML string with plotly.js inlined."""
    from plotly.offline import get_plotlyjs

    body = []
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
h1 {{ margin-bottom: 0.2em; }} .subtitle {{ color: #666; }}
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


def write_html(path: str | Path, title: str, sections: list[Section], subtitle: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title, sections, subtitle), encoding="utf-8")
    return path
