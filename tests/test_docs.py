"""The documentation holds together: every relative link resolves, and the README stays short.

Checked in README.md and docs/*.md: every relative Markdown link, ``[text](path)`` or
``[text](path#anchor)`` (images and ``<img src>`` too), points to a file or folder of the
repository, relative to the linking file; and an ``#anchor`` into a Markdown file matches
one of its headings under GitHub's slug rules. http(s) and mailto links are not checked,
nor anything inside code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
README = PROJECT_ROOT / "README.md"
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the text may hold one level of brackets.
MARKDOWN_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?:<([^>]*)>|([^\s()]*))(?:\s+[\"'(][^)]*)?\s*\)"
)
HTML_SOURCE = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
NOT_CHECKED = re.compile(r"^(?:https?:|mailto:)", re.I)


@dataclass(frozen=True)
class Link:
    source: Path  # the Markdown file the link is in
    line: int
    target: str  # as written: path, path#anchor or #anchor

    def __str__(self) -> str:
        return f"{self.source.relative_to(PROJECT_ROOT)}:{self.line}: ({self.target})"


def markdown_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """README.md and every page in docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
        else:
            lines.append((number, line))
    return lines


def links_in(path: Path) -> list[Link]:
    """The relative links of a Markdown file; http(s) and mailto links left out."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)  # `[text](path)` in code is an example, not a link
        targets = [m.group(1) or m.group(2) or "" for m in MARKDOWN_LINK.finditer(line)]
        targets += HTML_SOURCE.findall(line)
        found += [Link(path, number, t) for t in targets if not NOT_CHECKED.match(t)]
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every anchor a Markdown file offers; repeated headings get -1, -2, ... as on GitHub."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        anchors.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading is None:
            continue
        slug = github_slug(heading.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_file(link: Link, root: Path = PROJECT_ROOT) -> str | None:
    """Why the link's path does not resolve, or None when it does."""
    path = unquote(link.target.partition("#")[0])
    if not path:
        return None  # "#anchor": this very file
    if path.startswith("/"):
        return "absolute path: write it relative to the linking file"
    resolved = (link.source.parent / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file or folder"
    return None


def broken_anchor(link: Link) -> str | None:
    """Why the link's #anchor names no heading of the Markdown file it points into, or None."""
    path, _, anchor = link.target.partition("#")
    if not anchor:
        return None
    target = (link.source.parent / unquote(path)).resolve() if path else link.source
    if target.suffix.lower() != ".md" or not target.is_file():
        return None
    if unquote(anchor) in anchors_of(target):
        return None
    return f"no heading with the anchor #{anchor} in {target.name}"


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(PROJECT_ROOT)) for path in paths]


PAGES = markdown_files()


def test_readme_has_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_the_readme_and_docs_pages_are_found():
    assert README in PAGES
    assert len(PAGES) > 1, "no Markdown pages in docs/"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_points_to_an_existing_file_in_the_repository(page):
    broken = [f"{link}: {why}" for link in links_in(page) if (why := broken_file(link))]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_anchor_into_a_markdown_file_matches_a_heading_there(page):
    broken = [f"{link}: {why}" for link in links_in(page) if (why := broken_anchor(link))]
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    linked = {
        (link.source.parent / unquote(link.target.partition("#")[0])).resolve()
        for page in PAGES
        for link in links_in(page)
        if link.target.partition("#")[0]
    }
    orphans = [str(page.relative_to(PROJECT_ROOT)) for page in PAGES[1:] if page not in linked]
    assert not orphans, f"no link leads to {orphans}"


def test_docs_pages_named_in_the_code_exist():
    sources = [PROJECT_ROOT / "Makefile"]
    for folder in ("classifier", "stages", "tools", "benchmarks"):
        sources += sorted((PROJECT_ROOT / folder).rglob("*.py"))
    named = {
        (name, source.relative_to(PROJECT_ROOT))
        for source in sources
        for name in re.findall(r"\bdocs/[\w.-]+\.md\b", source.read_text(encoding="utf-8"))
    }
    missing = [
        f"{source} names {name}"
        for name, source in sorted(named)
        if not (PROJECT_ROOT / name).is_file()
    ]
    assert not missing, "\n".join(missing)


# The checker itself, on pages written for the purpose.


def test_slugs_follow_githubs_rules():
    assert github_slug("Interrupted training, and resuming it") == (
        "interrupted-training-and-resuming-it"
    )
    assert github_slug("dvc.yaml deps are checked") == "dvcyaml-deps-are-checked"
    assert github_slug("The `train.resume` knob: on/off") == "the-trainresume-knob-onoff"
    assert github_slug("Snake_case and 99.6 %") == "snake_case-and-996-"
    assert github_slug("See [the data](data.md)") == "see-the-data"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Notes\n\n## Setup\n\n## Setup\n\n## The `train.resume` knob\n\n"
        "```bash\n# not a heading\n```\n"
    )
    assert anchors_of(page) == {"notes", "setup", "setup-1", "the-trainresume-knob"}


def test_links_in_code_and_external_links_are_not_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        'See [local](a.md#b), ![pic](p.png) and <img src="q.png" width="40%">.\n'
        "[web](https://example.com/x) [mail](mailto:a@b.c) `[code](c.md)`\n"
        "```\n[fenced](d.md)\n```\n"
    )
    assert [link.target for link in links_in(page)] == ["a.md#b", "p.png", "q.png"]


def test_a_missing_file_or_heading_is_reported_as_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Real heading\n")
    source = tmp_path / "README.md"
    source.write_text("x\n")

    def link(target: str) -> Link:
        return Link(source, 1, target)

    assert broken_file(link("docs/page.md"), tmp_path) is None
    assert broken_file(link("docs/missing.md"), tmp_path) == "no such file or folder"
    assert broken_file(link("../outside.md"), tmp_path) == "points outside the repository"
    assert broken_anchor(link("docs/page.md#real-heading")) is None
    assert broken_anchor(link("docs/page.md#no-such-heading")) == (
        "no heading with the anchor #no-such-heading in page.md"
    )
