"""The README and docs/ pages: every relative link and picture resolves, every test they cite exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+)(?:\[[^\]`]*\])?)?`|`(test_\w+)(?:\[[^\]`]*\])?`")


def prose(text: str) -> str:
    """The text of a page without code blocks, code spans and comments (their brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", COMMENT.sub("", text)))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (lower case, punctuation dropped, spaces -> '-')."""
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            base, n = slug, 1
            while slug in found:
                slug, n = f"{base}-{n}", n + 1
            found.add(slug)
    return found


def relative_links(page: Path) -> list[str]:
    """Targets of the page's links and pictures that are not absolute URLs or mail addresses."""
    targets = LINK.findall(prose(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_there_are_pages_to_check():
    names = {p.name for p in PAGES}
    assert {"README.md", "configuration.md", "checkpoints.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_picture_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)} has broken links (paths are relative to the page):\n" + "\n".join(
        broken
    )


def test_the_readme_links_every_docs_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link these docs/ pages: {unlinked}"


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions of a test file (top level or in classes), read without importing it."""
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def cited_tests(page: Path) -> list[tuple[str, str | None]]:
    """(file, test) pairs of the 'tested in' column; a bare `test_x` belongs to the file cited before it in its cell."""
    rows = [line for line in page.read_text().splitlines() if line.startswith("|")]
    header = next(i for i, row in enumerate(rows) if "tested in" in row)
    column = [c.strip() for c in rows[header].strip("|").split("|")].index("tested in")
    cited = []
    for row in rows[header + 2 :]:
        cell = row.strip("|").split("|")[column]
        current = None
        for file, name, bare in TEST_REF.findall(cell):
            current = file or current
            assert current, f"{page.name}: {bare} is cited before any test file in its cell: {cell}"
            cited.append((current, name or bare or None))
    return cited


def test_every_test_cited_for_checkpoints_exists():
    page = REPO / "docs/checkpoints.md"
    cited = cited_tests(page)
    assert len({name for _, name in cited if name}) >= 8, f"the 'tested in' column of {page.name} lost its tests"
    missing = []
    for file, name in cited:
        path = REPO / file
        if not path.is_file():
            missing.append(f"{file}: no such file")
        elif name and name not in defined_tests(path):
            missing.append(f"{file}::{name}: no such test")
    assert not missing, "docs/checkpoints.md cites tests that do not exist:\n" + "\n".join(missing)
