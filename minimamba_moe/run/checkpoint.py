"""Model checkpoints: weights in safetensors, the config in JSON, written so a crash never breaks them.

A checkpoint is a folder (train.py writes ``DEFAULT_OUT_DIR`` unless told otherwise):
    model.safetensors   the weights (the tied embedding stored once, as ``embedding.weight``)
    config.json         {"format": 1, "model": <ModelConfig fields>, ...extra (tokenizer, step, ...)}
    train_state.pt      train.py only: optimizer state, step, RNG states, settings (tensors, numbers,
                        strings; read with ``torch.load(weights_only=True)``, which unpickles no objects)

Each file is written under a temporary name in the same folder and renamed over the old one
(``os.replace`` is atomic on POSIX), so a kill during a save leaves the previous checkpoint intact.
A training checkpoint is three files renamed one after another: before the renames, the old files
get a second name (a hard link ``.<name>.prev``), so that a kill between two renames can be undone
by ``recover_interrupted_save`` (train.py and sample.py run it before reading the folder); the
links go once all three renames are done. A save holds an exclusive ``flock`` on the folder, and
recovery waits for it, so a reader never undoes a save that is still running.

config.json records a SHA-256 digest of every file of the checkpoint (``"sha256"``: the weights, the
training state, and config.json's own fields), and loading checks them, naming a file that does not
match: a flipped byte is refused instead of trained on. (To load a hand-edited config.json, delete
its ``"sha256"`` entry: a checkpoint without digests is loaded unchecked.)
Loading never unpickles anything: safetensors and JSON hold only tensors, numbers and strings.
Weights with a nan or inf are never saved, nor loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: saves are not locked against a concurrent recovery
    fcntl = None

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimamba_moe.config import ConfigError, ModelConfig
from minimamba_moe.model import Model

DEFAULT_OUT_DIR = "out"  # where train.py writes and sample.py reads when given no folder
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model it is loaded into."""


# --8<-- [start:write_tmp]
def _write_tmp(path: Path, write) -> str:
    """``write(tmp)`` for a temporary file beside ``path``, flushed to disk; returns the temporary name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
# --8<-- [end:write_tmp]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
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
    check_finite(tensors)
    atomic_write(out_dir / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": str(FORMAT)}))
    meta = {"format": FORMAT, "model": model.config.to_dict(), **extra}
    atomic_write(out_dir / CONFIG, lambda p: Path(p).write_text(config_text(meta, {WEIGHTS: file_digest(out_dir / WEIGHTS)})))


# --- checksums ---------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _fields_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def config_text(meta: dict, digests: dict[str, str]) -> str:
    """config.json's text: ``meta`` plus the digests of the other files and of meta's own fields."""
    return json.dumps({**meta, "sha256": {**digests, CONFIG: _fields_digest(meta)}}, indent=2) + "\n"


def verify_files(ckpt_dir: str | os.PathLike, meta: dict, names: tuple[str, ...]) -> None:
    """Raise CheckpointError naming the first of ``names`` whose digest differs from config.json's record."""
    recorded = meta.get("sha256") or {}
    for name in names:
        path = Path(ckpt_dir) / name
        if name in recorded and path.is_file() and file_digest(path) != recorded[name]:
            raise CheckpointError(f"{path} does not match the SHA-256 digest recorded in config.json: the file is "
                                  "damaged or was changed; restore it from a copy, or train again.")


def check_finite(tensors: dict[str, torch.Tensor], where: str = "the weights") -> None:
    """Raise CheckpointError naming a floating-point tensor holding a nan or inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where} hold nan or inf values (first in {name}): a model that diverged is not "
                                  "saved, resumed or sampled from.")


def read_config(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the extra fields stored in a checkpoint folder's config.json."""
    path = Path(ckpt_dir) / CONFIG
    if Path(ckpt_dir).is_file():  # e.g. the config.json or model.safetensors itself
        raise CheckpointError(f"{ckpt_dir} is a file: give the checkpoint's folder ({Path(ckpt_dir).parent}).")
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {ckpt_dir}: {path} does not exist (train one with `python train.py`).")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256", {}), dict):
            raise CheckpointError(f"{path} is not a valid minimamba-moe config: expected a JSON object with "
                                  "\"model\" fields (and a \"sha256\" object of digests).")
        recorded = meta.get("sha256", {})
        if recorded and recorded.get(CONFIG) != _fields_digest({k: v for k, v in meta.items() if k != "sha256"}):
            raise CheckpointError(f"{path} does not match the SHA-256 digest it records: the file is damaged or was "
                                  "edited (to load an edited config.json, delete its \"sha256\" entry).")
        config = ModelConfig.from_dict(meta.pop("model"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text: it is damaged or not a minimamba-moe config.") from None
    except KeyError as e:
        raise CheckpointError(f"{path} is not a valid minimamba-moe config: it lacks the field {e}.") from None
    except (json.JSONDecodeError, TypeError, AttributeError, ConfigError) as e:
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
    check_finite(sd, f"the weights in {weights_path}")  # never written by a save: damaged or edited by hand
    model.load_state_dict(sd, strict=False)  # strict=False only for the tied head, checked above


def load_model(ckpt_dir: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> tuple[Model, dict]:
    """Build the model a checkpoint folder describes and load its weights. Returns (model, extra fields)."""
    config, meta = read_config(ckpt_dir)
    verify_files(ckpt_dir, meta, (WEIGHTS,))
    model = Model(config)
    load_weights(model, Path(ckpt_dir) / WEIGHTS)
    model.to(device)
    if dtype is not None:  # A_log and D stay fp32, their saved values (docs/paper-facts.md, "Initialization")
        fp32 = {n: p.data for n, p in model.named_parameters() if n.endswith(("A_log", ".D"))}
        model.to(dtype)
        for name, p in model.named_parameters():
            if name in fp32:
                p.data = fp32[name]
    return model, meta


# --- training checkpoints (train.py) ---------------------------------------------------------------
def recover_interrupted_save(out_dir: str | os.PathLike) -> None:
    """Undo what a killed ``save_checkpoint`` left behind, before anything reads the folder.

    Temporary files (``.<name>.*.tmp``) are deleted. A ``.prev`` link that is still the same file
    as its name was not renamed over yet. If some were and some were not, the kill came between two
    renames: the previous checkpoint is put back. Leftover links are deleted. Reads no file, and
    writes nothing when there is nothing to undo; waits for a save in progress (its lock) to end.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not (list(out_dir.glob(".*.tmp")) or list(out_dir.glob(".*.prev"))):
        return
    try:
        with _locked(out_dir):
            _recover(out_dir)
    except OSError as e:
        raise CheckpointError(f"cannot undo the interrupted save in {out_dir} ({e.strerror}): "
                              "it needs write access to that folder.") from None


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive flock on the folder itself, released by the kernel if the process dies."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --8<-- [start:recover]
def _recover(out_dir: Path) -> None:
    for f in out_dir.glob(".*.tmp"):
        f.unlink(missing_ok=True)
    pairs = [(_prev(out_dir / name), out_dir / name) for name in (WEIGHTS, TRAIN_STATE, CONFIG)]
    pairs = [(prev, path) for prev, path in pairs if prev.exists()]
    renamed = [path.exists() and not os.path.samefile(prev, path) for prev, path in pairs]
    torn = len(pairs) == 3 and any(renamed) and not all(renamed)
    for (prev, path), done in zip(pairs, renamed):
        if torn and done:
            os.replace(prev, path)  # the new file goes, the previous one is back under its name
        else:
            prev.unlink()
# --8<-- [end:recover]


# --8<-- [start:save_checkpoint]
def save_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: ModelConfig,
                    train_state: dict, **extra) -> None:
    """Write weights, config.json and the training state, all three to temporary names first, then rename.

    ``tensors`` is the full model state dict (``lm_head.weight`` is left out when tied); ``train_state``
    a dict of tensors, numbers, strings, lists and dicts. Every file records ``extra["step"]`` so that
    ``load_train_state`` can tell a consistent checkpoint from one torn by a kill between renames.
    Refuses (CheckpointError) weights holding a nan or inf.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = str(extra.get("step", ""))
    if config.tie_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    check_finite(tensors)
    meta = {"format": FORMAT, "model": config.to_dict(), **extra}
    with _locked(out_dir):
        weights = _write_tmp(out_dir / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": str(FORMAT), "step": step}))
        state = _write_tmp(out_dir / TRAIN_STATE, lambda p: torch.save({**train_state, "step": extra.get("step")}, p))
        digests = {WEIGHTS: file_digest(weights), TRAIN_STATE: file_digest(state)}
        tmps = [(weights, out_dir / WEIGHTS), (state, out_dir / TRAIN_STATE),
                (_write_tmp(out_dir / CONFIG, lambda p: Path(p).write_text(config_text(meta, digests))), out_dir / CONFIG)]
        prevs = _keep_previous([path for _, path in tmps])
        for tmp, path in tmps:
            os.replace(tmp, path)
        for prev in prevs:
            prev.unlink()
# --8<-- [end:save_checkpoint]


def _prev(path: Path) -> Path:
    return path.with_name(f".{path.name}.prev")


def _keep_previous(paths: list[Path]) -> list[Path]:
    """Hard-link every existing file in ``paths`` to its ``.prev`` name (no copy); [] where links fail."""
    prevs = []
    try:
        for path in paths:
            if path.exists():
                _prev(path).unlink(missing_ok=True)
                os.link(path, _prev(path))
                prevs.append(_prev(path))
    except OSError:  # a file system without hard links: no undo for a kill between renames
        for prev in prevs:
            prev.unlink(missing_ok=True)
        return []
    return prevs


def load_train_state(ckpt_dir: str | os.PathLike, map_location="cpu", required: tuple[str, ...] = ()) -> dict:
    """The training state of a checkpoint folder, checked to belong to the same step as its weights,
    to match its recorded digests, and to hold the ``required`` keys."""
    path = Path(ckpt_dir) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"Cannot resume: {path} does not exist (that folder holds no training checkpoint).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is damaged or not a minimamba-moe training state ({type(e).__name__}).") from None
    missing = [k for k in required if k not in state] if isinstance(state, dict) else ["all of them"]
    if missing:
        raise CheckpointError(f"{path} is not a complete training state: it lacks {', '.join(missing)}.")
    _, meta = read_config(ckpt_dir)
    try:
        from safetensors import safe_open

        with safe_open(Path(ckpt_dir) / WEIGHTS, "pt") as f:
            weights_step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / WEIGHTS} is missing or damaged ({e}).") from None
    steps = {str(state.get("step")), str(meta.get("step")), str(weights_step)}
    if len(steps) != 1:
        raise CheckpointError(f"The checkpoint in {ckpt_dir} is torn (a save was killed between renames): "
                              f"steps {sorted(steps)} in its files. Resume from an older copy or start afresh.")
    verify_files(ckpt_dir, meta, (WEIGHTS, TRAIN_STATE))
    return state
