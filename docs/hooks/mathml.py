"""mkdocs hook: the LaTeX on the pages becomes MathML at build time, so no page loads a math library.

`pymdownx.arithmatex` (generic mode) finds the math in the Markdown and protects it from the
Markdown parser: `$...$` or `\\(...\\)` inline, `$$...$$` or `\\[...\\]` as a block. It leaves
`<span class="arithmatex">\\(TeX\\)</span>` and `<div class="arithmatex">\\[TeX\\]</div>` in the
HTML. This hook replaces each of them by the `<math>` element `latex2mathml` writes for the TeX.
Browsers render MathML themselves (Chromium from version 109, Firefox, Safari): no script, no web
font, no request to any host. TeX that latex2mathml cannot read fails the build, naming the page.
"""

import html
import re

from latex2mathml.converter import convert

INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def to_mathml(tex: str, display: str, where: str) -> str:
    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as e:  # latex2mathml raises several types; all mean the TeX is wrong
        raise ValueError(f"{where}: cannot convert the TeX {tex!r} to MathML ({e}); fix the formula") from e


def on_page_content(content, page, **kwargs):
    where = page.file.src_uri
    content = BLOCK.sub(lambda m: f'<div class="math-block">{to_mathml(m.group(1), "block", where)}</div>', content)
    return INLINE.sub(lambda m: to_mathml(m.group(1), "inline", where), content)
