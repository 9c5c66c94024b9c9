"""The built docs site, opened page by page in headless Chromium, with a log of every request.

For every HTML page of `mkdocs build --strict` (served from 127.0.0.1 by a thread of this test):
- the page loads (HTTP 200) and every request it makes succeeds (status < 400);
- no request goes to any other host (no web fonts, no CDN, no analytics);
- no console error and no uncaught script error;
- every formula is rendered: no `arithmatex` placeholder is left, no raw TeX delimiter or TeX
  command shows in the page's visible text, every `<math>` element has a non-empty box and no
  `<merror>`;
- every image loads (complete, natural width > 0), and every SVG figure shows at its natural width
  at 1280 px (they are drawn with text of 8.5 pt or larger: a figure scaled down is illegible);
- no `--8<--` is shown (a code include pymdownx.snippets did not expand, e.g. mis-indented);
- the reading surface, at a 1280 x 900 window: at most 5 % of all `pre > code` blocks of the site
  (collapsed `???` blocks opened first) are wider than their box and scroll sideways.
Then, from the built files: no TeX survives inside a rendered formula (`\\arg` that latex2mathml
passed through as an identifier, a stray brace or `^`), and every included code block's title links
to a copy of its file in the site (`source/<path>.html`, docs/hooks/sources.py) at an anchor that
exists. The pages of `source/` are plain highlighted files and are not opened one by one.

Needs the `docs` and `docs-test` extras (mkdocs, playwright: marked `needs_extra`, see conftest.py)
and Debian's `chromium` at /usr/bin/chromium (Playwright's own browser download does not work here).
Without chromium the test is skipped saying so; `.ci/run` installs it and sets
MINIMAMBA_REQUIRE_BROWSER=1, which turns that skip into a failure. One browser, one page object for
all pages: ~20 s.
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MINIMAMBA_CHROMIUM", "/usr/bin/chromium")
MAX_SCROLLING_CODE = 0.05  # the share of code blocks allowed to scroll sideways at 1280 px
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\(frac|sum|prod|odot|exp|log|mathrm|operatorname|text|bar|Delta|sigma)\b")


pytestmark = pytest.mark.needs_extra("docs", "docs-test")


def _missing():
    """Why the test cannot run here, or None (the extras are the marker's)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}: apt-get install -y chromium"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("MINIMAMBA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test must run here (MINIMAMBA_REQUIRE_BROWSER=1) but {why}")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    shutil.rmtree(out, ignore_errors=True)


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # Chromium opens several connections at once; the default backlog of 5
    daemon_threads = True     # refused some of them on a loaded machine (ERR_SOCKET_NOT_CONNECTED)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_every_page_loads_offline_with_math_and_figures(site):
    from playwright.sync_api import sync_playwright

    out, base = site
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html") if not p.relative_to(out).parts[0] == "source")
    assert len(pages) >= 10, f"only {len(pages)} pages built: {pages}"
    problems, counts = [], {"pages": 0, "requests": 0, "formulas": 0, "images": 0, "code": 0, "scrolling": 0}
    scrolling = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        log = {"requests": [], "failed": [], "console": []}
        page.on("request", lambda r: log["requests"].append(r.url))
        page.on("requestfailed", lambda r: log["failed"].append(f"{r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and log["failed"].append(f"{r.url} (HTTP {r.status})"))
        page.on("console", lambda m: m.type == "error" and log["console"].append(m.text))
        page.on("pageerror", lambda e: log["console"].append(f"uncaught: {e}"))
        for rel in pages:
            for v in log.values():
                v.clear()
            url = f"{base}/{rel}"
            response = page.goto(url, wait_until="networkidle")
            here = []
            if response is None or response.status != 200:
                here.append(f"HTTP {response and response.status}")
            here += [f"request to another host: {u}" for u in log["requests"]
                     if urlparse(u).scheme in ("http", "https", "ws", "wss") and not u.startswith(base)]
            here += [f"failed request: {f}" for f in log["failed"]]
            here += [f"console error: {c}" for c in log["console"]]
            check = page.evaluate("""() => {
                const vis = document.querySelector('article') || document.body;
                const maths = [...document.querySelectorAll('article math')];
                return {
                  snippetMarks: (vis.innerText.match(/--8<--/g) || []).length,
                  placeholders: document.querySelectorAll('.arithmatex').length,
                  maths: maths.length,
                  emptyMath: maths.filter(m => { const r = m.getBoundingClientRect(); return r.width <= 0 || r.height <= 0; }).length,
                  merror: document.querySelectorAll('merror').length,
                  images: [...document.images].map(i => [i.currentSrc || i.src, i.complete && i.naturalWidth > 0]),
                  shrunk: [...document.querySelectorAll('article img')].filter(i => i.src.endsWith('.svg')
                          && i.clientWidth < 0.95 * i.naturalWidth).map(i => [i.src, i.naturalWidth, i.clientWidth]),
                };
            }""")
            if check["snippetMarks"]:
                here.append(f"{check['snippetMarks']} '--8<--' lines shown: a code include that did not happen")
            if check["placeholders"]:
                here.append(f"{check['placeholders']} math placeholders not converted to MathML")
            if check["emptyMath"] or check["merror"]:
                here.append(f"{check['emptyMath']} formulas with an empty box, {check['merror']} <merror>")
            code = page.evaluate("""() => {
                document.querySelectorAll('details').forEach(d => { d.open = true; });
                const blocks = [...document.querySelectorAll('pre > code')];
                return {n: blocks.length, wide: blocks.filter(c => c.scrollWidth > c.clientWidth)
                        .map(c => c.innerText.split('\\n').find(l => l.length === Math.max(
                            ...c.innerText.split('\\n').map(x => x.length))).slice(0, 60))};
            }""")
            counts["code"] += code["n"]
            counts["scrolling"] += len(code["wide"])
            scrolling += [f"{rel}: {w!r}" for w in code["wide"]]
            tex = sorted({m.group(0) for m in RAW_TEX.finditer(_outside_code(page))})
            if tex:
                here.append(f"raw TeX visible in the text: {tex}")
            here += [f"image did not load: {src}" for src, ok in check["images"] if not ok]
            # The SVG figures are drawn at the size they are read (docs/figures/make_figures.py: 8.5 pt
            # text or larger); one shown smaller than that at 1280 px has text under ~11 px.
            here += [f"figure {src} is {shown} px wide, scaled down from {natural} px: its text is too small; "
                     f"draw it narrower" for src, natural, shown in check["shrunk"]]
            problems += [f"{rel}: {p}" for p in here]
            counts["pages"] += 1
            counts["requests"] += len(log["requests"])
            counts["formulas"] += check["maths"]
            counts["images"] += len(check["images"])
        browser.close()
    print(f"browser test: {counts}")
    assert not problems, f"{len(problems)} problems in the built site:\n  " + "\n  ".join(problems)
    assert counts["formulas"] > 0 and counts["images"] > 0, f"no formula or no figure on any page: {counts}"
    assert counts["scrolling"] <= MAX_SCROLLING_CODE * counts["code"], (
        f"{counts['scrolling']} of {counts['code']} code blocks scroll sideways at 1280 px (at most "
        f"{MAX_SCROLLING_CODE:.0%}); their longest lines:\n  " + "\n  ".join(scrolling))


TEX_IN_MATH = re.compile(r"\\[A-Za-z]+|\\[{}|,;:! ]|[{}^]")


def test_no_tex_survives_inside_rendered_math(site):
    """latex2mathml passes a command it does not know (`\\arg`) through as text inside the <math>."""
    import html

    out, _ = site
    problems = []
    for f in sorted(out.rglob("*.html")):
        for m in re.finditer(r"<math\b.*?</math>", f.read_text(encoding="utf-8"), re.S):
            text = html.unescape(re.sub(r"<[^>]+>", " ", m.group(0)))
            bad = sorted(set(TEX_IN_MATH.findall(text)))
            if bad:
                problems.append(f"{f.relative_to(out).as_posix()}: {bad} in {' '.join(text.split())[:80]!r}")
    assert not problems, "TeX left inside rendered formulas (write it so latex2mathml knows it):\n  " + "\n  ".join(problems)


def test_every_included_code_block_links_to_its_file(site):
    out, _ = site
    links, problems = 0, []
    for f in sorted(out.rglob("*.html")):
        if f.relative_to(out).parts[0] == "source":
            continue
        text = f.read_text(encoding="utf-8")
        blocks = text.count('<span class="filename">source: ')
        found = re.findall(r'<a class="snippet-source" href="([^"#]+)#(L-\d+)">', text)
        if len(found) != blocks:
            problems.append(f"{f.relative_to(out)}: {blocks} source titles but {len(found)} links")
        for href, anchor in found:
            target = (f.parent / href).resolve()
            links += 1
            if not target.is_file():
                problems.append(f"{f.relative_to(out)}: {href} is not in the site")
            elif f'id="{anchor}"' not in target.read_text(encoding="utf-8"):
                problems.append(f"{f.relative_to(out)}: {href} has no line anchor {anchor}")
    assert links >= 30, f"only {links} included code blocks link to their source"
    assert not problems, "\n  ".join(problems)


def _outside_code(page) -> str:
    """The visible text of the page's article without code blocks (code may show a backslash)."""
    return page.evaluate("""() => {
        const a = (document.querySelector('article') || document.body).cloneNode(true);
        a.querySelectorAll('pre, code, .doc-signature').forEach(e => e.remove());
        return a.innerText;
    }""")
