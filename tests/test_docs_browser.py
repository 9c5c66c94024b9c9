"""The built docs site, opened page by page in headless Chromium, with a log of every request.

For every HTML page of `mkdocs build --strict` (served from 127.0.0.1 by a thread of this test):
- the page loads (HTTP 200) and every request it makes succeeds (status < 400);
- no request goes to any other host (no web fonts, no CDN, no analytics);
- no console error and no uncaught script error;
- every formula is rendered: no `arithmatex` placeholder is left, no raw TeX delimiter or TeX
  command shows in the page's visible text, every `<math>` element has a non-empty box and no
  `<merror>`;
- every image loads (complete, natural width > 0);
- no `--8<--` is shown (a code include pymdownx.snippets did not expand, e.g. mis-indented).

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
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    assert len(pages) >= 10, f"only {len(pages)} pages built: {pages}"
    problems, counts = [], {"pages": 0, "requests": 0, "formulas": 0, "images": 0}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
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
                };
            }""")
            if check["snippetMarks"]:
                here.append(f"{check['snippetMarks']} '--8<--' lines shown: a code include that did not happen")
            if check["placeholders"]:
                here.append(f"{check['placeholders']} math placeholders not converted to MathML")
            if check["emptyMath"] or check["merror"]:
                here.append(f"{check['emptyMath']} formulas with an empty box, {check['merror']} <merror>")
            tex = sorted({m.group(0) for m in RAW_TEX.finditer(_outside_code(page))})
            if tex:
                here.append(f"raw TeX visible in the text: {tex}")
            here += [f"image did not load: {src}" for src, ok in check["images"] if not ok]
            problems += [f"{rel}: {p}" for p in here]
            counts["pages"] += 1
            counts["requests"] += len(log["requests"])
            counts["formulas"] += check["maths"]
            counts["images"] += len(check["images"])
        browser.close()
    print(f"browser test: {counts}")
    assert not problems, f"{len(problems)} problems in the built site:\n  " + "\n  ".join(problems)
    assert counts["formulas"] > 0 and counts["images"] > 0, f"no formula or no figure on any page: {counts}"


def _outside_code(page) -> str:
    """The visible text of the page's article without code blocks (code may show a backslash)."""
    return page.evaluate("""() => {
        const a = (document.querySelector('article') || document.body).cloneNode(true);
        a.querySelectorAll('pre, code, .doc-signature').forEach(e => e.remove());
        return a.innerText;
    }""")
