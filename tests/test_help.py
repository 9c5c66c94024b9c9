"""Every command a reader can run answers --help: usage printed, exit status 0.

argparse expands %-formatting in help strings only when the help is printed, so a stray "%" in
one of them breaks --help and nothing else (reproduce_moe_mamba.py's "2% of the steps" did).
The commands run in this process (runpy), so the test costs no extra interpreter start.
"""

import runpy
import sys
from pathlib import Path

import pytest

from tests.helpers import modules

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
                 if 'if __name__ == "__main__"' in p.read_text())
# `python -m` commands: a module with a main guard, or a package's __main__. interop.harness hands its
# arguments to lm-eval's own CLI (the `eval` extra): see test_harness.py.
MODULES = sorted(name.removesuffix(".__main__") for name, f in modules().items()
                 if (f.name == "__main__.py" or 'if __name__ == "__main__"' in f.read_text())
                 and name != "minimamba_moe.interop.harness")


def test_the_lists_are_not_empty():
    names = {p.name for p in SCRIPTS}
    assert {"train.py", "sample.py", "reproduce_moe_mamba.py", "reproduce_blackmamba.py"} <= names, names
    assert {"minimamba_moe.run.plot", "minimamba_moe.fast.aot"} <= set(MODULES), MODULES


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy on an imported module
@pytest.mark.parametrize("target", [*(str(p.relative_to(ROOT)) for p in SCRIPTS), *MODULES])
def test_help(target, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as exit_:
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None), f"{target} --help exited {exit_.value.code}"
    assert "usage:" in out.lower(), out[:500]
