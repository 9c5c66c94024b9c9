"""train.py's settings: one typed definition, from which the command line, config files, --help and
validation all derive.

    TrainSettings            every setting: its type, default, help, and allowed range or choices
    read_given(argv)         the command line over a config file, each value checked
    merge(given, saved)      defaults < preset (or the saved run, on --resume) < what was given
    help_text(preset)        --help: every setting with that preset's default

A value is checked where it enters (command line, config file, saved run) against its field's type
and range, and the whole set again once merged (``check_together``), before train.py touches any
file. Anything wrong raises ``UsageError`` with one sentence saying what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import DEFAULT_OUT_DIR
from minimamba_moe.config import PRESETS, ConfigError, ModelConfig
from .cli import MAX_THREADS
from .data import DEFAULT_CACHE_DIR


class UsageError(ValueError):
    """A setting is unknown, or its value has the wrong type or is out of range."""


def setting(default, help: str, *, low=None, high=None, low_open=False, high_open=False, choices=None):
    """A dataclass field with its help text and its allowed range ([low, high], ends open if asked) or choices."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, low_open=low_open,
                                                 high_open=high_open, choices=choices))


@dataclass
class TrainSettings:
    # --- output ---------------------------------------------------------------------------------
    out_dir: str = setting(DEFAULT_OUT_DIR, "checkpoint and metrics.jsonl; sample.py reads the same folder by default")
    resume: bool = setting(False, "continue the run saved in out_dir (its settings, then yours on top)")
    # --- data -----------------------------------------------------------------------------------
    data: str = setting("", "a local text file or folder of them; with neither data nor dataset: the Python stdlib's sources")
    dataset: str = setting("", "a `datasets` hub name (streamed, needs the network) or a local .txt/.json/.jsonl/.csv/.parquet")
    dataset_config: str = setting("", "the hub dataset's configuration (e.g. en for allenai/c4)")
    text_field: str = setting("text", "the dataset column holding the text")
    tokenizer: str = setting("bytes", "bytes | gpt2 | path/to/ranks.tiktoken | path/to/tokenizer.json")
    data_cache: str = setting(DEFAULT_CACHE_DIR, "where tokenized corpora are kept (one folder per corpus + tokenizer)")
    max_data_tokens: int = setting(0, "stop tokenizing after this many tokens (0 = all); for large streamed datasets", low=0)
    val_every: int = setting(100, "every val_every-th document goes to the validation split", low=2)
    # --- model ----------------------------------------------------------------------------------
    preset: str = setting("tiny", "sets the model and the training defaults", choices=tuple(PRESETS))
    # --- optimization ---------------------------------------------------------------------------
    max_steps: int = setting(300, "optimizer steps", low=1)
    batch_size: int = setting(8, "sequences per micro-batch per process", low=1)
    seq_len: int = setting(128, "tokens per sequence", low=1)
    grad_accum: int = setting(1, "micro-batches per step: the global batch is batch_size * grad_accum * processes", low=1)
    lr: float = setting(3e-3, "peak learning rate", low=0, low_open=True)
    min_lr_ratio: float = setting(0.1, "the cosine decays to lr * min_lr_ratio", low=0, high=1)
    warmup_frac: float = setting(0.01, "fraction of decay_steps spent warming up linearly from 0", low=0, high=1)
    decay_steps: int = setting(0, "length of the warmup + cosine schedule (0 = max_steps); the lr stays at its floor after", low=0)
    weight_decay: float = setting(0.1, "AdamW, on matrices only: not on norms, biases, A_log, D, dt bias", low=0)
    beta1: float = setting(0.9, "AdamW beta1 (MoE-Mamba: 0.9)", low=0, high=1, high_open=True)
    beta2: float = setting(0.999, "AdamW beta2 (MoE-Mamba: 0.999; a short run may prefer 0.99)", low=0, high=1, high_open=True)
    grad_clip: float = setting(0.5, "clip the global gradient norm to this (0 = off)", low=0)
    on_nonfinite: str = setting("stop", "a step whose loss or gradient norm is nan/inf: stop the run, or skip that batch",
                                choices=("stop", "skip"))
    # --- evaluation, checkpoints, logging -------------------------------------------------------
    eval_interval: int = setting(25, "validation loss every this many steps (and at the start and the end)", low=1)
    eval_batches: int = setting(4, "validation micro-batches per evaluation (per process)", low=1)
    ckpt_interval: int = setting(0, "checkpoint every this many steps (0 = eval_interval); always at the end", low=0)
    progress: bool = setting(True, "a progress bar on a terminal; plain lines every log_interval steps otherwise")
    log_interval: int = setting(10, "steps between plain progress lines when output is not a terminal", low=1)
    # --- system ---------------------------------------------------------------------------------
    device: str = setting("auto", "auto (cuda if present) | cpu | cuda | cuda:1 ...")
    dtype: str = setting("auto", "auto (bfloat16 autocast on GPU, float32 on CPU) | float32 | bfloat16; weights stay fp32",
                         choices=("auto", "float32", "bfloat16"))
    compile: bool = setting(False, "torch.compile the model")
    fsdp: bool = setting(False, "under torchrun: shard with FSDP2 (built on the meta device, checkpoints written "
                                "sharded with torch.distributed.checkpoint) instead of DDP")
    activation_checkpointing: bool = setting(False, "recompute each layer's activations in the backward: less "
                                                    "memory, about a third more compute")
    plan: bool = setting(False, "print the run's plan (parameters, memory per GPU, FLOPs and time per step) and exit; "
                                "allocates nothing")
    nproc: int = setting(0, "--plan: the number of processes to plan for (0: this run's)", low=0)
    peak_tflops: float = setting(989.0, "one GPU's peak TFLOP/s, for --plan and the MFU logged on a GPU "
                                        "(989: H100 SXM, dense bf16)", low=0, low_open=True)
    mfu: float = setting(0.4, "--plan: the model FLOPs utilisation a step is timed at", low=0, high=1, low_open=True)
    seed: int = setting(1337, "model init and data order", low=0, high=2**63 - 1)
    threads: int = setting(0, "CPU threads for torch; 0 = auto: 1 for a small model on the CPU (fastest, above all on a "
                              "busy machine), else torch's default", low=0, high=MAX_THREADS)
    check_memory: bool = setting(True, "refuse a run whose memory estimate exceeds what the device has (false: try anyway)")
    debug: bool = setting(False, "show the Python traceback of an error (also: MINIMAMBA_DEBUG=1)")


FIELDS = {f.name: f for f in dataclasses.fields(TrainSettings)}
SECTIONS = {"out_dir": "output", "data": "data", "preset": "model", "max_steps": "optimization",
            "eval_interval": "evaluation, checkpoints, logging", "device": "system"}  # --help's headings
MODEL_FIELDS = {f.name: f.type for f in dataclasses.fields(ModelConfig) if f.name != "name"}

# Training defaults per preset: MoE-Mamba's recipe (Pióro et al. 2024, section 4; docs/paper-facts.md,
# "Training recipes" and "Presets"): GPT-2 tokens, context 1024, AdamW(0.9, 0.999), weight decay 0.1, clip 0.5,
# 1% warmup, cosine to 0.1; global batch 64 at 25M, 1024 at 100M: with N GPUs divide grad_accum by N.
# BlackMamba (Anthony et al. 2024) gives no optimizer settings: its presets reuse MoE-Mamba's recipe.
_LARGE = dict(tokenizer="gpt2", eval_interval=1000, eval_batches=20, seq_len=1024)
PRESET_TRAINING = {
    "tiny": {},
    "moe-mamba-25m": dict(_LARGE, lr=5e-4, batch_size=64, max_steps=150_000),
    "mamba-25m": dict(_LARGE, lr=1e-3, batch_size=64, max_steps=150_000),
    "transformer-25m": dict(_LARGE, lr=5e-4, batch_size=64, max_steps=150_000),  # no recipe published: as its MoE twin
    "transformer-moe-25m": dict(_LARGE, lr=5e-4, batch_size=64, max_steps=150_000),
    "moe-mamba-100m": dict(_LARGE, lr=5e-4, batch_size=16, grad_accum=64, max_steps=30_000),
    "mamba-100m": dict(_LARGE, lr=1e-3, batch_size=16, grad_accum=64, max_steps=30_000),
    "transformer-moe-100m": dict(_LARGE, lr=2.5e-4, batch_size=16, grad_accum=64, max_steps=30_000),
    "blackmamba-1.5b": dict(_LARGE, lr=5e-4, batch_size=8, grad_accum=8, seq_len=2048, max_steps=100_000),
    "blackmamba-2.8b": dict(_LARGE, lr=5e-4, batch_size=4, grad_accum=16, seq_len=2048, max_steps=100_000),
}


# --- one value --------------------------------------------------------------------------------------
def _describe(meta, base):
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}[base]
    lo, hi = meta["low"], meta["high"]
    if lo is not None and hi is not None:
        return f"{what} in {'(' if meta['low_open'] else '['}{lo}, {hi}{')' if meta['high_open'] else ']'}"
    if lo is not None:
        return f"{what} {'>' if meta['low_open'] else '>='} {lo}"
    return what


def convert(key: str, value, kind: str, meta: dict | None = None, typed: bool = False):
    """A command-line string (or, typed=True, a config file's value) -> the field's type, checked.

    ``kind`` is the field's annotation as text ("int", "float | None", "tuple[str, ...]", ...);
    ``meta`` its range and choices. Raises UsageError naming the setting and what it may be.
    """
    meta = meta or dict(low=None, high=None, low_open=False, high_open=False, choices=None)
    shown = f"--{key}={value}" if not typed else f"{key} = {value!r}"
    if value is None or (not typed and value in ("None", "none") and "None" in kind):
        if "None" in kind:
            return None
        raise UsageError(f"{shown}: {key} cannot be None")
    if "tuple" in kind:
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise UsageError(f"{shown}: expected a list of names (e.g. mamba,moe)")
    base = kind.split("|")[0].strip()
    if isinstance(value, str) and base != "str" and not typed:
        if base == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"{shown}: expected true or false")
            value = value.lower() in ("true", "1", "yes")
        else:
            try:
                value = float(value) if base == "float" else int(value) if re.fullmatch(r"[+-]?\d+", value) else float(value)
            except ValueError:
                raise UsageError(f"{shown}: expected {_describe(meta, base)}") from None
            if base == "int":
                if not math.isfinite(value) or value != int(value):  # "1e6" is an integer, "0.5" is not
                    raise UsageError(f"{shown}: expected an integer")
                value = int(value)
    ok = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[base]
    if not isinstance(value, ok) or (isinstance(value, bool) and base != "bool"):
        raise UsageError(f"{shown}: expected {_describe(meta, base)}")
    if base == "float":
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"{shown}: expected a finite number")
    if meta["choices"] and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{shown} is not allowed: expected {_describe(meta, base)}{hint}")
    lo, hi = meta["low"], meta["high"]
    if (lo is not None and (value <= lo if meta["low_open"] else value < lo)) or \
            (hi is not None and (value >= hi if meta["high_open"] else value > hi)):
        raise UsageError(f"{shown} is out of range: expected {_describe(meta, base)}")
    return value


NOT_EMPTY = ("out_dir", "data_cache", "tokenizer", "text_field", "device")  # ("" would mean the current folder, ...)


def convert_setting(key, value, typed=False):
    """A value for a TrainSettings field or a ModelConfig field, converted and checked on its own."""
    if key in NOT_EMPTY and isinstance(value, str) and not value.strip():
        raise UsageError(f"--{key} is empty: give a value, or leave the setting out for its default "
                         f"({FIELDS[key].default})")
    if key in FIELDS:
        return convert(key, value, FIELDS[key].type, FIELDS[key].metadata, typed)
    return convert(key, value, MODEL_FIELDS[key], None, typed)


def check_known(key: str, where: str = "") -> None:
    if key not in FIELDS and key not in MODEL_FIELDS:
        close = difflib.get_close_matches(key, list(FIELDS) + list(MODEL_FIELDS), n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else " (see --help)"
        raise UsageError(f"unknown setting --{key}{where}{hint}")


# --- the command line and config files --------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised (not printed with the usage and exited)
        raise UsageError(message)


def build_parser(preset: str = "tiny") -> argparse.ArgumentParser:
    """The command line: a config file, then --key=value (or --key value; a bare --flag sets a bool)."""
    defaults = {**{k: f.default for k, f in FIELDS.items()}, **PRESET_TRAINING.get(preset, {})}
    ap = _Parser(prog="train.py", allow_abbrev=False, add_help=False, usage="python train.py [CONFIG] [--key=value ...]",
                 formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30, width=120))
    ap.add_argument("config", nargs="?", help="a TOML or JSON file of settings (the command line wins over it)")
    ap.add_argument("-h", "--help", action="store_true", help="this list; with --preset=NAME, that preset's defaults")
    group = None
    for name, f in FIELDS.items():
        group = ap.add_argument_group(SECTIONS[name]) if name in SECTIONS else group
        meta = f.metadata
        extra = f" [{_describe(meta, f.type)}]" if meta["low"] is not None or meta["choices"] else ""
        kw = dict(nargs="?", const="true") if f.type == "bool" else {}
        group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=f.type.upper(),
                           help=f"{meta['help']}{extra} (default: {defaults[name]})", **kw)
    config = ModelConfig.from_preset(preset)
    model = ap.add_argument_group(f"model: any ModelConfig field (see minimamba_moe/config.py); defaults of --preset={preset}")
    for name, kind in MODEL_FIELDS.items():
        value = getattr(config, name)
        value = ",".join(value) if isinstance(value, tuple) else value
        kw = dict(nargs="?", const="true") if kind == "bool" else {}
        model.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=kind.split("|")[0].split("[")[0].strip().upper(),
                           help=f"({kind}) (default: {value})", **kw)
    return ap


def _underscores(arg: str) -> str:
    key, eq, value = arg[2:].partition("=")
    return "--" + key.replace("-", "_") + eq + value


def read_command_line(argv: list[str]) -> tuple[str | None, dict]:
    """argv -> (config file path or None, {key: string value})."""
    argv = [_underscores(a) if a.startswith("--") else a for a in argv]  # --batch-size=4 is --batch_size=4
    args, unknown = build_parser().parse_known_args(argv)
    for arg in unknown:
        if arg.startswith("-"):
            check_known(arg.lstrip("-").split("=")[0])
        raise UsageError(f"unexpected argument {arg!r} (settings are --key=value; one config file at most)")
    given = {k: v for k, v in vars(args).items() if k not in ("config", "help")}
    return args.config, given


def read_config_file(path: str) -> dict:
    """A TOML or JSON file of settings -> {key: typed value}; unknown keys and wrong types are refused."""
    kind = "JSON" if path.endswith(".json") else "TOML"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a folder: give a .toml or .json file") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text: give a .toml or .json file") from None
    if kind == "TOML":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UsageError(f"config file {path}: reading TOML needs Python 3.11 or later; "
                             "give the same settings as a .json file") from None
    try:
        if kind == "JSON":
            values = json.loads(text)
        else:
            values = tomllib.loads(text)
    except ValueError as e:
        raise UsageError(f"config file {path} is not valid {kind}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a table of settings (key = value), not a {type(values).__name__}")
    for key, value in values.items():
        check_known(key, f" in {path}")
        values[key] = convert_setting(key, value, typed=True)
    return values


# --- all of them together ---------------------------------------------------------------------------
def read_given(argv: list[str]) -> dict:
    """The settings the user gave: the config file's, then the command line's on top; each value checked."""
    path, given = read_command_line(argv)
    given = {k: convert_setting(k, v) for k, v in given.items()}
    return {**(read_config_file(path) if path else {}), **given}


def merge(given: dict, saved: dict | None = None) -> tuple[TrainSettings, dict]:
    """(settings, model overrides): defaults < preset (or, resuming, the saved run's ``saved``) < ``given``.

    ``out_dir`` is the one given (or the default), never one stored in a saved run: the folder that
    was read is the folder that is written.
    """
    values = {k: f.default for k, f in FIELDS.items()}
    model_overrides = {}
    if saved is not None:
        saved = dict(saved)
        for key in ("out_dir", "resume", "model"):  # (on resume the model is the checkpoint's config.json)
            saved.pop(key, None)
        for key, value in saved.items():
            if key in FIELDS:  # (a setting an older version had is dropped)
                values[key] = convert_setting(key, value, typed=True)
    else:
        values.update(PRESET_TRAINING[given.get("preset", values["preset"])])
    for key, value in given.items():
        if key in FIELDS:
            values[key] = value
        else:
            model_overrides[key] = value
    settings = TrainSettings(**values)
    check_together(settings)
    return settings, model_overrides


def configure(argv: list[str], saved: dict | None = None) -> tuple[TrainSettings, dict]:
    """(settings, model overrides) from a command line, without touching any file but a config file."""
    return merge(read_given(argv), saved)


def check_together(s: TrainSettings) -> None:
    """What no single value shows."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", s.device):
        raise UsageError(f"--device={s.device} is not a device: expected auto, cpu, cuda or cuda:N")
    if s.data and s.dataset:
        raise UsageError("give --data (a local text file or folder) or --dataset (a `datasets` name or file), not both")
    if s.decay_steps and s.decay_steps < round(s.warmup_frac * s.decay_steps):
        raise UsageError("--decay_steps must be longer than its warmup")


def model_config(s: TrainSettings, model_overrides: dict) -> ModelConfig:
    """The new run's ModelConfig (its preset with the overrides); a bad field is a usage error."""
    try:
        config = ModelConfig.from_preset(s.preset, **model_overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    check_seq_len(s, config)
    return config


def check_seq_len(s: TrainSettings, config: ModelConfig) -> None:
    if "attention" in config.layer_kinds and s.seq_len > config.max_seq_len:
        raise UsageError(f"--seq_len={s.seq_len} is longer than this Transformer's context max_seq_len="
                         f"{config.max_seq_len}: lower --seq_len or raise --max_seq_len")


def help_text(argv: list[str]) -> str:
    """--help: the module docstring's usage and every setting; `--help --preset=NAME` shows that preset's defaults."""
    preset = "tiny"
    for i, a in enumerate(argv):
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
    if preset not in PRESETS:
        convert("preset", preset, "str", FIELDS["preset"].metadata)  # raises, naming the close match
    return build_parser(preset).format_help()
