"""The report page's printable parts, without a browser: the verdict table, its references, the CSV downloads.

Each test builds its input by hand (a verdict, a small result), so what the page must show is known.
"""
import base64
import html
import io
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots

from lensdyn import citations, plots
from lensdyn.analyses import registry
from lensdyn.analyses.norms import NormsResult
from lensdyn.app.report import Section, download_link, figure_size, render_html, static_dpi, verdict_html
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.verdicts import HOLDS, Verdict


def _verdict(**overrides) -> Verdict:
    fields = dict(source=citations.PYTHIA.source, claim="last MLP expands", rule="last block's MLP gain > 1",
                  measured="58.55x", reference="1.02x", verdict=HOLDS, effect=0.4, effect_floor=0.1,
                  effect_units="share", p_value=0.004, p_corrected=0.012, null_draws=249, units="gain (ratio of norms)")
    return Verdict(**{**fields, **overrides})


def test_the_verdict_table_shows_rule_units_reference_and_numbered_footnotes_in_print():
    page = verdict_html([_verdict(), _verdict(claim="second", note="", effect=None, p_value=None)], "control")
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))  # what prints: the text, no hover titles
    assert "last block's MLP gain > 1" in text and "58.55x" in text and "1.02x" in text
    assert "gain (ratio of norms)" in text
    # The first row rests on an effect and a p: footnote 1; the second on its rule alone: no footnote.
    assert re.search(r'<li id="note-1" value="1">effect 0.4 \(share; floor 0.1\); p 0.004 from 249 null draws, '
                     r"Holm-corrected 0.012</li>", page)
    assert 'id="note-2"' not in page
    assert "title=" not in page.split("</table>")[0].split("<tbody>")[1]  # nothing only on hover


def test_each_write_up_links_to_its_reference_with_title_and_identifier():
    page = verdict_html([_verdict(source=citations.CURVATURE.source), _verdict(source="an uncited note")], "control")
    assert f'<a href="#ref-{citations.CURVATURE.key}">' in page
    entry = re.search(rf'<li id="ref-{citations.CURVATURE.key}">(.*?)</li>', page).group(1)
    assert "arXiv:2511.03060" in entry and citations.CURVATURE.authors in entry
    assert "an uncited note" in page and page.count('<li id="ref-') == 1  # cited once; an unknown source unlinked


def test_every_registered_claim_is_cited():
    sources = {c.source for a in registry.analyses() for c in getattr(a.result, "claims", ())}
    assert sources and all(citations.cite(s) is not None for s in sources), sources - {c.source for c in citations.CITATIONS}


def _norms(weights: str = "pretrained") -> NormsResult:
    states = np.array([1.0, 2.0, 4.0])
    provenance = Provenance(model="toy", weights=weights, seed=0, layout="pre-norm", prompt_set="hand", n_prompts=2,
                            n_tokens=4, lensdyn_version="0", created="now")
    return NormsResult(conventions=Conventions(aggregation="hand"), provenance=provenance, mean=states, std=states / 10,
                       median=states, q05=states / 2, q95=states * 2, first_position_mean=states * 3,
                       prompt_mean=np.stack([states, states]), prompt_labels=("a", "b"))


def test_csv_has_the_conventions_in_its_header_and_reads_back_with_the_reference():
    text = _norms().to_csv(reference=_norms("random"))
    header = [line for line in text.splitlines() if line.startswith("# ")]
    assert "# conventions.aggregation: hand" in header and "# reference.weights: random" in header
    frame = pd.read_csv(io.StringIO(text), comment="#")
    means = frame[(frame.statistic == "mean")].pivot_table(index="index", columns="role", values="value")
    assert means["model"].tolist() == means["reference"].tolist() == [1.0, 2.0, 4.0]


def test_the_download_link_carries_the_csv_itself():
    link = download_link("a,b\n1,2\n", "norms.csv")
    href = re.search(r'href="data:text/csv;base64,([^"]+)"', link).group(1)
    assert base64.b64decode(urllib.parse.unquote(href)).decode() == "a,b\n1,2\n"
    assert 'download="norms.csv"' in link


def test_the_page_wraps_summaries_and_never_scrolls_them_sideways():
    page = render_html("t", [Section("h", go.Figure(), "x" * 500, csv="a\n1\n", name="toy")])
    assert "<pre" not in page and '<div class="summary">' in page and "white-space: pre-wrap" in page
    assert 'download="toy.csv"' in page


def test_figure_size_and_the_stated_dpi():
    assert figure_size(go.Figure(layout={"height": 700})) == (1100, 700)
    assert figure_size(go.Figure(layout={"width": 640, "height": 480})) == (640, 480)
    assert static_dpi(2) == 192 and static_dpi(3) == 288


def test_colliding_subplot_titles_are_found_and_short_ones_pass():
    long = "a title far too long to fit above one of two columns of a figure 600 px wide"
    clash = make_subplots(rows=1, cols=2, subplot_titles=(long, long))
    assert plots.overlapping(plots.title_boxes(clash, 600, 400)) == [(long, long)]
    fine = make_subplots(rows=1, cols=2, subplot_titles=("left", "right"))
    assert plots.overlapping(plots.title_boxes(fine, 600, 400)) == []


def test_readme_lists_every_citation_as_lensdyn_citations_states_it():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    references = readme.split("## References", 1)[1].split("\n## ", 1)[0]
    for c in citations.CITATIONS:
        assert f"- **{c.source}**: {c.text()}" in references


@dataclass(frozen=True, eq=False)
class _PerTokenToy(Result):
    """A result with one per-state curve and one state x token array: per_layer keeps the first only."""

    curve: Float[np.ndarray, " state"]
    norms: Float[np.ndarray, "state token"]


def test_the_per_layer_csv_keeps_the_per_layer_rows_and_drops_per_token_ones():
    toy = _PerTokenToy(conventions=Conventions(aggregation="hand"), provenance=_norms().provenance,
                       curve=np.array([1.0, 2.0]), norms=np.arange(6.0).reshape(2, 3))
    full = pd.read_csv(io.StringIO(toy.to_csv()), comment="#")
    layer = pd.read_csv(io.StringIO(toy.to_csv(per_layer=True)), comment="#")
    assert len(full) == 2 + 6 and sorted(layer.statistic.unique()) == ["curve"] and layer.value.tolist() == [1.0, 2.0]
