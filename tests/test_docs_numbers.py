"""The numbers the pages quote from a benchmark equal the committed JSON the benchmark wrote.

Three conventions in the Markdown of docs/ (HTML comments: the reader never sees them), each
resolved here against a file of `benchmarks/results/`:

- A number quoted in the text or a table is followed by
  `<!-- json: benchmarks/results/NAME.json EXPRESSION -->`: EXPRESSION is Python over the JSON,
  bound to `j` (`j["rows"][0]["ratio"]`, `max(r["passes"] for r in j["balance"])`; only plain
  builtins). The number right before the comment must be the value printed with as many decimals
  as the page shows (`f"{value:.2f}"` for `1.23`; thousands separators are ignored).
- A verbatim output block is preceded by `<!-- output: benchmarks/results/NAME.json -->`: the
  ```text block after it must be the JSON's `output` (what the script printed, kept by `--out`).
- A command on a page that writes `--out benchmarks/results/NAME.json` must be the command that
  wrote it: its JSON's `command` when it records one, and otherwise every setting the command
  parses to (with the script's own argument parser) must equal the JSON's `args`, so a flag the
  run used cannot be missing from the page.

A JSON named by a marker must exist, and every marker must resolve; a page may quote a number
without a marker (measured elsewhere, or a constant), but not a wrong one with it.
"""

import argparse
import builtins
import importlib.util
import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

NUMBER_MARK = re.compile(r"(?P<num>(?:(?<=[\s(|])-)?(?<![\d.])\d[\d,]*(?:\.\d+)?)(?P<unit>[^\d<\n]{0,3}?)\s*<!--\s*json:\s*(?P<file>\S+\.json)\s+"
                         r"(?P<expr>.*?)\s*-->", re.S)
MARK = re.compile(r"<!--\s*json:\s*(?P<file>\S+\.json)\s+(?P<expr>.*?)\s*-->", re.S)
OUTPUT_MARK = re.compile(r"^<!--\s*output:\s*(?P<file>\S+\.json)\s*-->[ \t]*\n+(?P<indent>[ \t]*)```text[^\n]*\n"
                         r"(?P<body>.*?)^(?P=indent)```", re.S | re.M)
SAFE = {name: getattr(builtins, name) for name in ("min", "max", "sum", "len", "abs", "round", "zip", "sorted", "any",
                                                   "all", "range", "list", "float", "int")}


def _text(page: Path) -> str:
    """The page's Markdown without its inline code spans (a page may name a marker in backticks)."""
    return re.sub(r"`[^`\n]+`", "", page.read_text(encoding="utf-8"))


def _load(file: str) -> dict:
    path = ROOT / file
    assert path.is_file(), f"{file} does not exist"
    return json.loads(path.read_text(encoding="utf-8"))


def _value(file: str, expr: str):
    return eval(expr, {"__builtins__": SAFE, "math": math}, {"j": _load(file)})  # noqa: S307 (the repo's own pages)


def quoted_numbers():
    found = []
    for page in PAGES:
        text = _text(page)
        marks = {m.start() for m in MARK.finditer(text)}
        numbered = set()
        for m in NUMBER_MARK.finditer(text):
            numbered.add(m.start() + m.group(0).index("<!--"))
            found.append((page, m.group("num"), m.group("file"), m.group("expr")))
        for start in sorted(marks - numbered):
            found.append((page, None, MARK.match(text, start).group("file"), MARK.match(text, start).group("expr")))
    return found


QUOTED = quoted_numbers()


def test_the_pages_quote_numbers_from_json():
    assert len(QUOTED) >= 10, f"only {len(QUOTED)} numbers marked with <!-- json: ... --> on the pages"


@pytest.mark.parametrize("page,shown,file,expr", QUOTED,
                         ids=[f"{p.relative_to(DOCS).as_posix()}:{n}:{e[:40]}" for p, n, _, e in QUOTED])
def test_a_quoted_number_equals_its_json(page, shown, file, expr):
    where = f"docs/{page.relative_to(DOCS).as_posix()}"
    assert shown is not None, f"{where}: <!-- json: {file} {expr} --> follows no number"
    value = _value(file, expr)
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    printed = f"{float(value):.{decimals}f}"
    assert printed == shown.replace(",", ""), \
        f"{where} says {shown} but {file} gives {value!r} ({printed}) for {expr}"


OUTPUTS = [(page, m.group("file"), m.group("body"), m.group("indent")) for page in PAGES
           for m in OUTPUT_MARK.finditer(_text(page))]


def test_every_output_marker_is_followed_by_a_text_block():
    for page in PAGES:
        text = _text(page)
        n_marks = len(re.findall(r"<!--\s*output:", text))
        n_blocks = len(OUTPUT_MARK.findall(text))
        assert n_marks == n_blocks, f"docs/{page.relative_to(DOCS)}: an <!-- output: ... --> not right before a ```text block"


@pytest.mark.parametrize("page,file,body,indent", OUTPUTS, ids=[f"{p.relative_to(DOCS).as_posix()}:{f}" for p, f, _, _ in OUTPUTS])
def test_a_verbatim_output_equals_its_json(page, file, body, indent):
    shown = "\n".join(line[len(indent):] for line in body.rstrip("\n").split("\n"))
    want = _load(file)["output"]
    assert shown.strip() == want.strip(), (f"docs/{page.relative_to(DOCS).as_posix()} shows an output that is not "
                                           f"{file}'s; paste the JSON's output:\n{want}")


# --- the commands that wrote the JSON ------------------------------------------------------------

COMMAND = re.compile(r"^(python [^\n]*--out (benchmarks/results/[\w.-]+\.json)[^\n]*)$", re.M)
COMMANDS = sorted({(page, m.group(1).split("  #")[0].strip(), m.group(2)) for page in [ROOT / "README.md", *PAGES]
                   for m in COMMAND.finditer(re.sub(r"[ \t]*\\\n[ \t]*", " ", page.read_text(encoding="utf-8")))},
                  key=str)  # a command continued over lines with a backslash is one line here


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _script_parser(script: Path) -> argparse.ArgumentParser:
    """The script's own argument parser: run its main() until it parses its arguments."""
    spec = importlib.util.spec_from_file_location(f"_page_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    original = argparse.ArgumentParser.parse_args
    try:
        spec.loader.exec_module(module)

        def capture(self, *args, **kwargs):
            raise _Parsed(self)

        argparse.ArgumentParser.parse_args = capture
        try:
            module.main()
        except _Parsed as p:
            return p.parser
        raise AssertionError(f"{script}: main() did not parse any arguments")
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path.remove(str(script.parent))


@pytest.mark.parametrize("page,command,file", COMMANDS, ids=[c for _, c, _ in COMMANDS])
def test_the_command_on_the_page_wrote_its_json(page, command, file):
    where = page.relative_to(ROOT).as_posix()
    data = _load(file)
    if "command" in data:
        assert command == data["command"], f"{where} shows {command!r}; {file} was written by {data['command']!r}"
        return
    assert "args" in data, f"{file} records neither the command nor the arguments that wrote it"
    words = shlex.split(command)
    script = ROOT / next(w for w in words if w.endswith(".py"))
    parsed = vars(_script_parser(script).parse_args(words[words.index(script.relative_to(ROOT).as_posix()) + 1:]))
    # "auto" is a default the script resolves when it runs (--clock auto: cpu on a CPU) and records resolved;
    # so are the settings --scale long derives (benchmarks/common.py settle_scale and the scripts' main).
    # --jobs, --cache, --report_only and --plan say how runs are executed and kept, not what they compute.
    # --png is an output, not a setting; --ema_alpha's None means "scaled to the run's length", --budget_from's
    # "the scale's rule" (max when long). --out is the file under test (a committed result may have been renamed).
    resolved = {"jobs", "cache", "report_only", "plan", "png", "out"} | \
        {k for k in ("ema_alpha", "budget_from") if parsed.get(k) is None}
    if parsed.get("scale") == "long":
        resolved |= {"d_model", "batch_size", "seq_len", "steps", "eval_batches", "seeds"}
    differ = {k: (parsed[k], v) for k, v in data["args"].items()
              if k in parsed and k not in resolved and parsed[k] != v and parsed[k] != "auto"}
    assert not differ, (f"{where}: {command!r} does not run what wrote {file}; "
                        f"setting: (the page's command, the JSON's) = {differ}")
