"""The README's Python example runs as written, and (slow) its quoted training curve is what train.py prints."""

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


@pytest.mark.slow
def test_readme_quick_start_curve_is_what_train_py_prints(tmp_path):
    """`python train.py` as the README runs it (1 to 2 minutes): its val losses at steps 0, 25, 50 and 300."""
    text = README.read_text(encoding="utf-8")
    version = re.search(r"with Python (\d+)\.(\d+) \(whose standard library is the corpus", text)
    assert version, "the README no longer says which Python's stdlib its curve was measured on"
    if sys.version_info[:2] != (int(version.group(1)), int(version.group(2))):
        pytest.skip(f"the curve was measured on Python {version.group(1)}.{version.group(2)}'s standard library")
    quoted = re.search(r"val loss goes ([\d.]+) → ([\d.]+) \(step 25\) → ([\d.]+) \(step 50\) → ([\d.]+) \(step 300\)", text)
    assert quoted, "the README no longer quotes the quick start's curve in the form this test reads"
    root = README.parent
    p = subprocess.run([sys.executable, str(root / "train.py"), "--progress=false"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr
    val = {r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
           if "val_loss" in r}
    got = [f"{val[s]:.2f}" for s in (0, 25, 50, 300)]
    assert got == list(quoted.groups()), f"README quotes {list(quoted.groups())}, train.py now prints {got}"
