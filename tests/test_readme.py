"""The README's Python example runs as written."""

import re
from pathlib import Path

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
