"""A training checkpoint survives a kill at any point of a save (minimamba_moe/run/checkpoint.py).

save_checkpoint renames three files one after another. A kill is simulated by making the n-th
``os.replace`` raise, which leaves the folder exactly as a kill -9 at that moment would (the
temporary files and the ``.prev`` links included). Law: after ``recover_interrupted_save``, the
folder holds one whole checkpoint — the previous one if the save did not finish renaming, the new
one if it did — and no leftover temporary or ``.prev`` file.
"""

import os

import pytest
import torch

from minimamba_moe import Model, ModelConfig
from minimamba_moe.run.checkpoint import (load_train_state, load_weights, model_tensors, recover_interrupted_save,
                                          save_checkpoint)


class Killed(Exception):
    pass


def save(out, model, step):
    save_checkpoint(out, model_tensors(model), model.config, {"marker": torch.tensor(float(step))}, step=step)


def models():
    config = ModelConfig.from_preset("tiny", n_layer=2, d_model=32)
    torch.manual_seed(0)
    first = Model(config)
    torch.manual_seed(1)
    return first, Model(config)


def assert_whole_checkpoint(out, model, step):
    state = load_train_state(out)  # raises on a torn folder
    assert state["step"] == step and state["marker"].item() == step
    loaded = Model(model.config)
    load_weights(loaded, out / "model.safetensors")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), f"{name} is not step {step}'s"
    assert not [f.name for f in out.iterdir() if f.name.endswith((".tmp", ".prev"))]


@pytest.mark.parametrize("renames_done", [0, 1, 2])
def test_kill_between_renames_gives_back_the_previous_checkpoint(tmp_path, monkeypatch, renames_done):
    first, second = models()
    save(tmp_path, first, 1)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == renames_done:
            raise Killed
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save(tmp_path, second, 2)
    monkeypatch.setattr(os, "replace", real_replace)
    recover_interrupted_save(tmp_path)
    assert_whole_checkpoint(tmp_path, first, 1)


def test_kill_after_the_renames_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    first, second = models()
    save(tmp_path, first, 1)
    real_unlink = type(tmp_path).unlink

    def unlink(self, *args, **kwargs):
        if self.name.endswith(".prev") and self.exists():  # the clean-up after the renames
            raise Killed
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "unlink", unlink)
    with pytest.raises(Killed):
        save(tmp_path, second, 2)
    monkeypatch.setattr(type(tmp_path), "unlink", real_unlink)
    assert [f for f in tmp_path.iterdir() if f.name.endswith(".prev")], "the kill should have left the links"
    recover_interrupted_save(tmp_path)
    assert_whole_checkpoint(tmp_path, second, 2)


def test_a_completed_save_leaves_only_the_checkpoint(tmp_path):
    first, second = models()
    save(tmp_path, first, 1)
    save(tmp_path, second, 2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]
    recover_interrupted_save(tmp_path)
    assert_whole_checkpoint(tmp_path, second, 2)


def test_saved_files_are_ordinary_files_readable_by_others(tmp_path):
    """Both writers (save_model, save_checkpoint) write under a private mkstemp name; the files they
    leave are 0o644 like any other file (a checkpoint shared on a cluster must be readable)."""
    from minimamba_moe.run.checkpoint import save_model

    first, _ = models()
    save_model(first, tmp_path / "model", tokenizer="bytes")
    save(tmp_path / "run", first, 1)
    modes = {f"{d}/{f.name}": oct(f.stat().st_mode & 0o777) for d in ("model", "run") for f in (tmp_path / d).iterdir()}
    assert len(modes) == 5 and set(modes.values()) == {"0o644"}, modes


def test_checksums_work_without_hashlib_file_digest(tmp_path, monkeypatch):
    """requires-python is >=3.10; hashlib.file_digest is 3.11+: saving and loading must not need it."""
    import hashlib

    from minimamba_moe.run.checkpoint import load_model, save_model

    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    first, _ = models()
    save_model(first, tmp_path / "model", tokenizer="bytes")
    save(tmp_path / "run", first, 1)
    load_model(tmp_path / "model")
    assert load_train_state(tmp_path / "run")["step"] == 1


def test_load_model_in_bfloat16_keeps_A_log_and_D_in_float32(tmp_path):
    from minimamba_moe.run.checkpoint import load_model, save_model

    first, _ = models()
    save_model(first, tmp_path, tokenizer="bytes")
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    kept = {n: p.dtype for n, p in model.named_parameters() if n.endswith((".A_log", ".D"))}
    assert kept and set(kept.values()) == {torch.float32}, kept
    others = {p.dtype for n, p in model.named_parameters() if n not in kept}
    assert others == {torch.bfloat16}
    for name, p in model.named_parameters():  # the fp32 ones hold the saved values exactly
        if name in kept:
            assert torch.equal(p, dict(first.named_parameters())[name])


def test_a_flipped_byte_is_named_by_the_loader(tmp_path):
    from minimamba_moe.run.checkpoint import CheckpointError, load_model

    first, _ = models()
    save(tmp_path, first, 1)
    path = tmp_path / "train_state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    load_model(tmp_path)  # the weights are intact
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_train_state(tmp_path)


def test_non_finite_weights_are_never_saved(tmp_path):
    from minimamba_moe.run.checkpoint import CheckpointError

    first, second = models()
    save(tmp_path, first, 1)
    with torch.no_grad():
        second.embedding.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="nan or inf"):
        save(tmp_path, second, 2)
    assert_whole_checkpoint(tmp_path, first, 1)


def test_a_file_given_for_the_checkpoint_folder_is_named_as_such(tmp_path):
    from minimamba_moe.run.checkpoint import CheckpointError, read_config

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"is a file: give the checkpoint's folder \\({tmp_path}\\)"):
        read_config(tmp_path / "config.json")


def test_a_checkpoint_written_before_the_package_was_regrouped_loads_and_gives_the_same_logits():
    """tests/data/checkpoint_0.1.0 was written by save_model of commit 419062b (the flat package,
    before minimamba_moe/run/ and interop/), with the logits that code computed for a fixed input."""
    import json
    from pathlib import Path

    from minimamba_moe.run.checkpoint import load_model

    folder = Path(__file__).parent / "data" / "checkpoint_0.1.0"
    expected = json.loads((folder / "expected.json").read_text())
    model, _ = load_model(folder)
    with torch.no_grad():
        logits = model.eval()(torch.tensor(expected["input_ids"])).logits
    last = torch.tensor(expected["logits_last_row"])
    err = (logits[0, -1] - last).abs().max().item()
    assert err < 1e-5, f"logits of the old checkpoint moved by {err:.2e}"
    assert abs(logits.double().sum().item() - expected["logits_sum"]) < 1e-3
