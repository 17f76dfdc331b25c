"""The write-ups whose claims lensdyn tests, cited once: the report's verdict table and README's References.

Each ``Citation`` has the short ``source`` name a ``verdicts.Claim`` carries (the analyses import it
from here, so a claim and its reference cannot drift apart), the title, the authors as the write-up
states them, and where it can be found (an arXiv id, a DOI, an address) where it is public. The
three notes without a public address say so rather than invent one.

>>> cite(FLRW.source).title
'FLRW-Style Metric Expansion in Transformers'
>>> cite("a write-up nobody cited") is None
True
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Citation:
    """One write-up: its short name in the verdict table, and the reference a reader can follow."""

    key: str  # the anchor of its entry (``#ref-<key>`` in the report)
    source: str  # the short name claims carry (``Claim.source``)
    title: str
    authors: str
    year: str
    identifier: str = ""  # arXiv id or DOI where public
    url: str = ""
    note: str = ""  # what the entry is, where it is not a paper

    def text(self) -> str:
        """One line: authors (year), title, identifier, address, note.

        >>> print(Citation("k", "s", "A title", "A. Author", "2025", "arXiv:1", "https://x").text())
        A. Author (2025). A title. arXiv:1 https://x
        """
        parts = [f"{self.authors} ({self.year}). {self.title}.", self.identifier, self.url,
                 self.note and f"({self.note})"]
        return " ".join(p for p in parts if p)


FLRW = Citation(
    "flrw", "FLRW expansion note", "FLRW-Style Metric Expansion in Transformers", "Jeffery Harrell, Alpha",
    "2025", note="hypothesis note of Project Azimuth, 29 October 2025; not published; claims numbered 1-6 there",
)
STATELENS = Citation(
    "statelens", "expansion-system study (statelens)",
    "The Transformer Expansion System: Geometry of Representation and Dynamics of Mixing", "StateLens Project",
    "2026", "doi:10.5281/zenodo.18948375", "https://doi.org/10.5281/zenodo.18948375",
    note="data set and code on Zenodo",
)
CURVATURE = Citation(
    "curvature", "curvature paper (arXiv 2511.03060)",
    "[title not in the stored copy] a geometric framework for Transformers by analogy to General Relativity",
    "Jairo Diaz-Rodriguez", "2025", "arXiv:2511.03060", "https://doi.org/10.48550/arXiv.2511.03060",
    note="lensdyn read its abstract page; the identifier leads to the paper and its title",
)
PYTHIA = Citation(
    "pythia", "Pythia FFN expansion note", "FFN Expansion Analysis: Pythia-6.9B (Cross-Model Validation)",
    "unattributed", "2026", note="experiment note dated 5 January 2026, reference Pythia-1.4B; not published",
)
METASTABLE = Citation(
    "metastability", "metastability sequence (Phase 1)",
    "Analysis of Metastable States in the Transformer Activation Space (first post of a sequence, Phase 1)",
    "unattributed", "n.d.", note="blog sequence testing Geshkovski, Letrouit, Polyanskiy and Rigollet's "
    "'A mathematical perspective on Transformers' (arXiv:2312.10794) on trained models",
)
SUN = Citation(
    "sun2024", "Sun et al. 2024, Massive Activations", "Massive Activations in Large Language Models",
    "Mingjie Sun, Xinlei Chen, J. Zico Kolter, Zhuang Liu", "2024", "arXiv:2402.17762",
    "https://arxiv.org/abs/2402.17762",
)
LOGIT_LENS = Citation(
    "logitlens", "logit lens (nostalgebraist 2020)", "interpreting GPT: the logit lens", "nostalgebraist", "2020",
    url="https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru/interpreting-gpt-the-logit-lens",
)
TUNED_LENS = Citation(
    "tunedlens", "tuned lens (Belrose et al. 2023)", "Eliciting Latent Predictions from Transformers with the Tuned Lens",
    "Nora Belrose, Zach Furman, Logan Smith, Danny Halawi, Igor Ostrovsky, Lev McKinney, Stella Biderman, "
    "Jacob Steinhardt", "2023", "arXiv:2303.08112", "https://arxiv.org/abs/2303.08112",
)
LENSDYN = Citation("lensdyn", "lensdyn", "lensdyn's own claims", "this toolkit", "-",
                   note="a claim lensdyn states itself, judged by the same rules")

CITATIONS: tuple[Citation, ...] = (FLRW, STATELENS, CURVATURE, PYTHIA, METASTABLE, SUN, LOGIT_LENS, TUNED_LENS, LENSDYN)
_BY_SOURCE = {c.source: c for c in CITATIONS}


def cite(source: str) -> Citation | None:
    """The citation of a claim's ``source``, or None for a source not in ``CITATIONS``."""
    return _BY_SOURCE.get(source)
