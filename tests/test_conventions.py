"""The measurement conventions live in the package (``lensdyn.conventions``); nothing in it points outside the repo."""
import re
from pathlib import Path

import lensdyn.conventions

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lensdyn"
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|/work/shared")


def test_the_ten_conventions_are_stated_with_their_status():
    doc = lensdyn.conventions.__doc__
    numbered = re.findall(r"^ ?(\d+)\. \*\*(.+?)\*\* \((implemented|implemented in part|planned)\)", doc, re.M)
    assert [int(n) for n, _, _ in numbered] == list(range(1, 11)), numbered


def test_no_source_file_points_outside_the_repo():
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for p in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "cite lensdyn.conventions instead:\n" + "\n".join(hits)
