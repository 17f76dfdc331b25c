"""Write README's support matrix from the zoo tests' own outcomes, never by hand.

Runs ``tests/test_zoo.py`` (one tiny random checkpoint per architecture family, loaded with
``ld.load_model``) and turns each test's outcome per family into one cell:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/support_matrix.py          # rewrites README.md between the markers
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/support_matrix.py --print  # prints the table only
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- support-matrix: begin (scripts/support_matrix.py) -->", "<!-- support-matrix: end -->"
COLUMNS = {  # column -> the zoo test that decides it
    "capture, self-test, identities, HF hidden states": "test_layout_self_test_and_hugging_face_hidden_states",
    "default analyses finite": "test_default_report_analyses_are_finite",
    "Jacobian vs dense": "test_one_block_jacobian_against_a_dense_one",
    "block map at its base point": "test_the_block_map_at_its_base_point_is_the_next_state_encoders_included",
    "steering": "test_a_steering_vector_lands_at_its_block",
    "patching vs brute-force HF": "test_a_patch_sweep_equals_brute_force_hugging_face_patching",
}
NOTES = {
    ("albert", "default analyses finite"): "yes (no causal metric: W_U reads embedding_size)",
    ("bert", "patching vs brute-force HF"): "refused (encoder)",
    ("albert", "patching vs brute-force HF"): "refused (encoder)",
}


class Outcomes:
    """A pytest plugin that records each zoo test's outcome per family."""

    def __init__(self):
        self.cells: dict[str, dict[str, str]] = defaultdict(dict)

    def pytest_runtest_logreport(self, report):
        match = re.match(r".*::(\w+)\[(\w+)\]$", report.nodeid)
        if match and (report.when == "call" or report.outcome != "passed"):
            test, family = match.groups()
            self.cells[family][test] = "yes" if report.outcome == "passed" else report.outcome.upper()


def table(outcomes: Outcomes) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import LAYOUTS

    header = ["family", "layout", *COLUMNS]
    rows = [header, ["---"] * len(header)]
    for family in sorted(outcomes.cells, key=lambda f: (list(LAYOUTS.values()).index(LAYOUTS[f]), f)):
        cells = outcomes.cells[family]
        rows.append([family, LAYOUTS[family]] + [
            NOTES.get((family, column), cells.get(test, "not run")) if cells.get(test) == "yes" else cells.get(test, "not run")
            for column, test in COLUMNS.items()])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of rewriting README.md")
    args = parser.parse_args()
    outcomes = Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_zoo.py")], plugins=[outcomes])
    text = table(outcomes)
    if args.print:
        print(text)
    else:
        readme = ROOT / "README.md"
        old = readme.read_text(encoding="utf-8")
        start, end = old.index(BEGIN) + len(BEGIN), old.index(END)
        readme.write_text(old[:start] + "\n" + text + "\n" + old[end:], encoding="utf-8")
        print(f"support matrix of {len(outcomes.cells)} families written to README.md")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
