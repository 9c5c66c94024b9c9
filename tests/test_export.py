"""`python -m minimamba_moe.run.distributed export OUT_DIR` on bad input: one line, nothing written.

A sharded checkpoint is written in this process (``save_sharded`` without a process group, as
tests/test_fsdp.py does), then damaged one way per case; ``main`` is the command's own entry point.
"""

import json
import shutil

import pytest
import torch

from minimamba_moe.config import ModelConfig
from minimamba_moe.run.checkpoint import load_model, save_model
from minimamba_moe.run.distributed import build_model, main, save_sharded


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    config = ModelConfig.from_preset("tiny", d_model=32, n_layer=2, d_expert=32)
    model = build_model(config, 0, "cpu")
    save_sharded(out / "sharded", model, torch.optim.AdamW(model.parameters()), {"step": 1, "settings": "{}"})
    save_model(model, out, tokenizer="bytes", step=1)  # config.json as train.py --fsdp writes it
    (out / "model.safetensors").unlink()
    return out


def _other_config(d):
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["d_model"] = 64
    meta.pop("sha256")
    (d / "config.json").write_text(json.dumps(meta))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage, needle", [
    (_other_config, "does not fit"),
    (lambda d: [p.unlink() for p in (d / "sharded").glob("*.distcp")], "cannot be read"),
    (lambda d: [_truncate(p) for p in (d / "sharded").glob("*.distcp")], "cannot be read"),
    (lambda d: _truncate(d / "sharded" / ".metadata"), ".metadata cannot be read"),
    (lambda d: (d / "model.safetensors").mkdir(), "is a folder"),
], ids=["other-config", "no-shards", "truncated-shards", "truncated-metadata", "weights-path-a-folder"])
def test_export_of_a_damaged_or_mismatched_checkpoint_is_one_line(run_dir, tmp_path, capfd, damage, needle):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    damage(d)
    config_before = (d / "config.json").read_bytes()
    assert main(["export", str(d)]) == 1
    captured = capfd.readouterr()  # (file descriptors: torch's logging would print a traceback there)
    assert captured.err.count("\n") == 1 and needle in captured.err and "Traceback" not in captured.err, captured.err
    assert (d / "config.json").read_bytes() == config_before
    assert not (d / "model.safetensors").is_file() and not list(d.glob(".*.tmp")), "a half-written export was left"


def test_export_help_and_a_good_export(run_dir, tmp_path, capsys):
    assert main(["--help"]) == 0 and "export OUT_DIR" in capsys.readouterr().out
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    assert main(["export", str(d)]) == 0
    assert load_model(d)[1]["step"] == 1


def test_the_command_on_truncated_metadata_prints_one_line(run_dir, tmp_path):
    """As a subprocess: torch.distributed.checkpoint logs a traceback to the root logger on a damaged
    .metadata, which only shows outside pytest (whose log capture takes the root logger's records)."""
    import subprocess
    import sys

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    _truncate(d / "sharded" / ".metadata")
    p = subprocess.run([sys.executable, "-m", "minimamba_moe.run.distributed", "export", str(d)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and ".metadata cannot be read" in p.stderr, p.stderr
