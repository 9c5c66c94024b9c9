"""The docs site (docs/*.md) cannot silently rot: everything it names in backticks must exist.

Checked, for every inline code span (`...`) outside fenced code blocks:

- a repository path (first component one of REPO_DIRS, or a top-level ``*.py`` / ``*.md`` /
  ``*.toml`` / ``*.yml`` file) exists; ``*`` in a path must match at least one file;
- a dotted name ``minimamba_moe.x.y`` resolves: the module part to a file or package folder
  (``minimamba_moe.reference`` is ``reference/``, ``minimamba_moe.fast`` is ``fast/``), and a
  trailing attribute, if any, appears in that module's source;
- a test name ``test_xxx`` is defined in some ``tests/test_*.py``.

Also: mkdocs.yml's nav lists exactly the pages in docs/. Paths a run creates (``out/...``,
``data_cache/...``, ``model.safetensors``) are not repository paths and are not checked.
No imports of the package, no mkdocs: plain file reads, well under a second.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REPO_DIRS = ("minimamba_moe", "reference", "fast", "tests", "benchmarks", "docs")
PACKAGE_DIRS = {"minimamba_moe.reference": "reference", "minimamba_moe.fast": "fast", "minimamba_moe": "minimamba_moe"}

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w.*-]+(/[\w.*-]*)*$")
DOTTED = re.compile(r"^minimamba_moe(\.\w+)+$")
TEST_NAME = re.compile(r"^test_\w+$")

PAGES = sorted(DOCS.rglob("*.md"))


def spans(page: Path) -> list[str]:
    """The inline code spans of a page, fenced code blocks left out."""
    return SPAN.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def is_repo_path(s: str) -> bool:
    if not PATH.match(s) or s.startswith("."):
        return False
    if "/" in s:
        return s.split("/")[0] in REPO_DIRS
    return s.endswith((".py", ".md", ".toml", ".yml"))  # a top-level file: train.py, mkdocs.yml, ...


def path_problem(s: str) -> str | None:
    if "*" in s:
        return None if list(ROOT.glob(s)) else f"no file matches {s}"
    if "/" not in s and s.endswith(".md") and (DOCS / s).exists():
        return None  # another page of the site
    return None if (ROOT / s).exists() else f"{s} does not exist"


def dotted_problem(s: str) -> str | None:
    parts = s.split(".")
    for n in range(len(parts), 0, -1):  # the longest prefix that is a package in PACKAGE_DIRS
        if ".".join(parts[:n]) in PACKAGE_DIRS:
            here, rest = ROOT / PACKAGE_DIRS[".".join(parts[:n])], parts[n:]
            break
    while rest and (here / rest[0]).is_dir():
        here, rest = here / rest[0], rest[1:]
    if rest and (here / f"{rest[0]}.py").is_file():
        module, rest = here / f"{rest[0]}.py", rest[1:]
    else:
        module = here / "__init__.py"
    if not module.is_file():
        return f"{s}: no module file {module.relative_to(ROOT)}"
    if len(rest) > 1:
        return f"{s}: {'.'.join(rest)} is not a module or one attribute of {module.relative_to(ROOT)}"
    if rest and not re.search(rf"\b{re.escape(rest[0])}\b", module.read_text(encoding="utf-8")):
        return f"{s}: {rest[0]} does not appear in {module.relative_to(ROOT)}"
    return None


def defined_tests() -> set[str]:
    names = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        names.update(re.findall(r"^def (test_\w+)", f.read_text(encoding="utf-8"), re.M))
    return names


def test_there_are_pages():
    assert (DOCS / "index.md").is_file(), "docs/index.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_every_name_in_backticks_exists(page):
    tests = defined_tests()
    problems = []
    for s in spans(page):
        s = s.strip()
        if DOTTED.match(s):
            problems.append(dotted_problem(s))
        elif TEST_NAME.match(s):
            problems.append(None if s in tests else f"{s} is not a test in tests/")
        elif is_repo_path(s):
            problems.append(path_problem(s))
    problems = [p for p in problems if p]
    assert not problems, f"docs/{page.relative_to(DOCS).as_posix()} names things that do not exist:\n  " + "\n  ".join(problems)


def test_nav_lists_every_page():
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert nav == pages, f"in mkdocs.yml nav but not in docs/: {sorted(nav - pages)}; " \
                         f"in docs/ but not in nav: {sorted(pages - nav)}"
