"""The project documents itself (docs/architecture.md): code comments cite `docs/` pages, so every
citation of a page (`docs/model.md`) or of a section (`docs/model.md#matcher`) in a source file must
name a page that exists and, with an anchor, a heading on it, by GitHub's anchor rules; links between
the docs pages must resolve the same way; and no source file may refer to the team's specification
documents, which live outside the repository."""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCE_DIRS = ("core", "data_prep", "model", "pipeline", "orchestration", "cli", "csrc", "configs", "benchmarks",
               "tests", "docs")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".h", ".yaml", ".md")
TOP_LEVEL_FILES = ("README.md",)
SKIPPED_DIRS = ("tests/fixtures",)  # third-party data samples, not ours to edit

CITATION = re.compile(r"docs/([A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*\.md)(?:#([A-Za-z0-9_-]+))?")
DOCS_LINK = re.compile(r"\]\((?![a-z]+://)([A-Za-z0-9_./-]*\.md)?(?:#([A-Za-z0-9_-]+))?\)")
# The spec documents that live outside the repository, however a comment names them. Each word is
# split in two here so that this file does not match its own pattern.
OUTSIDE_REFERENCE = re.compile("|".join((
    "MODEL" r"_SPEC",
    "DESIGN" r"\.md",
    "DESIGN" r"\s*(?:§|section\s|\d)",
    "COMPONENTS" r"\.md",
)))
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def source_files(root: Path = ROOT) -> list[Path]:
    """Every file the checks read: our packages, configs, benchmarks, tests and docs, and the README."""
    found = [root / name for name in TOP_LEVEL_FILES if (root / name).is_file()]
    for top in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel = Path(dirpath).relative_to(root).as_posix()
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__"))
                                 and f"{rel}/{d}" not in SKIPPED_DIRS)
            found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(SOURCE_SUFFIXES)]
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text (link targets and markup gone) lower-cased,
    every character other than letters, digits, '_', '-' and spaces dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Anchors of every heading outside fenced code blocks; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_fence = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match is None:
            continue
        base = github_anchor(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def _where(path: Path, root: Path, line: int) -> str:
    return f"{path.relative_to(root).as_posix()}:{line}"


def _check_target(page: Path, anchor: str | None, cache: dict[Path, set[str]]) -> str | None:
    """Why `page#anchor` does not resolve, or None when it does."""
    if not page.is_file():
        return "no such page"
    if anchor is None:
        return None
    if page not in cache:
        cache[page] = anchors(page.read_text(encoding="utf-8"))
    return None if anchor in cache[page] else f"no heading with anchor #{anchor} in it"


def bad_citations(root: Path = ROOT) -> list[str]:
    """'file:line: <citation> (why)' for every citation of docs/ in the sources that does not resolve."""
    cache: dict[Path, set[str]] = {}
    bad = []
    for path in source_files(root):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for match in CITATION.finditer(line):
                why = _check_target(root / "docs" / match.group(1), match.group(2), cache)
                if why:
                    bad.append(f"{_where(path, root, number)}: {match.group(0)} ({why})")
    return bad


def bad_docs_links(root: Path = ROOT) -> list[str]:
    """'file:line: (target) (why)' for every relative markdown link between docs pages that does not resolve."""
    cache: dict[Path, set[str]] = {}
    bad = []
    for page in sorted((root / "docs").glob("*.md")):
        in_fence = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if FENCE.match(line):
                in_fence = not in_fence
            if in_fence:
                continue
            for match in DOCS_LINK.finditer(line):
                target = page.parent / match.group(1) if match.group(1) else page
                why = _check_target(target, match.group(2), cache)
                if why:
                    bad.append(f"{_where(page, root, number)}: ({match.group(1) or ''}"
                               f"{'#' + match.group(2) if match.group(2) else ''}) ({why})")
    return bad


def outside_references(root: Path = ROOT) -> list[str]:
    """'file:line: text' for every mention of a spec document that is not in the repository."""
    bad = []
    for path in source_files(root):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            match = OUTSIDE_REFERENCE.search(line)
            if match:
                bad.append(f"{_where(path, root, number)}: '{match.group(0)}' in: {line.strip()[:120]}")
    return bad


# ------------------------------------------------------------------------------------------------ checks


def test_every_docs_citation_names_an_existing_page_and_heading():
    bad = bad_citations()
    assert not bad, "citations of docs/ that do not resolve:\n" + "\n".join(bad)


def test_links_between_docs_pages_resolve():
    bad = bad_docs_links()
    assert not bad, "links in docs/ that do not resolve:\n" + "\n".join(bad)


def test_no_source_refers_to_documents_outside_the_repository():
    bad = outside_references()
    assert not bad, ("references to spec documents outside the repository (cite the docs/ section that "
                     "replaces them):\n" + "\n".join(bad))


def test_the_pages_the_code_relies_on_exist():
    for name in ("architecture", "model", "data_formats", "pipeline", "training_state"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


# ------------------------------------------------------------------------------------------------ the checker


def test_github_anchor_rules():
    assert github_anchor("Plan and force") == "plan-and-force"
    assert github_anchor("Swin-L") == "swin-l"
    assert github_anchor("`MSDeformAttn` kernels (C++, CUDA)") == "msdeformattn-kernels-c-cuda"
    assert github_anchor("What's in a shard?") == "whats-in-a-shard"
    assert github_anchor("loader_state and RNG") == "loader_state-and-rng"
    assert github_anchor("See [the matcher](model.md#matcher)") == "see-the-matcher"


def test_repeated_headings_and_code_blocks():
    text = "# Title\n## Notes\n```\n## Not a heading\n```\n## Notes\n### Notes ###\n"
    assert anchors(text) == {"title", "notes", "notes-1", "notes-2"}


def test_the_checks_report_file_line_and_citation(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n## Good section\nsee [x](#gone) and [y](page.md#page)\n")
    (tmp_path / "model").mkdir()
    page = "docs" + "/page.md"  # split so that this file's own text cites nothing
    (tmp_path / "model" / "a.py").write_text(
        f'"""Cites {page}#good-section and {page}."""\n'
        f"# {page}#bad-section, docs/{'missing'}.md\n"
        f"# see {'MODEL'}_SPEC 4.6 and {'DESIGN'}.md section 6 and {'DESIGN'} 5\n")
    assert bad_citations(tmp_path) == [
        f"model/a.py:2: {page}#bad-section (no heading with anchor #bad-section in it)",
        f"model/a.py:2: {page.replace('page', 'missing')} (no such page)",
    ]
    assert bad_docs_links(tmp_path) == [f"{page}:3: (#gone) (no heading with anchor #gone in it)"]
    found = outside_references(tmp_path)
    assert [f.split(": ")[0] for f in found] == ["model/a.py:3"]
    assert "MODEL" "_SPEC" in found[0]


ARCHITECTURE_PACKAGES = ("core", "data_prep", "model", "pipeline", "orchestration", "cli", "csrc")
CODE_SUFFIXES = (".py", ".cpp", ".cu", ".h")


def test_architecture_lists_every_source_file_once_and_nothing_else():
    """docs/architecture.md has one line per source file: a new file is described, a removed one is gone."""
    text = (DOCS / "architecture.md").read_text()
    listed = re.findall(r"^- `([^`]+)`:", text, flags=re.M)
    files = sorted(p.relative_to(ROOT).as_posix() for pkg in ARCHITECTURE_PACKAGES
                   for p in (ROOT / pkg).rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts)
    assert sorted(set(files) - set(listed)) == [], "source files without a line in docs/architecture.md"
    assert sorted(set(listed) - set(files)) == [], "lines in docs/architecture.md for files that do not exist"
    assert len(listed) == len(set(listed)), "a file listed twice"
