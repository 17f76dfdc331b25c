"""Figure conventions the analyses share: colours, bands, log ticks, grouped legends, title boxes, a prompt menu.

The model is drawn in colour and its untrained control in grey, everywhere (``MODEL``, ``CONTROL``).
A per-layer curve whose statistic has a spread carries a band (``band``) that says in its legend
what it spans. A multi-panel figure groups its legend by panel (``legend_by_panel``: one titled
group per panel, in the right margin, so it covers no panel). ``title_boxes`` estimates where
subplot titles print, for the check that no two collide (tests/test_report_page.py).

Plotly is imported by the functions that draw, never at import time.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Real

MODEL = "#1f77b4"  # the model's primary colour (a second series: MODEL_2)
MODEL_2 = "#d62728"
CONTROL = "#7f7f7f"  # the untrained control (a second series: CONTROL_2)
CONTROL_2 = "#bbbbbb"
TITLE_FONT = 13  # px: subplot titles
GLYPH_EM = 0.6  # an upper estimate of a sans-serif glyph's mean advance, in em (the measured mean is ~0.5)


def rgba(colour: str, alpha: float) -> str:
    """``#rrggbb`` as a CSS ``rgba(...)`` with opacity ``alpha`` (a band's fill).

    >>> rgba("#1f77b4", 0.2)
    'rgba(31, 119, 180, 0.2)'
    """
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha:g})"


def band(x: Real[np.ndarray, " n"], low: Float[np.ndarray, " n"], high: Float[np.ndarray, " n"], colour: str,
         name: str, **trace):
    """A filled band from ``low`` to ``high`` over ``x`` as one closed scatter trace (no hover); ``name`` says
    what it spans ("5-95% of prompts", "bootstrap 90% over prompts")."""
    import plotly.graph_objects as go

    x = np.asarray(x)
    return go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([high, np.asarray(low)[::-1]]),
                      fill="toself", fillcolor=rgba(colour, 0.18), line={"width": 0}, hoverinfo="skip",
                      mode="lines", name=name, **trace)


def log_ticks(values: Sequence) -> dict:
    """Tick settings for a log axis over ``values`` (numbers or arrays of any lengths): a tick at every power of ten (``dtick=1``) where they span
    a decade or more, else plotly's own ticks (a range inside one decade holds no power of ten to label).

    >>> log_ticks([3.0, 4000.0])
    {'dtick': 1, 'exponentformat': 'power'}
    >>> log_ticks([0.8, 1.5])
    {}
    """
    v = np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in values]) if len(values) else np.zeros(0)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) == 0 or np.log10(v.max()) - np.log10(v.min()) < 1:
        return {}
    return {"dtick": 1, "exponentformat": "power"}


def legend_by_panel(fig, titles: Sequence[str], font_size: int = 10) -> None:
    """One legend in the right margin, grouped by panel: every trace of panel ``k`` (row-major, its axes
    ``x{k+1}``/``y{k+1}``) joins group ``panel-k``, headed ``titles[k]``; a trace's own ``legendgroup`` is
    replaced (a click then hides one entry, ``groupclick="toggleitem"``)."""
    titled = set()
    for trace in fig.data:
        axis = getattr(trace, "xaxis", None) or "x"
        k = int(axis[1:] or 1) - 1
        trace.legendgroup = f"panel-{k}"
        if trace.showlegend is not False and k not in titled and k < len(titles):
            trace.legendgrouptitle = {"text": titles[k], "font": {"size": font_size + 1}}
            titled.add(k)
    fig.update_layout(legend={"x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top", "font": {"size": font_size},
                              "tracegroupgap": 10, "groupclick": "toggleitem"})


def shrink_subplot_titles(fig, size: int = TITLE_FONT) -> None:
    """Subplot titles at ``size`` px (plotly's default, 16, is the figure title's and crowds a grid)."""
    for annotation in fig.layout.annotations:
        if annotation.xref == "paper" and annotation.yref == "paper" and annotation.yanchor == "bottom":
            annotation.font = {"size": size}


def title_boxes(fig, width: int, height: int) -> list[tuple[str, float, float, float, float]]:
    """``(text, x0, y0, x1, y1)`` in paper coordinates of every subplot title (a paper-anchored annotation) of
    ``fig`` drawn at ``width`` x ``height`` px: an estimate, not a measurement.

    Width: characters x font size x ``GLYPH_EM`` (an upper estimate of a sans-serif glyph's advance;
    ``<br>`` breaks lines, the longest counts), height: lines x 1.3 x font size, both divided by the plot
    area's size in px (the figure less its margins, plotly's defaults where unset), placed by the
    annotation's anchor.

    >>> import plotly.graph_objects as go
    >>> fig = go.Figure(layout={"margin": {"l": 0, "r": 0, "t": 0, "b": 0}})
    >>> _ = fig.add_annotation(text="abcde", x=0.5, y=1, xref="paper", yref="paper", xanchor="center",
    ...                        yanchor="bottom", showarrow=False, font={"size": 10})
    >>> [round(v, 3) for v in title_boxes(fig, 100, 100)[0][1:]]
    [0.35, 1.0, 0.65, 1.13]
    """
    left, right, top, bottom = margins(fig)
    plot_w, plot_h = width - left - right, height - top - bottom
    default = fig.layout.font.size or 12
    boxes = []
    for a in fig.layout.annotations:
        if a.xref != "paper" or a.yref != "paper" or not a.text:
            continue
        lines = str(a.text).split("<br>")
        size = (a.font.size if a.font and a.font.size else default)
        w = max(len(line) for line in lines) * size * GLYPH_EM / plot_w
        h = len(lines) * 1.3 * size / plot_h
        x0 = a.x - {"left": 0.0, "right": 1.0}.get(a.xanchor, 0.5) * w
        y0 = a.y - {"bottom": 0.0, "top": 1.0}.get(a.yanchor, 0.5) * h
        boxes.append((str(a.text), x0, y0, x0 + w, y0 + h))
    return boxes


def margins(fig) -> tuple[float, float, float, float]:
    """``(left, right, top, bottom)`` margins of ``fig`` in px: its own, plotly's defaults (80, 80, 100, 80) where
    unset, the right one widened to a legend beside the plot (plotly widens it so: ``legend_width``)."""
    m = fig.layout.margin
    left, right, top, bottom = (float(default if value is None else value)
                                for value, default in ((m.l, 80), (m.r, 80), (m.t, 100), (m.b, 80)))
    return left, max(right, legend_width(fig)), top, bottom


def legend_width(fig) -> float:
    """An estimate, in px, of the widest legend placed right of the plot (x >= 1, plotly's default place):
    its longest entry or group title at ``GLYPH_EM`` per character, plus 50 px of symbol and padding; 0 with none.

    >>> import plotly.graph_objects as go
    >>> fig = go.Figure([go.Scatter(y=[1], name="a" * 10), go.Scatter(y=[2], name="b")], layout={"font": {"size": 10}})
    >>> legend_width(fig)
    110.0
    """
    shown = [t for t in fig.data if t.showlegend is not False and t.visible is not False]
    if not shown or fig.layout.showlegend is False or (len(shown) == 1 and fig.layout.showlegend is None):
        return 0.0
    widest = 0.0
    for trace in shown:
        legend = fig.layout[trace.legend or "legend"]
        if legend.x is not None and legend.x < 1:
            continue
        size = (legend.font.size if legend.font and legend.font.size else None) or fig.layout.font.size or 12
        group = trace.legendgrouptitle.text if trace.legendgrouptitle and trace.legendgrouptitle.text else ""
        widest = max(widest, max(len(trace.name or ""), len(group)) * size * GLYPH_EM + 50)
    return widest


def paper_extent(fig, width: int) -> tuple[float, float]:
    """The figure's left and right edges in paper coordinates (0 and 1 are the plot area's) at ``width`` px.

    >>> import plotly.graph_objects as go
    >>> paper_extent(go.Figure(layout={"margin": {"l": 50, "r": 50}}), 200)
    (-0.5, 1.5)
    """
    left, right, _, _ = margins(fig)
    plot_w = width - left - right
    return -left / plot_w, 1 + right / plot_w


def overlapping(boxes: Sequence[tuple[str, float, float, float, float]]) -> list[tuple[str, str]]:
    """The pairs of ``title_boxes`` whose rectangles overlap.

    >>> overlapping([("a", 0.0, 0.0, 1.0, 1.0), ("b", 0.5, 0.5, 2.0, 2.0), ("c", 3.0, 3.0, 4.0, 4.0)])
    [('a', 'b')]
    """
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def prompt_menu(labels: Sequence[str], n_traces: int, first: int = 0, per_prompt: int = 1, **placement) -> dict:
    """A plotly dropdown (one ``updatemenus`` entry) that shows one prompt's traces at a time: of the figure's
    ``n_traces`` traces, ``per_prompt`` per prompt from index ``first`` on, in ``labels``' order; the rest stay.

    >>> menu = prompt_menu(["a", "b"], 4, first=1)
    >>> [b["args"][0]["visible"] for b in menu["buttons"]]
    [[True, True, False, True], [True, False, True, True]]
    """
    span = range(first, first + len(labels) * per_prompt)
    buttons = [{"label": label, "method": "restyle",
                "args": [{"visible": [j not in span or (j - first) // per_prompt == i for j in range(n_traces)]}]}
               for i, label in enumerate(labels)]
    return {"buttons": buttons, "direction": "down", "showactive": True, "active": 0, **placement}
