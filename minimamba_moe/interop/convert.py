"""Load Zyphra's released BlackMamba weights (pytorch_model.bin) into our Model.

The file is ``{"model": state_dict}`` in bf16 with these keys (docs/paper-facts.md#released-checkpoints),
i = layer, e = expert:

    embedding.word_embeddings.weight                        (V, d)   also the output head (tied)
    decoder.layers.{i}.norm.weight                          (d,)     RMSNorm before every mixer
    decoder.layers.{i}.mixer.in_proj.weight                 (2*di, d)        even i: Mamba
                            .conv1d.weight / .conv1d.bias   (di, 1, 4) / (di,)
                            .x_proj.weight                  (dt_rank + 2*n, di)
                            .dt_proj.weight / .dt_proj.bias (di, dt_rank) / (di,)
                            .A_log / .D                     (di, n) / (di,)
                            .out_proj.weight                (d, di)
    decoder.layers.{i}.mixer.router.weight / .router.bias   (E, d) / (E,)    odd i: MoE
                            .local_experts.{e}.linear_fc1.weight   (2*ffn, d)  rows: gate, then up
                            .local_experts.{e}.linear_fc2.weight   (d, ffn)
    decoder.final_layernorm.weight / .bias                  (d,)

Mapping onto minimamba_moe (same names as Zyphra's inside the Mamba mixer):

    embedding.word_embeddings.weight      -> embedding.weight (lm_head.weight is the same tensor)
    decoder.layers.{i}.norm.weight        -> layers.{i}.norm.weight
    decoder.layers.{i}.mixer.<mamba>      -> layers.{i}.mixer.<mamba>
    decoder.layers.{i}.mixer.router.*     -> layers.{i}.mixer.router.*
    local_experts.{e}.linear_fc1.weight   -> layers.{i}.mixer.w1[e]  (gate rows then up rows, as ours)
    local_experts.{e}.linear_fc2.weight   -> layers.{i}.mixer.w2[e]
    decoder.final_layernorm.*             -> final_norm.*

Every size is read off the tensors; the result reports the preset it matches (blackmamba-1.5b,
blackmamba-2.8b) or "custom". Weights stay in bf16 as stored (or ``dtype``), except A_log and D,
which are upcast to fp32 (docs/paper-facts.md#initialization). Routing at inference is the argmax
of the router's sigmoid.

**GeGLU by default.** The paper says the experts are SwiGLU; the released inference code applies
GELU to the gate half (GeGLU), and that is what the released weights were run with. So
``activation="geglu"`` is the default here; pass ``"swiglu"`` to run what the paper describes.

The file is read with ``torch.load(weights_only=True)``: nothing but tensors and plain containers
is unpickled (a ``.safetensors`` file of the same keys is read with safetensors). A file whose keys,
shapes or dtypes do not fit, or that holds a nan or inf, is refused with the differences listed.
The converted checkpoint goes to a new folder (or one without a checkpoint in it), written all or
nothing: into a temporary folder first, renamed when complete.

    python -m minimamba_moe.interop.convert pytorch_model.bin --tokenizer tokenizer.json --out out-blackmamba
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minimamba_moe.config import ACTIVATIONS as MODEL_ACTIVATIONS
from minimamba_moe.config import ConfigError, ModelConfig
from minimamba_moe.model import Model
from minimamba_moe.run.checkpoint import CONFIG, TRAIN_STATE, WEIGHTS, CheckpointError, save_model
from minimamba_moe.run.tokenizer import TokenizerError, load_tokenizer

ACTIVATIONS = tuple(a for a in MODEL_ACTIVATIONS if a != "relu")  # the gated ones: released experts are gated
DEFAULT_ACTIVATION = "geglu"  # what the released inference code runs (the paper says SwiGLU)
MATCHED_PRESETS = ("blackmamba-1.5b", "blackmamba-2.8b")
# the fields that decide the shapes of every tensor: equal on all of these = the same architecture
SIZE_FIELDS = ("padded_vocab_size", "d_model", "n_layer", "d_inner", "dt_rank", "d_state", "d_conv",
               "n_experts", "d_expert")

MAMBA_KEYS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
              "dt_proj.bias", "A_log", "D", "out_proj.weight")


class ConversionError(CheckpointError):
    """A Zyphra checkpoint cannot be read, or does not have the released layout."""


def load_zyphra_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read pytorch_model.bin: ``{"model": state_dict}`` (a bare state dict, or a .safetensors file, is accepted too)."""
    if not os.path.isfile(path):
        raise ConversionError(f"No Zyphra checkpoint at {path} (expected the release's pytorch_model.bin).")
    if _is_safetensors(path):  # read here on any torch (torch.load reads them by name only from 2.13)
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path} is damaged or not a safetensors file ({_first_line(e)}).") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": a second line saying nothing useful
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        if "Weights only load failed" in str(e):  # weights_only=True met something that is not a tensor or container
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"({found.group(1)})" if found else "(an instruction the safe unpickler refuses)"
            raise ConversionError(
                f"{path} holds Python objects besides tensors {what}, and is not loaded: unpickling them could run "
                "arbitrary code. Use the release's pytorch_model.bin, or save just the state dict of tensors."
            ) from None
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip format, or its older pickle one
            raise ConversionError(f"{path} is a PyTorch checkpoint that cannot be read (truncated or damaged: "
                                  f"{_first_line(e)}); download it again.") from None
        raise ConversionError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor its older "
                              "pickle format).") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors (expected {{'model': state_dict}}).")
    return sd


def _is_safetensors(path) -> bool:
    """By name, or by its start: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return str(path).endswith(".safetensors") or (len(head) == 9 and head[8:] == b"{"
                                                  and int.from_bytes(head[:8], "little") < 100_000_000)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _fail(problems: list[str], what: str) -> None:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise ConversionError(f"{what}: {shown}.")


def _shape(sd: dict, key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        close = difflib.get_close_matches(key, list(sd), n=1, cutoff=0.8)
        hint = f" (the file has {close[0]})" if close else ""
        _fail([f"missing {key}{hint}"], "Not the released BlackMamba layout")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        _fail([f"{key}: shape {shape} in the file, expected {ndim} dimensions"], "Not the released BlackMamba layout")
    return shape


def infer_config(sd: dict, activation: str = DEFAULT_ACTIVATION, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig whose tensors have the shapes in ``sd`` (read off layers 0 and 1).

    vocab_size: the tokenizer's vocabulary (50277 for GPT-NeoX); default: every embedding row.
    The result's ``name`` is the matching preset or "custom". Only the sizes are read here;
    ``check_layout`` then holds every tensor against them.
    """
    if activation not in ACTIVATIONS:
        raise ConversionError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}.")
    rows, d = _shape(sd, "embedding.word_embeddings.weight", 2)
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    n_layer = max(layer_ids) + 1 if layer_ids else 0
    if n_layer < 2 or n_layer % 2:
        raise ConversionError(f"Not the released BlackMamba layout: found {n_layer} decoder layers; "
                              "expected an even number, alternating Mamba (even) and MoE (odd).")
    m, e = "decoder.layers.0.mixer.", "decoder.layers.1.mixer."
    di2, _ = _shape(sd, m + "in_proj.weight", 2)
    di, n = _shape(sd, m + "A_log", 2)
    _, _, d_conv = _shape(sd, m + "conv1d.weight", 3)
    _, dt_rank = _shape(sd, m + "dt_proj.weight", 2)
    n_experts, _ = _shape(sd, e + "router.weight", 2)
    _, d_expert = _shape(sd, e + "local_experts.0.linear_fc2.weight", 2)
    if d == 0:
        raise ConversionError("Not the released BlackMamba layout: embedding.word_embeddings.weight has d_model = 0 columns.")
    if di2 != 2 * di or di % d:
        raise ConversionError(f"Not the released BlackMamba layout: {m}in_proj.weight has {di2} rows and A_log "
                              f"{di}; expected 2 * d_inner rows with d_inner a multiple of d_model = {d}.")
    vocab_size = rows if vocab_size is None else vocab_size
    if not 0 < vocab_size <= rows:
        raise ConversionError(f"The tokenizer has {vocab_size} tokens but the embedding only {rows} rows.")
    pad = next(p for p in (128, 64, 32, 16, 8, 4, 2, 1, rows) if -(-vocab_size // p) * p == rows)
    try:
        config = ModelConfig(
            vocab_size=vocab_size, pad_vocab_size_multiple=pad, d_model=d, n_layer=n_layer,
            layer_pattern=("mamba", "moe"), max_seq_len=2048, d_state=n, d_conv=d_conv, expand=di // d,
            dt_rank=dt_rank, n_experts=n_experts, top_k=1, d_expert=d_expert, router="sinkhorn",
            mlp_activation=activation, norm="rmsnorm", final_norm="layernorm", norm_eps=1e-5,
            tie_embeddings=True, residual_in_fp32=True,
        )
    except ConfigError as err:  # a size read off the tensors is 0 (or otherwise impossible)
        raise ConversionError(f"Not the released BlackMamba layout: the sizes read from layers 0 and 1 do not make a "
                              f"model ({str(err).replace('ModelConfig.', '')})") from None
    config.name = matching_preset(config)
    return config


def matching_preset(config: ModelConfig) -> str:
    """The BlackMamba preset with the same sizes as ``config``, or "custom"."""
    for name in MATCHED_PRESETS:
        preset = ModelConfig.from_preset(name)
        if all(getattr(preset, f) == getattr(config, f) for f in SIZE_FIELDS):
            return name
    return "custom"


def zyphra_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the released layout for this config, with its shape."""
    c = config
    d, di, n, r, E, f = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.n_experts, c.d_expert
    shapes = {"embedding.word_embeddings.weight": (c.padded_vocab_size, d)}
    for i, kind in enumerate(c.layer_kinds):
        p = f"decoder.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        if kind == "mamba":
            mamba = [(2 * di, d), (di, 1, c.d_conv), (di,), (r + 2 * n, di), (di, r), (di,), (di, n), (di,), (d, di)]
            shapes.update({p + "mixer." + k: s for k, s in zip(MAMBA_KEYS, mamba)})
        else:
            shapes[p + "mixer.router.weight"] = (E, d)
            shapes[p + "mixer.router.bias"] = (E,)
            for e in range(E):
                shapes[p + f"mixer.local_experts.{e}.linear_fc1.weight"] = (2 * f, d)
                shapes[p + f"mixer.local_experts.{e}.linear_fc2.weight"] = (d, f)
    shapes["decoder.final_layernorm.weight"] = (d,)
    shapes["decoder.final_layernorm.bias"] = (d,)
    return shapes


def check_layout(sd: dict, config: ModelConfig) -> None:
    """Refuse, listing every difference, unless ``sd`` has exactly the keys and shapes of ``config``."""
    expected = zyphra_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    for k in missing:
        close = difflib.get_close_matches(k, unexpected, n=1, cutoff=0.8)
        problems.append(f"missing {k}" + (f" (the file has {close[0]})" if close else ""))
    problems += [f"unexpected {k}" for k in unexpected]
    problems += [
        f"{k}: shape {tuple(sd[k].shape)} in the file, expected {s}"
        for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s
    ]
    problems += [f"{k}: dtype {sd[k].dtype} in the file, expected a floating-point one (bf16 as released)"
                 for k in expected if k in sd and not sd[k].is_floating_point()]
    if problems:
        sizes = ", ".join(f"{f}={getattr(config, f)}" for f in SIZE_FIELDS)
        _fail(problems, f"Not the released BlackMamba layout (sizes read from layers 0 and 1: {sizes})")


def convert_state_dict(sd: dict, config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Zyphra keys -> our keys (see the module docstring). A_log and D always come out fp32."""
    out = {"embedding.weight": sd["embedding.word_embeddings.weight"]}
    for i, kind in enumerate(config.layer_kinds):
        src, dst = f"decoder.layers.{i}.", f"layers.{i}."
        out[dst + "norm.weight"] = sd[src + "norm.weight"]
        if kind == "mamba":
            for k in MAMBA_KEYS:
                out[dst + "mixer." + k] = sd[src + "mixer." + k]
        else:
            out[dst + "mixer.router.weight"] = sd[src + "mixer.router.weight"]
            out[dst + "mixer.router.bias"] = sd[src + "mixer.router.bias"]
            experts = range(config.n_experts)
            out[dst + "mixer.w1"] = torch.stack([sd[src + f"mixer.local_experts.{e}.linear_fc1.weight"] for e in experts])
            out[dst + "mixer.w2"] = torch.stack([sd[src + f"mixer.local_experts.{e}.linear_fc2.weight"] for e in experts])
    out["final_norm.weight"] = sd["decoder.final_layernorm.weight"]
    out["final_norm.bias"] = sd["decoder.final_layernorm.bias"]
    for k, v in out.items():
        keep_fp32 = k.endswith((".A_log", ".D"))
        out[k] = v.float() if keep_fp32 else (v if dtype is None else v.to(dtype))
    return out


def convert_zyphra(
    sd: dict, activation: str = DEFAULT_ACTIVATION, vocab_size: int | None = None, dtype: torch.dtype | None = None
) -> Model:
    """A released BlackMamba state dict -> our Model in eval mode (weights in ``dtype``, default as stored)."""
    config = infer_config(sd, activation, vocab_size)
    check_layout(sd, config)
    bad = next((k for k, v in sd.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ConversionError(f"{bad} holds nan or inf values: the file is damaged; download it again.")
    with torch.device("meta"):  # no time spent initialising weights that are replaced right away
        model = Model(config)
    model.load_state_dict(convert_state_dict(sd, config, dtype), strict=False, assign=True)
    model.lm_head.weight = model.embedding.weight  # assign=True replaced the tied Parameter: tie again
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen when check_layout passed; guards the mapping itself
        raise ConversionError(f"Conversion left parameters unset: {', '.join(left)}.")
    return model.eval()


def load_zyphra(
    path: str | os.PathLike, activation: str = DEFAULT_ACTIVATION, tokenizer=None, dtype: torch.dtype | None = None
) -> Model:
    """Read and convert pytorch_model.bin; ``tokenizer`` (optional) sets the vocabulary size."""
    vocab_size = None if tokenizer is None else tokenizer.vocab_size
    return convert_zyphra(load_zyphra_state_dict(path), activation, vocab_size, dtype)


def stored_tokenizer_spec(spec: str) -> str:
    """The tokenizer spec to write into a converted checkpoint: a file as an absolute path, a name as is."""
    return os.path.abspath(spec) if os.path.isfile(spec) else spec


CHECKPOINT_FILES = (WEIGHTS, CONFIG, TRAIN_STATE, "sharded", "metrics.jsonl")  # what a run's folder holds


def check_out_dir(out: str | os.PathLike) -> None:
    """Refuse an output that is a file, or a folder already holding a checkpoint (a conversion would overwrite
    part of it: a training run's weights and config.json would no longer match its train_state.pt)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} is a file, not a folder: give a new folder for the converted checkpoint.")
    held = [name for name in CHECKPOINT_FILES if (out / name).exists()]
    if held:
        raise ConversionError(f"{out} already holds a checkpoint ({', '.join(held)}): give a new folder, or delete "
                              "that one first.")


def save_converted(model: Model, out: str | os.PathLike, **extra) -> None:
    """``save_model`` into a new folder, all or nothing: written into a temporary folder beside ``out``,
    then renamed to ``out`` (or, into an existing folder without a checkpoint, its two files moved in,
    config.json last)."""
    out = Path(out)
    check_out_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ConversionError(f"Cannot write the converted checkpoint to {out} ({e.strerror}).") from None
    try:
        save_model(model, tmp, **extra)
        if out.is_dir():
            for name in (WEIGHTS, CONFIG):
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            os.rename(tmp, out)
    except OSError as e:
        raise ConversionError(f"Cannot write the converted checkpoint to {out} ({e.strerror or e}).") from None
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert Zyphra's BlackMamba pytorch_model.bin to a minimamba-moe checkpoint.")
    ap.add_argument("path", help="pytorch_model.bin from Zyphra/BlackMamba-1.5B or -2.8B")
    ap.add_argument("--tokenizer", required=True, help="GPT-NeoX tokenizer.json (needs the `tokenizers` package)")
    ap.add_argument("--out", required=True, help="folder for the converted checkpoint")
    ap.add_argument("--activation", choices=ACTIVATIONS, default=DEFAULT_ACTIVATION,
                    help="expert gate: geglu (default, what the released code runs) or swiglu (what the paper says)")
    args = ap.parse_args(argv)
    try:
        check_out_dir(args.out)  # before the minutes spent reading the weights
        tok = load_tokenizer(args.tokenizer)
        model = load_zyphra(args.path, args.activation, tok)
        save_converted(model, args.out, tokenizer=stored_tokenizer_spec(args.tokenizer),
                       converted_from=os.path.abspath(args.path))
    except (CheckpointError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    total = model.count_params()
    print(f"{args.path}: preset {model.config.name}, {model.config.mlp_activation}, "
          f"{total.total / 1e6:.1f}M params ({total.active / 1e6:.1f}M active) -> {args.out}")


if __name__ == "__main__":
    main()
