"""The tutorial notebooks: made from the scripts (docs/hooks/notebooks.py), and they run.

- Every `docs/tutorial/*_steps.py` is a jupytext percent-format script that jupytext writes back
  unchanged (so no cell boundary is ambiguous and a notebook saved from it round-trips), with the
  notebook-only cell that runs every step and the script-only cell with the command line. Fast;
  runs by default.
- Every notebook, exactly as the site ships it, executes top to bottom in a fresh Python kernel
  (nbclient), on a CPU through Triton's interpreter, and prints what the script's steps print.
  Marked slow: the four took 35 s together on the project's 2 CPU cores when they were quiet and
  about 2 minutes while other jobs shared them (kernel start-ups and the Triton interpreter steps
  dominate); `python -m pytest -q -m slow tests/test_notebooks.py` runs them.

Needs the `docs-test` extra (jupytext, nbclient, ipykernel): marked `needs_extra`, skipped naming it
without the extra, a failure under MINIMAMBA_REQUIRE_EXTRAS=1 (see conftest.py). .ci/run runs the slow
part too.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.needs_extra("docs-test")
SCRIPTS = sorted((ROOT / "docs" / "tutorial").glob("*_steps.py"))



def _hook():
    spec = importlib.util.spec_from_file_location("notebooks_hook", ROOT / "docs" / "hooks" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_is_a_script_per_page_tutorial():
    assert [s.name for s in SCRIPTS] == ["mamba_steps.py", "moe_steps.py", "sample_steps.py", "scan_steps.py", "train_steps.py",
                                             "verify_steps.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_the_script_is_its_notebook(script):
    import jupytext

    text = script.read_text(encoding="utf-8")
    assert text.startswith("# %%\n"), f"{script.name}: a percent-format script starts with its first cell marker"
    assert jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent") == text, \
        f"{script.name}: jupytext does not write the script back unchanged; run `jupytext --to py:percent` on it"
    nb = _hook().notebook(script)
    active = [c.metadata.get("active") for c in nb.cells]
    assert "ipynb" in active and "py" in active, f"{script.name}: no notebook-only step runner or script-only main"
    runner = next(c for c in nb.cells if c.metadata.get("active") == "ipynb" and "STEPS" in c.source)
    assert "step()" in runner.source, f"{script.name}: the notebook does not run every step"
    main = next(c for c in nb.cells if c.metadata.get("active") == "py")
    assert main.cell_type == "raw" and "__main__" in main.source, f"{script.name}: the command line runs in the notebook"
    assert "TRITON_INTERPRET" not in text or any(
        c.metadata.get("active") == "ipynb" and 'os.environ["TRITON_INTERPRET"] = "1"' in c.source for c in nb.cells), \
        f"{script.name}: runs Triton kernels but its notebook does not choose the interpreter without a GPU"


def _step_output(script: Path, step: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, str(script), step], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_the_notebook_executes(script):
    from nbclient import NotebookClient

    nb = _hook().notebook(script)
    env_before = os.environ.pop("TRITON_INTERPRET", None)  # the notebook must choose the interpreter itself
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if o.get("output_type") == "stream" and o.get("name") == "stdout")
    steps = _hook_steps(script)
    for step in steps:
        assert f"--- {step}\n" in printed, f"{script.name}: the notebook did not run step {step}"
    # The notebook's first step prints what the script prints for it (the rest repeat the pattern).
    first = _step_output(script, steps[0])
    assert first.strip() in printed, f"{script.name}: step {steps[0]} printed\n{printed}\nbut the script prints\n{first}"


def _hook_steps(script: Path) -> list[str]:
    import ast

    tree = ast.parse(script.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "STEPS":
            return [k.value for k in node.value.keys]
    raise AssertionError(f"{script.name}: no STEPS = {{...}}")
