"""Guards on what the docs and docstrings claim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_agpo_formulas_are_named_not_numbered():
    """Issue 10: the README and docstrings numbered the paper's equations wrongly, and the arXiv
    versions of the paper number them differently. Formulas are cited by name (m1, m2)."""
    files = [
        *ROOT.joinpath("agpo_megatron").rglob("*.py"),
        *ROOT.joinpath("docs").rglob("*.md"),
        ROOT / "README.md",
        *ROOT.joinpath("examples").rglob("*.yaml"),
    ]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bEqs?\.\s*\d", line)
    ]
    assert not hits, f"equation numbers cited: {hits}"
