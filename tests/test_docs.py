"""The README and docs/ hold together: every relative link points to a file (and heading) that
exists, every repository path they name is in the repository, nothing cites notes that are not
part of it, and the README stays a front door that opens with the two commands a fresh machine
runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 320
# Notes kept outside the repository; spelt in pieces so this file does not name them itself.
OUTSIDE_NOTES = ("DESIGN" + ".md", ".." + "/shared")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:comm_cli|scripts|tests|conf|docs|\.ci)/[\w./-]*)")


def prose(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` there is not a heading)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page.read_text()), flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_relative_link_points_to_something_that_exists(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(
                f"{target} (no file {resolved.relative_to(REPO) if REPO in resolved.parents else resolved})"
            )
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {name(resolved)})")
    assert not broken, f"{name(page)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_repository_path_a_page_names_exists(page):
    missing = sorted(
        {
            path.rstrip(".,:;")
            for path in REPO_PATH.findall(page.read_text())
            if not (REPO / path.rstrip(".,:;")).exists()
        }
    )
    assert not missing, f"{name(page)} names paths that are not in the repository: {missing}"


def test_nothing_cites_notes_outside_the_repository():
    roots = [README, REPO / "Makefile", REPO / "pyproject.toml"]
    for folder in ("docs", "comm_cli", "scripts", "conf", "tests", ".ci"):
        roots += [p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    citing = [
        name(p)
        for p in roots
        if p.suffix in ("", ".md", ".py", ".yaml", ".sh", ".toml", ".txt")
        and any(note in p.read_text(errors="ignore") for note in OUTSIDE_NOTES)
    ]
    assert not citing, f"these files cite notes that are not in the repository: {citing}"


def test_the_readme_is_a_front_door_that_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}"
    )
    assert lines[0].startswith("# ")
    opening = next(i for i, line in enumerate(lines) if line.strip())
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert fence <= opening + 2, "the README must open with its commands, right after the title"
    assert lines[fence].strip() == "```bash"
    commands = []
    for line in lines[fence + 1 :]:
        if line.startswith("```"):
            break
        commands.append(line.split("#")[0].strip())
    assert commands == ["make demo", "make test"]


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [name(p) for p in PAGES[1:] if f"]({name(p)})" not in text]
    assert not unlinked, f"docs pages a README reader cannot find: {unlinked}"
