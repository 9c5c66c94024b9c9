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

Commands: every command in a ```bash block of a page is either
- run by this file (``RUN_HERE``): in subprocesses, three at a time, and where the page shows
  its output in the ```text block right after it, the output must be the page's (errors printed as
  ``1e-06`` only need to be as small or smaller: the last bits differ between machines);
- run by another test or by .ci/run (``RUN_ELSEWHERE``: the command, and the file and test that run
  it, which must exist and name the command's script);
- or marked on its line as not run here: ``# needs a GPU`` or ``# needs the network``, or, for the
  kernel benchmarks whose measured output the pages quote, ``# a benchmark (minutes on a CPU): not
  run by the tests`` (performance is never asserted by a test; benchmarks/ prints ratios).
A ```python block is run as written, unless its first line is such a mark.
A listed command that no page shows any more is an error too, so the lists cannot go stale.
The snippet sections the pages include are checked by the strict build (tests/test_docs_browser.py
and .ci/run); this file checks plain file reads and the commands.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import missing_from_extra

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


def test_the_testing_page_describes_every_test_file():
    table = (DOCS / "testing.md").read_text(encoding="utf-8")
    missing = [f.relative_to(ROOT).as_posix() for f in sorted((ROOT / "tests").glob("test_*.py"))
               if f"| `{f.relative_to(ROOT).as_posix()}` |" not in table]
    assert not missing, f"docs/testing.md's table of what each file asserts has no row for {missing}"


def test_nav_lists_every_page():
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert nav == pages, f"in mkdocs.yml nav but not in docs/: {sorted(nav - pages)}; " \
                         f"in docs/ but not in nav: {sorted(pages - nav)}"


# --- commands on the pages ----------------------------------------------------------------------

BLOCK = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console")
# An unlabelled fence whose lines all start like a command is a shell block too.
COMMAND_START = re.compile(r"^\s*(#|$|python3? |torchrun |pip |echo |cd |[A-Z_]+=\S* )")
MARKED = re.compile(r"#\s*(needs (a GPU|the network)\b|a benchmark \(minutes on a CPU\): not run by the tests)")

# Commands this file runs (from the repository root), the page's output compared where it shows one.
RUN_HERE = {
    "TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py cumsum",
    "TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py recurrence",
    "TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py combine",
    "TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py tiled",
    "TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py chunked",
    "TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py backward",
    "python docs/tutorial/moe_steps.py switch",
    "python docs/tutorial/moe_steps.py sinkhorn",
    "python docs/tutorial/moe_steps.py grouping",
    "python docs/tutorial/moe_steps.py cpu",
    "TRITON_INTERPRET=1 python docs/tutorial/moe_steps.py triton",
    "python docs/tutorial/mamba_steps.py shapes",
    "python docs/tutorial/mamba_steps.py decode",
    "python docs/tutorial/mamba_steps.py conv",
    "python docs/tutorial/moe_steps.py passes",
    "python docs/tutorial/train_steps.py memory",
    "python docs/tutorial/sample_steps.py rules",
    "python docs/tutorial/verify_steps.py shrink",
}
# Commands that write into the repository: run with --out into a temporary folder instead.
WRITES = {"python docs/figures/make_figures.py": "--out {tmp}",
          "python benchmarks/sinkhorn_passes.py --out benchmarks/results/sinkhorn_passes.json":
              "--out {tmp}/sinkhorn_passes.json"}
# Commands that would train for many minutes: run with --plan, which checks every setting and exits.
PLANNED = {"python train.py --max_steps=1000 --d_model=256 --lr=1e-3": "--plan"}
RUN_HERE |= set(WRITES) | set(PLANNED) | {"python train.py --preset=blackmamba-2.8b --plan --nproc=8"}
# Commands that need an optional extra: their test is marked needs_extra (skipped, naming it, without).
NEEDS_EXTRA = {"python docs/figures/make_figures.py": ("plots",)}

# Commands run elsewhere: command -> (file that runs it, test function in it or None for a script).
RUN_ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate": (".ci/run", None),  # .ci/run runs the README's set-up block
    "python -m pytest -q": (".ci/run", None),
    "python train.py": ("tests/test_train.py", "test_quick_start_writes_a_loadable_checkpoint"),
    "python train.py --resume": ("tests/test_train.py", "test_resume_continues_bitwise"),
    "python train.py --help": ("tests/test_train.py", "test_help_lists_every_setting"),
    "python -m minimamba_moe.run.plot out/": ("tests/test_plot.py", "test_the_page_command_draws_the_run"),
    "python benchmarks/gpu_check.py --out /tmp/gc --device cpu --quick":
        ("tests/test_gpu_check.py", "test_cpu_dry_run_end_to_end"),
    "python sample.py": ("tests/test_sample.py", "test_sample_py_default_checkpoint_stdin_and_prompt_file"),
    'python sample.py out --prompt "def " --max_new_tokens 500 --temperature 0.8 --top_k 200 --top_p 0.95':
        ("tests/test_sample.py", "test_sample_py_streams_the_greedy_continuation_and_reports_speed"),
    'echo "def " | python sample.py --temperature 0.7 --top_k 50':
        ("tests/test_sample.py", "test_sample_py_default_checkpoint_stdin_and_prompt_file"),
    "python -m minimamba_moe.interop.harness --model minimamba --model_args pretrained=out --tasks my_task "
    "--include_path my_tasks/ --device cpu --limit 100 --output_path results/ --log_samples":
        ("tests/test_harness.py", "test_the_wrapper_runs_local_tasks_through_the_harness_cli"),
    "python -m minimamba_moe.interop.perplexity out --data notes.txt":
        ("tests/test_perplexity.py", "test_perplexity_equals_a_direct_computation"),
    # The benchmarks page: each script's full run takes minutes to hours; its test runs it small.
    "python benchmarks/bench_generate.py --out benchmarks/results/bench_generate.json --png docs/figures/bench_generate.png":
        ("tests/test_benchmarks.py", "test_bench_generate"),
    "python benchmarks/reproduce_moe_mamba.py --lr 2e-3 --no_ablations --out benchmarks/results/reproduce_moe_mamba.json --png docs/figures/reproduce_moe_mamba.png":
        ("tests/test_benchmarks.py", "test_reproduce_moe_mamba"),
    "python benchmarks/reproduce_moe_mamba.py --steps 1000 --seeds 0,1 --lr 2e-3 --no_ablations --out benchmarks/results/reproduce_moe_mamba_1000.json --png docs/figures/reproduce_moe_mamba_1000.png":
        ("tests/test_benchmarks.py", "test_reproduce_moe_mamba"),
    "python benchmarks/reproduce_blackmamba.py --lr 2e-3 --out benchmarks/results/reproduce_blackmamba.json --png docs/figures/reproduce_blackmamba.png":
        ("tests/test_benchmarks.py", "test_reproduce_blackmamba"),
    "python benchmarks/ablate_routers.py --lr 2e-3 --out benchmarks/results/ablate_routers.json --png docs/figures/ablate_routers.png":
        ("tests/test_benchmarks.py", "test_ablate_routers"),
    "python benchmarks/bench_train.py --out benchmarks/results/bench_train.json --png docs/figures/bench_train.png":
        ("tests/test_benchmarks.py", "test_bench_train"),
    # The default scale's time (benchmarks.md, "Rerunning"): a quarter of an hour; its tests run it with --quick.
    "/usr/bin/time -v nice -n 19 python benchmarks/reproduce_moe_mamba.py --out out/default_reproduce_moe_mamba.json --png out/default_reproduce_moe_mamba.png":
        ("tests/test_benchmarks.py", "test_reproduce_moe_mamba"),
    "/usr/bin/time -v nice -n 19 python benchmarks/reproduce_blackmamba.py --out out/default_reproduce_blackmamba.json --png out/default_reproduce_blackmamba.png":
        ("tests/test_benchmarks.py", "test_reproduce_blackmamba"),
    # The long setting: hours; its tests run it with --quick sizes, and its --plan (slow).
    "python benchmarks/reproduce_blackmamba.py --scale long --plan --out benchmarks/results/reproduce_blackmamba_long_plan.json":
        ("tests/test_benchmarks.py", "test_long_plan"),
    "python benchmarks/reproduce_moe_mamba.py --scale long --plan --out benchmarks/results/reproduce_moe_mamba_long_plan.json":
        ("tests/test_benchmarks.py", "test_long_plan"),
    "python benchmarks/reproduce_blackmamba.py --scale long --out benchmarks/results/reproduce_blackmamba_long.json --png docs/figures/reproduce_blackmamba_long.png":
        ("tests/test_benchmarks.py", "test_reproduce_blackmamba_long_setting"),
    "python benchmarks/reproduce_moe_mamba.py --scale long --out benchmarks/results/reproduce_moe_mamba_long.json --png docs/figures/reproduce_moe_mamba_long.png":
        ("tests/test_benchmarks.py", "test_reproduce_moe_mamba_long_setting_resumes_from_its_cache"),
    "python benchmarks/reproduce_moe_mamba.py --scale long --report_only --out benchmarks/results/reproduce_moe_mamba_long.json --png docs/figures/reproduce_moe_mamba_long.png":
        ("tests/test_benchmarks.py", "test_reproduce_moe_mamba_long_setting_resumes_from_its_cache"),
    "python benchmarks/reproduce_blackmamba.py --scale long --budget_from mamba_moe --out benchmarks/results/reproduce_blackmamba_long_budget_mamba_moe.json --png docs/figures/reproduce_blackmamba_long_budget_mamba_moe.png":
        ("tests/test_benchmarks.py", "test_reproduce_blackmamba_long_setting"),
    "python benchmarks/reproduce_moe_mamba.py --scale long --lr 0.032 --lr_moe 0.016 --ablation_seeds 0,1 --out benchmarks/results/reproduce_moe_mamba_long_fixed_lr.json --png docs/figures/reproduce_moe_mamba_long_fixed_lr.png":
        ("tests/test_benchmarks.py", "test_reproduce_moe_mamba_long_setting_resumes_from_its_cache"),
}


def shell_commands(page: Path) -> list[tuple[str, str | None]]:
    """(command, the text of the ```text block right after its block or None) for every shell line."""
    text = page.read_text(encoding="utf-8")
    blocks = list(BLOCK.finditer(text))
    found = []
    for i, m in enumerate(blocks):
        body = dedent_block(m.group("body"), m.group("indent"))
        if m.group("lang") not in SHELL and not (
                m.group("lang") == "" and body.strip() and all(COMMAND_START.match(x) for x in body.splitlines())):
            continue
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        output = None
        if nxt is not None and nxt.group("lang") == "text" and not text[m.end():nxt.start()].strip():
            output = dedent_block(nxt.group("body"), nxt.group("indent"))
        lines, joined = body.splitlines(), ""
        for line in lines:
            joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                if joined.strip() and not joined.strip().startswith("#"):
                    found.append((joined.strip(), output))
                joined = ""
    return found


def dedent_block(body: str, indent: str) -> str:
    return "\n".join(line[len(indent):] if line.startswith(indent) else line for line in body.splitlines())


def strip_comment(cmd: str) -> str:
    """The command without a trailing `# comment` (outside quotes)."""
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=False)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    try:
        list(lexer)
    except ValueError:
        return cmd
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1].isspace()):
            return cmd[:i].rstrip()
    return cmd


README = ROOT / "README.md"  # the first page a reader follows: its commands are held to the same rule


def where(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


ALL_COMMANDS = [(page, strip_comment(cmd), cmd, out) for page in [README, *PAGES] for cmd, out in shell_commands(page)]


def test_every_command_on_a_page_is_run_by_a_test_or_marked():
    problems = [f"{where(page)}: {raw!r}" for page, cmd, raw, _ in ALL_COMMANDS
                if cmd not in RUN_HERE and cmd not in RUN_ELSEWHERE and not MARKED.search(raw)]
    assert not problems, ("commands on the pages that no test runs: add them to RUN_HERE / RUN_ELSEWHERE in "
                          "tests/test_docs.py, or mark the line `# needs a GPU` / `# needs the network`:\n  "
                          + "\n  ".join(problems))


def test_every_listed_command_is_on_a_page_and_its_runner_exists():
    shown = {cmd for _, cmd, _, _ in ALL_COMMANDS}
    stale = sorted((RUN_HERE | set(RUN_ELSEWHERE) | set(NEEDS_EXTRA)) - shown)
    assert not stale, f"listed in tests/test_docs.py but on no page any more: {stale}"
    for cmd, (where, test) in RUN_ELSEWHERE.items():
        source = (ROOT / where).read_text(encoding="utf-8")
        words = cmd.split()
        modules = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"]  # python -m <module>
        script = next((Path(w).stem for w in words if w.endswith(".py")), None) or (modules[0] if modules else None)
        assert script and script in source, f"{where} does not run {script!r} (listed for {cmd!r})"
        if test:
            assert re.search(rf"^def {test}\(", source, re.M), f"{where} has no test {test} (listed for {cmd!r})"


ERR = re.compile(r"(?<![\w.])(0|\d(?:\.\d+)?e[-+]\d+)(?![\w.])")


def normalise(text: str) -> tuple[str, list[float]]:
    """The text with every printed error replaced by a placeholder, and the errors."""
    return ERR.sub("<err>", text.strip()), [float(m) for m in ERR.findall(text)]


@pytest.fixture(scope="module")
def command_runs(tmp_path_factory, request):
    """Run the RUN_HERE commands whose tests were selected, three at a time (all: about 30 s on 2 cores).

    A command whose extra is not installed is not run: its test is skipped (needs_extra) before it asks."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("commands")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this one

    def run(cmd):
        full = cmd + (" " + WRITES[cmd].format(tmp=tmp) if cmd in WRITES else "") + (" " + PLANNED.get(cmd, "")).rstrip()
        r = subprocess.run(full, shell=True, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
        return r.returncode, r.stdout, r.stderr

    selected = {item.callspec.params["cmd"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_command_runs_and_prints_what_the_page_shows"}
    cmds = sorted(c for c in selected if not any(missing_from_extra(e) for e in NEEDS_EXTRA.get(c, ())))
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(cmds, pool.map(run, cmds)))


RUN_HERE_SHOWN = [pytest.param(page, cmd, out, id=cmd, marks=[pytest.mark.needs_extra(*NEEDS_EXTRA[cmd])]
                               if cmd in NEEDS_EXTRA else [])
                  for page, cmd, _, out in ALL_COMMANDS if cmd in RUN_HERE]


@pytest.mark.parametrize("page,cmd,shown", RUN_HERE_SHOWN)
def test_command_runs_and_prints_what_the_page_shows(command_runs, page, cmd, shown):
    rc, stdout, stderr = command_runs[cmd]
    assert rc == 0, f"{cmd!r} ({where(page)}) exited {rc}:\n{stderr}"
    if shown is None:
        return
    got, got_errs = normalise(stdout)
    want, want_errs = normalise(shown)
    assert got == want, (f"{where(page)} shows an output of {cmd!r} that it no longer "
                         f"prints; paste the new output:\n--- page\n{shown}\n--- now\n{stdout}")
    worse = [(g, w) for g, w in zip(got_errs, want_errs) if g > max(10 * w, 1e-5)]
    assert not worse, f"{cmd!r}: errors grew well past what the page shows (now, page): {worse}"


PYTHON_BLOCKS = [(page, m.group(1)) for page in PAGES
                 for m in re.finditer(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
                 if not m.group(1).lstrip().startswith("--8<--")  # included sections are the source's own
                 and not MARKED.search(m.group(1).lstrip().splitlines()[0])]  # first line: `# needs the network`


@pytest.mark.parametrize("page,code", PYTHON_BLOCKS, ids=[p.relative_to(DOCS).as_posix() for p, _ in PYTHON_BLOCKS])
def test_python_blocks_written_on_a_page_run_as_written(page, code):
    """A reader pastes the block into Python: it must not need names the page never defined."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"docs/{page.relative_to(DOCS).as_posix()}: a python block fails as written:\n{r.stderr}"


def test_api_pages_document_every_op_of_both_backends():
    """Every name in ops.OP_NAMES (read from the source, no import) has an entry on both kernel pages."""
    ops_src = (ROOT / "minimamba_moe" / "ops.py").read_text(encoding="utf-8")
    names = re.findall(r'"(\w+)"', re.search(r"OP_NAMES\s*=\s*\((.*?)\)", ops_src, re.S).group(1))
    assert len(names) >= 6, f"could not read OP_NAMES from minimamba_moe/ops.py: {names}"
    for page, package in (("api/reference.md", "reference"), ("api/fast.md", "fast")):
        text = (DOCS / page).read_text(encoding="utf-8")
        missing = [n for n in names if not re.search(rf"^::: {package}\.\w+\.{n}$", text, re.M)]
        assert not missing, f"docs/{page} has no `::: {package}.<module>.<op>` entry for {missing}"
