"""Every citation of the design (`design.md#section` in code, help texts and docs) names a
section that docs/design.md has, and the design is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DESIGN = REPO / "docs" / "design.md"
CITATION = re.compile(r"design\.md#([a-z0-9-]+)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}


def citations() -> list[tuple[str, str]]:
    """(file, section) for every citation in the package, tests, benchmarks, docs and README."""
    files = [REPO / "README.md"] + [
        path
        for folder in ("flextron", "tests", "benchmarks", "docs")
        for path in (REPO / folder).rglob("*")
        if path.suffix in {".py", ".md", ".sh"} and path != Path(__file__)
    ]
    return [
        (str(path.relative_to(REPO)), section)
        for path in files
        for section in CITATION.findall(path.read_text())
    ]


def test_every_cited_design_section_exists() -> None:
    sections = anchors(DESIGN.read_text())
    found = citations()
    assert len(found) >= 10  # the method's steps are cited from the code that implements them
    missing = [f"{name}: design.md#{section}" for name, section in found if section not in sections]
    assert not missing, "\n".join(missing)


def test_no_reference_to_a_design_outside_the_repository() -> None:
    stale = [
        str(path.relative_to(REPO))
        for folder in ("flextron", "docs")
        for path in (REPO / folder).rglob("*")
        if path.suffix in {".py", ".md"} and re.search(r"DESIGN(\.md)? ?§", path.read_text())
    ]
    assert not stale


def test_anchor_rule() -> None:
    assert anchors("# A b\n## Latency tables\n### It's (x)\n") == {"a-b", "latency-tables", "its-x"}
