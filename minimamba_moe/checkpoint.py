"""Model checkpoints: weights in safetensors, the config in JSON, written so a crash never breaks them.

A checkpoint is a folder:
    model.safetensors   the weights (the tied embedding stored once, as ``embedding.weight``)
    config.json         {"format": 1, "model": <ModelConfig fields>, ...extra (tokenizer, step, ...)}

Each file is written under a temporary name in the same folder and renamed over the old one
(``os.replace`` is atomic on POSIX), so a kill during a save leaves the previous checkpoint intact.
Loading never unpickles anything: safetensors and JSON hold only tensors, numbers and strings.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .model import Model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model it is loaded into."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def model_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The state dict as stored: tied head left out (it is the embedding), tensors contiguous."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_model(model: Model, out_dir: str | os.PathLike, **extra) -> None:
    """Write model.safetensors and config.json into out_dir (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in model_tensors(model).items()}
    atomic_write(out_dir / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": str(FORMAT)}))
    meta = {"format": FORMAT, "model": model.config.to_dict(), **extra}
    atomic_write(out_dir / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))


def read_config(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the extra fields stored in a checkpoint folder's config.json."""
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {ckpt_dir}: {path} does not exist (train one with `python train.py`).")
    try:
        meta = json.loads(path.read_text())
        config = ModelConfig.from_dict(meta.pop("model"))
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a valid minimamba-moe config: {e}") from None
    meta.pop("format", None)
    return config, meta


def load_weights(model: Model, weights_path: str | os.PathLike) -> None:
    """Load safetensors weights into ``model``, refusing (with the differences listed) if they do not fit."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise CheckpointError(f"No weights file at {weights_path}.")
    try:
        sd = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is damaged or not a safetensors file ({e}).") from None
    expected = {k: v.shape for k, v in model_tensors(model).items()}
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [
        f"{k}: shape {tuple(sd[k].shape)} in the file, {tuple(s)} in the model"
        for k, s in expected.items() if k in sd and sd[k].shape != s
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"The weights in {weights_path} do not match the config: {shown}.")
    model.load_state_dict(sd, strict=False)  # strict=False only for the tied head, checked above


def load_model(ckpt_dir: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> tuple[Model, dict]:
    """Build the model a checkpoint folder describes and load its weights. Returns (model, extra fields)."""
    config, meta = read_config(ckpt_dir)
    model = Model(config)
    load_weights(model, Path(ckpt_dir) / WEIGHTS)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
        for name, p in model.named_parameters():  # SPEC §1: A_log and D stay fp32
            if name.endswith(("A_log", ".D")):
                p.data = p.data.float()
    return model, meta
