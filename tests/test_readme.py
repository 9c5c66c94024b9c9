"""The README's Python example runs as written, its set-up and test blocks are the ones .ci/run runs (and
what a fresh machine with only `python3` can run), and (slow) its quoted training curve is what train.py prints."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def use_example() -> str:
    """The first python block of the README's "Use" section."""
    section = README.read_text(encoding="utf-8").split("\n## Use", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert blocks, "the README's Use section has no python block"
    return blocks[0]


def test_readme_use_example_runs_as_written(capsys):
    torch.manual_seed(0)
    scope = {}
    exec(compile(use_example(), "README.md (Use)", "exec"), scope)
    config, model = scope["config"], scope["model"]
    assert scope["out"].logits.shape == (2, 32, config.vocab_size)
    assert scope["logits"].shape == (1, config.vocab_size)
    assert scope["state"].seq_len == 8 + 16
    assert "ParamCount(total=" in capsys.readouterr().out
    assert not model.training and torch.isfinite(scope["logits"]).all()


CURVE = re.compile(r"\(([\d,]+) train tokens\)[^→]*? ([\d.]+) → ([\d.]+) \(step 25\) → ([\d.]+) \(step 50\) → "
                   r"([\d.]+) \(step 300\)")


@pytest.mark.slow
def test_readme_quick_start_curve_is_what_train_py_prints(tmp_path):
    """`python train.py` as the README runs it (1 to 1.5 minutes): its val losses at steps 0, 25, 50 and 300,
    against the curve the README quotes for this Python's standard library (told apart by its token count)."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    quoted = {int(m.group(1).replace(",", "")): list(m.groups()[1:]) for m in CURVE.finditer(text)}
    assert quoted, "the README no longer quotes the quick start's curve in the form this test reads"
    root = README.parent
    p = subprocess.run([sys.executable, str(root / "train.py"), "--progress=false"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr
    tokens = int(re.search(r"([\d,]+) train tokens", p.stdout).group(1).replace(",", ""))
    if tokens not in quoted:
        pytest.skip(f"this Python's standard library is {tokens:,} train tokens; the README quotes a curve for "
                    f"{', '.join(f'{t:,}' for t in quoted)}")
    val = {r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
           if "val_loss" in r}
    got = [f"{val[s]:.2f}" for s in (0, 25, 50, 300)]
    assert got == quoted[tokens], f"README quotes {quoted[tokens]} for {tokens:,} tokens, train.py now prints {got}"


# --- the README's set-up and test blocks, which .ci/run runs as written ------------------------------

ROOT = README.parent
CI_RUN = ROOT / ".ci" / "run"
spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / ".ci" / "readme_blocks.py")
readme_blocks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_blocks)
TORCH_PIN = re.search(r'^TORCH_PIN="([^"]+)"', CI_RUN.read_text(encoding="utf-8"), re.M).group(1)


def test_readme_has_the_set_up_and_test_blocks_that_ci_runs():
    """The blocks exist (CI reads them: there is no copy of them to fall out of step), and they are what a
    newcomer with nothing but `python3` can run: the venv comes first, no `python` or `pip` before it."""
    blocks = readme_blocks.readme_commands(README.read_text(encoding="utf-8"))
    setup, test = blocks["Set up"], blocks["Test"]
    assert re.match(r"python3 -m venv (\S+) && \. \1/bin/activate\b", setup[0]), setup[0]
    assert any(re.match(r'pip install -e "\.\[dev\]"', c) for c in setup), setup
    assert [c for c in test if re.match(r"python -m pytest\b", c)] == ["python -m pytest -q"], test
    script = readme_blocks.script(README.read_text(encoding="utf-8"), TORCH_PIN)
    assert f"{{ {TORCH_PIN}\n}}" in script and "{ pip install torch " not in script  # the one line CI swaps


def test_ci_runs_the_readme_blocks_then_the_tests_that_need_an_extra():
    ci = CI_RUN.read_text(encoding="utf-8")
    code = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    lines = "\n".join(code)
    assert re.search(r'^python3 \.ci/readme_blocks\.py --torch "\$TORCH_PIN" > "\$readme_sh"$', lines, re.M)
    assert re.search(r'^bash "\$readme_sh"$', lines, re.M)
    assert re.search(r'^MINIMAMBA_REQUIRE_EXTRAS=1 python -m pytest -q -m "\(needs_extra or with_extra\) and not slow"$',
                     lines, re.M)
    assert lines.index('bash "$readme_sh"') < lines.index("MINIMAMBA_REQUIRE_EXTRAS=1 python -m pytest")
    assert re.search(r"^set -euo pipefail$", lines, re.M)  # any failing line, pytest's exit 5 included, fails CI


def write_readme(tmp_path, setup: str, test: str = "echo tested") -> Path:
    (tmp_path / "README.md").write_text(f"# x\n\n## Set up\n\n```bash\n{setup}\n```\n\n## Test\n\n```bash\n{test}\n```\n")
    return tmp_path / "README.md"


def run_blocks(tmp_path, readme: Path) -> subprocess.CompletedProcess:
    """Write the script from `readme` and run it in tmp_path, as .ci/run does."""
    made = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_blocks.py"), "--torch", "echo pinned torch",
                           "--readme", str(readme)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (tmp_path / "readme.sh").write_text(made.stdout)
    return subprocess.run(["bash", "readme.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_the_readme_script_fails_on_python_before_the_venv(tmp_path):
    """A fresh Debian has no `python` outside a venv (this machine may have one: the script hides it)."""
    readme = write_readme(tmp_path, "python -m venv .venv && . .venv/bin/activate  # as the README once said\n"
                                    "pip install torch\necho never > reached.txt")
    r = run_blocks(tmp_path, readme)
    assert r.returncode == 127, r.stdout + r.stderr
    assert "python does not exist before the venv is active" in r.stderr
    assert "this line of the README failed (exit 127): python -m venv .venv" in r.stderr
    assert not (tmp_path / "reached.txt").exists() and not (tmp_path / ".venv").exists()


def test_the_readme_script_runs_every_line_in_order_and_stops_at_the_first_failure(tmp_path):
    readme = write_readme(tmp_path, "echo one >> log.txt   # a comment\n# a comment line\npip install torch  # CPU: ...\n"
                                    "echo two \\\n  >> log.txt", test="echo three >> log.txt\nbash -c 'exit 5'\necho four >> log.txt")
    r = run_blocks(tmp_path, readme)
    assert r.returncode == 5, r.stdout + r.stderr  # pytest's "no tests collected" fails like any other line
    assert (tmp_path / "log.txt").read_text() == "one\ntwo\nthree\n"
    assert "pinned torch" in r.stdout and "[CI runs: echo pinned torch]" in r.stdout
    assert "this line of the README failed (exit 5): bash -c 'exit 5'" in r.stderr


@pytest.mark.parametrize("readme,needle", [
    ("# x\n\n## Test\n\n```bash\npython -m pytest -q\n```\n", 'no "## Set up" section'),
    ("# x\n\n## Set up\n\n```bash\npip install torch\n```\n\n## Test\n\nRun pytest.\n", '"## Test" section has no ```bash block'),
    ("# x\n\n## Set up\n\n```bash\n# nothing\n```\n\n## Test\n\n```bash\nx\n```\n", '"## Set up" block holds no command'),
    ("# x\n\n## Set up\n\n```bash\npip install -e .\n```\n\n## Test\n\n```bash\nx\n```\n", "0 `pip install torch` lines"),
], ids=["no-set-up", "no-test-block", "empty-block", "no-torch-line"])
def test_a_readme_without_the_blocks_fails_ci_with_one_line(tmp_path, readme, needle):
    (tmp_path / "README.md").write_text(readme)
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_blocks.py"), "--torch", "x", "--readme",
                        str(tmp_path / "README.md")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


# --- optional extras: skipped by one marker, never by a test's own importorskip ----------------------------

def test_the_extras_tests_know_are_pyprojects():
    from tests.helpers import EXTRAS

    optional = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[project.optional-dependencies]")[1]
    optional = optional.split("\n[", 1)[0]
    assert set(EXTRAS) | {"dev"} == set(re.findall(r"^([\w-]+) = \[", optional, re.M))


def test_no_test_skips_on_an_extras_module_by_itself():
    """Only the needs_extra marker skips for an extra, so CI's MINIMAMBA_REQUIRE_EXTRAS=1 sees every such skip."""
    from tests.helpers import EXTRAS

    modules = "|".join(m for ms in EXTRAS.values() for m in ms)
    own = re.compile(rf"""importorskip\(\s*["']({modules})\b|except ImportError[^\n]*\n\s*pytest\.skip""")
    found = [f.name for f in sorted((ROOT / "tests").glob("*.py")) if own.search(f.read_text(encoding="utf-8"))]
    assert not found, f"these tests skip for an extra's module themselves; mark them needs_extra: {found}"
