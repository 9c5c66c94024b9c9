"""mkdocs hook: every code block included from the source names its file and links to it.

A fenced block whose body is one `--8<-- "path:section"` line (pymdownx.snippets) gets a title,
`path, lines a-b`, the lines the named section spans in the file (without its two marker
lines). The title links to a copy of the whole file in the built site, `source/<path>.html`, with
the section's first line as the anchor (`#L-<a>`): the file highlighted by Pygments (already
installed with the theme), one anchor per line, no script, no request to any other host.

Why a copy in the site and not a link to the repository: the site makes no request to another
host and works offline (tests/test_docs_browser.py holds it to that); mkdocs.yml has no repo_url
(the theme would fetch the repository's stars), and a copy is the file the page was built from,
at the same commit. Only the files some page includes are copied.
"""

import html
import re
from pathlib import Path

from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r'^(?P<indent>[ \t]*)(?P<open>```+)(?P<info>[^\n]*)\n'
                   r'(?P=indent)--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"[ \t]*\n'
                   r'(?P=indent)(?P=open)[ \t]*$', re.M)
TITLE = re.compile(r'<span class="filename">source: ([^,<]+), lines (\d+)-(\d+)</span>')

_included: set[str] = set()


def section_lines(path: str, section: str | None) -> tuple[int, int]:
    """The first and last line (1-based) of a named section of a file, or of the whole file."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    if section is None:
        return 1, len(lines)
    start = next(i for i, s in enumerate(lines) if s.strip() == f"# --8<-- [start:{section}]")
    end = next(i for i, s in enumerate(lines) if s.strip() == f"# --8<-- [end:{section}]")
    return start + 2, end  # the lines between the two markers


def on_page_markdown(markdown, page, **kwargs):
    def title(m):
        if "title=" in m.group("info"):
            return m.group(0)
        path, section = m.group("path"), m.group("section")
        if not (ROOT / path).is_file():
            return m.group(0)  # pymdownx.snippets fails the build on it, with a better message
        a, b = section_lines(path, section)
        _included.add(path)
        return m.group(0).replace(m.group("open") + m.group("info"),
                                  f'{m.group("open")}{m.group("info")} title="source: {path}, lines {a}-{b}"', 1)

    return FENCE.sub(title, markdown)


def on_page_content(content, page, **kwargs):
    def link(m):
        path, a, b = m.group(1), m.group(2), m.group(3)
        href = get_relative_url(f"source/{path}.html", page.url or ".")
        return (f'<span class="filename">source: <a class="snippet-source" href="{html.escape(href)}#L-{a}">'
                f'{html.escape(path)}</a>, lines {a}-{b}</span>')

    return TITLE.sub(link, content)


def on_post_build(config, **kwargs):
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_for_filename

    site = Path(config["site_dir"])
    formatter = HtmlFormatter(linenos="inline", lineanchors="L", anchorlinenos=True, wrapcode=True)
    style = formatter.get_style_defs(".highlight")
    for path in sorted(_included):
        out = site / "source" / f"{path}.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        code = highlight((ROOT / path).read_text(encoding="utf-8"), get_lexer_for_filename(path), formatter)
        css = "body { font-family: sans-serif; margin: 1em 2em; } pre { font-size: 13px; } a { text-decoration: none; }"
        css += " .linenos { color: #888; margin-right: 1em; } .back { font-size: 14px; }"
        out.write_text(
            f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(path)}</title>\n'
            f"<style>{css}\n{style}</style></head>\n"
            f'<body><p><a class="back" href="{get_relative_url("index.html", f"source/{path}.html")}">minimamba-moe'
            f"</a> / <code>{html.escape(path)}</code>, as the site was built from it</p>\n{code}</body></html>\n",
            encoding="utf-8")
    _included.clear()
