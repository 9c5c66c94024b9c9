"""Sharded training without a full model per process: FSDP2 on the meta device, and DCP checkpoints.

    build_model(config, seed, device, mesh=None, ...)   built on meta, sharded, then each shard allocated
                                                         and initialised: no process holds the whole model
    init_weights_(model, seed)                           the weights of ``torch.manual_seed(seed); Model(config)``
    checkpoint_activations(model)                        recompute each layer's activations in the backward
    save_sharded(folder, model, optimizer, extra)        torch.distributed.checkpoint: each process writes its shard
    load_sharded(folder, model, optimizer)               onto any number of processes (DCP reshards on load)
    load_full_weights(model, path)                       a whole-model safetensors into the shards, a tensor at a time
    export_weights(model, path)                          one safetensors file, streamed a tensor at a time

The initialisation law (tests/test_fsdp.py holds it bitwise): for any number of processes, the full
tensors of the sharded model are exactly those of ``torch.manual_seed(seed); Model(config)`` built
on the CPU, i.e. of the unsharded run. Every process replays the model's construction one unit at
a time (the embedding, each layer, the final norm, the head) with the same CPU generator, keeps the
rows of its own shard and drops the unit: the random numbers are drawn on every process (a few
seconds at 2.8B parameters), but at most one layer and the embedding are ever whole in host memory.

Mixed precision follows FSDP2's ``MixedPrecisionPolicy``: each layer's parameters are gathered in
bf16 for the forward and backward, gradients are reduced in fp32, and the master weights and AdamW
state stay fp32 (sharded). A layer then computes as a bf16 model does (``Block`` casts its input to
the norm's dtype; A_log, D and the dt bias are used through ``.float()`` of their bf16 copies, while
their fp32 masters take the updates); the residual stream between layers stays fp32 (layer inputs
are not cast), as ``residual_in_fp32`` asks.

A sharded checkpoint is a DCP folder: each process writes its own shards (``__<rank>_0.distcp``)
and rank 0 the metadata and ``state.json`` (step, settings). It is written under a temporary name
and renamed into place, so a kill leaves the previous one. ``python -m minimamba_moe.run.distributed
export OUT_DIR`` turns it into the model.safetensors + config.json that sample.py reads, one tensor
at a time in one process, without a process group.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import struct
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.utils.checkpoint import checkpoint

from .checkpoint import (CONFIG, WEIGHTS, CheckpointError, atomic_write, check_finite, config_text, file_digest,
                         read_config)
from minimamba_moe.config import ModelConfig
from minimamba_moe.model import Block, Model, make_norm

SHARDED = "sharded"  # the DCP folder inside a run's out_dir
STATE = "state.json"  # the step and settings, beside the DCP files


# --- building and initialising ---------------------------------------------------------------------
def mixed_precision(bf16: bool):
    """FSDP2's policy: bf16 compute, fp32 gradient reduction; layer inputs left as they are (fp32 residual)."""
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def build_model(config: ModelConfig, seed: int, device, mesh=None, *, bf16: bool = False,
                activation_checkpointing: bool = False) -> Model:
    """The model on ``device``, its weights those of ``torch.manual_seed(seed); Model(config)``.

    With a ``mesh`` (a 1-D DeviceMesh), each layer and then the root are ``fully_shard``-ed while on
    the meta device, and only this process's shard of each parameter is ever allocated.
    """
    with torch.device("meta"):
        model = Model(config)
    if activation_checkpointing:
        checkpoint_activations(model)
    if mesh is not None:
        policy = mixed_precision(bf16)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    if config.tie_embeddings and model.lm_head.weight is not model.embedding.weight:
        model.lm_head.weight = model.embedding.weight  # to_empty allocates each name anew
    init_weights_(model, seed)
    return model


@torch.no_grad()
def init_weights_(model: Model, seed: int) -> None:
    """Fill ``model``'s parameters (plain tensors or FSDP shards) with those of ``torch.manual_seed(seed);
    Model(config)`` on the CPU, one unit at a time, in the order Model.__init__ draws them."""
    c = model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding = nn.Embedding(c.padded_vocab_size, c.d_model)  # drawn now, redrawn by _init_weights below
        for i, kind in enumerate(c.layer_kinds):
            block = Block(c, kind)
            for p in block.parameters():  # Model._init_weights: output projections / sqrt(n_layer)
                if getattr(p, "_is_output_projection", False):
                    p.div_(math.sqrt(c.n_layer))
            _copy_unit(model.layers[i], block)
            del block
        if model.final_norm is not None:
            _copy_unit(model.final_norm, make_norm(c.final_norm, c.d_model, c.norm_eps))
        head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)  # drawn even when tied, as in Model
        nn.init.normal_(embedding.weight, std=c.init_std)  # Model._init_weights, in its order
        if not c.tie_embeddings:
            nn.init.normal_(head.weight, std=c.init_std)
            _copy_unit(model.lm_head, head)
        _copy_unit(model.embedding, embedding)


def _copy_unit(target: nn.Module, full: nn.Module) -> None:
    """Copy each tensor of ``full`` (on the CPU, whole) into ``target``'s tensor of that name: all of
    it, or the rows of this process's shard when ``target``'s is a DTensor."""
    tensors = dict(target.named_parameters())
    tensors.update(target.named_buffers())
    for name, src in [*full.named_parameters(), *full.named_buffers()]:
        _copy_rows(tensors[name], src)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    if not hasattr(dst, "to_local"):
        dst.copy_(src)
        return
    (placement,) = dst.placements  # FSDP2 on a 1-D mesh: Shard(0), torch.chunk's split
    assert isinstance(placement, Shard), f"unexpected placement {placement}"
    mesh = dst.device_mesh
    chunks = torch.chunk(src, mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    local = dst.to_local()
    if rank < len(chunks) and local.numel():
        local.copy_(chunks[rank])


def checkpoint_activations(model: Model) -> None:
    """Each layer keeps only its input for the backward and recomputes the rest (torch.utils.checkpoint,
    non-reentrant). Parameter names are unchanged, so checkpoints load either way."""
    for layer in model.layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)


def device_mesh(device_type: str):
    """A 1-D mesh over every process of the default process group."""
    return init_device_mesh(device_type, (dist.get_world_size(),))


# --- sharded checkpoints -----------------------------------------------------------------------------
def _is_master() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(folder: str | os.PathLike, model: nn.Module, optimizer, extra: dict) -> None:
    """Write ``model`` and ``optimizer`` (sharded or not) as a DCP checkpoint, each process its shard,
    plus ``extra`` (JSON) as state.json; written beside ``folder`` and renamed into place."""
    folder = Path(folder)
    tmp, prev = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.prev")
    if _is_master():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process, no process group: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optimizer": osd, "rng_cpu": torch.get_rng_state()}, checkpoint_id=tmp,
                 **single_process())
    if _is_master():
        (tmp / STATE).write_text(json.dumps(extra))
        shutil.rmtree(prev, ignore_errors=True)
        if folder.exists():
            folder.rename(prev)
        tmp.rename(folder)
        shutil.rmtree(prev, ignore_errors=True)
    _barrier()


def single_process() -> dict:
    """DCP's keyword for a run without a process group: no_dist=True where DCP takes it; torch 2.6 has no
    such argument and assumes one process by itself (with a warning)."""
    if dist.is_initialized() or "no_dist" not in inspect.signature(dcp.save).parameters:
        return {}
    return {"no_dist": True}


def read_state(folder: str | os.PathLike) -> dict:
    """state.json of a sharded checkpoint (its step and settings); CheckpointError if it is missing or damaged."""
    path = Path(folder) / STATE
    try:
        state = json.loads(path.read_text())
        assert isinstance(state, dict) and isinstance(state.get("step"), int)
    except (OSError, ValueError, AssertionError):
        raise CheckpointError(f"{path} is missing or damaged: the sharded checkpoint in {folder} cannot be "
                              "resumed.") from None
    return state


def load_sharded(folder: str | os.PathLike, model: nn.Module, optimizer) -> dict:
    """Load a DCP checkpoint written by any number of processes into ``model`` and ``optimizer`` as
    they are sharded now (or not at all); restores the CPU RNG; returns state.json."""
    state = read_state(folder)
    msd, osd = get_state_dict(model, optimizer)  # (allocates the optimizer's state to load into)
    sd = {"model": msd, "optimizer": osd, "rng_cpu": torch.get_rng_state()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=folder, **single_process())
    except (CheckpointException, RuntimeError, ValueError, KeyError) as e:  # (CheckpointException: a BaseException)
        raise CheckpointError(f"the sharded checkpoint in {folder} does not fit this model and optimizer "
                              f"({type(e).__name__}).") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    torch.set_rng_state(sd["rng_cpu"])
    return state


def load_full_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a whole-model safetensors file into a sharded model, one tensor at a time: each process
    reads every tensor in turn and keeps its rows. Names and shapes are checked first."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers())
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        want = set(stored_names(model))
        bad = sorted(names ^ want) + sorted(n for n in names & want
                                            if list(f.get_slice(n).get_shape()) != list(params[n].shape))
        if bad:
            raise CheckpointError(f"the weights in {path} do not match the model (first: {bad[0]}).")
        with torch.no_grad():
            for name in sorted(names):
                _copy_rows(params[name], f.get_tensor(name))


# --- one safetensors file, a tensor at a time ----------------------------------------------------------
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def stream_safetensors(path: str | os.PathLike, specs: dict, tensors, metadata: dict | None = None) -> None:
    """Write a safetensors file from ``specs`` ({name: (shape, dtype)}, in file order) and ``tensors``,
    an iterable yielding each tensor in that order: only one is ever held. (The format: an 8-byte
    little-endian header length, the JSON header of dtypes, shapes and byte ranges, then the data.)
    A tensor holding a nan or inf raises CheckpointError (the file is then incomplete: write to a
    temporary name)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for (name, (shape, dtype)), t in zip(specs.items(), tensors, strict=True):
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, f"{name}: got {tuple(t.shape)} {t.dtype}"
            check_finite({name: t})
            f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def stored_names(model: Model) -> list[str]:
    """The state-dict names a checkpoint stores, in order (the tied head is the embedding: left out)."""
    names = list(model.state_dict(keep_vars=True))
    return [n for n in names if not (model.config.tie_embeddings and n == "lm_head.weight")]


def export_weights(model: Model, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Every process calls this; rank 0 writes ``path``. Each tensor is gathered whole (``full_tensor``)
    in turn, written, and dropped: no process holds more than one full tensor."""
    sd = model.state_dict(keep_vars=True)
    names = stored_names(model)
    specs = {n: (tuple(sd[n].shape), sd[n].dtype) for n in names}
    gathered = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (sd[n] for n in names))
    if _is_master():
        stream_safetensors(path, specs, gathered, metadata)
    else:
        for _ in gathered:  # the all-gathers need every process
            pass


def export_sharded(folder: str | os.PathLike, config: ModelConfig, path: str | os.PathLike,
                   metadata: dict | None = None) -> None:
    """One process, no process group: read the DCP checkpoint in ``folder`` one tensor at a time and
    write the weights as one safetensors file at ``path``."""
    with torch.device("meta"):
        model = Model(config)
    sd = model.state_dict()
    names = stored_names(model)
    specs = {n: (tuple(sd[n].shape), sd[n].dtype) for n in names}

    def tensors():
        for n in names:
            box = {"model": {n: torch.empty(specs[n][0], dtype=specs[n][1])}}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(box, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=True),
                         **single_process())
            yield box["model"][n]
    stream_safetensors(path, specs, tensors(), metadata)


def main(argv: list[str]) -> int:
    """python -m minimamba_moe.run.distributed export OUT_DIR: model.safetensors + config.json from OUT_DIR/sharded."""
    usage = "usage: python -m minimamba_moe.run.distributed export OUT_DIR"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 2 or argv[0] != "export":
        print(usage, file=sys.stderr)
        return 2
    out = Path(argv[1])
    try:
        if not (out / SHARDED / ".metadata").is_file():
            raise CheckpointError(f"{out / SHARDED} holds no sharded checkpoint (train.py --fsdp under torchrun "
                                  "writes one)")
        config, extra = read_config(out)
        step = read_state(out / SHARDED)["step"]
        extra.pop("sha256", None)
        meta = {"format": 1, "model": config.to_dict(), **extra, "step": step}
        try:  # here, not in dcp.load: on a damaged file it logs a traceback before raising
            dcp.FileSystemReader(str(out / SHARDED)).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{out / SHARDED / '.metadata'} cannot be read (truncated or damaged: "
                                  f"{type(e).__name__}); the sharded checkpoint cannot be exported.") from None
        if (out / WEIGHTS).is_dir():
            raise CheckpointError(f"{out / WEIGHTS} is a folder, where the export writes the weights: move it away")
        try:
            atomic_write(out / WEIGHTS, lambda p: export_sharded(out / SHARDED, config, p, {"format": 1, "step": step}))
        except (CheckpointException, RuntimeError, ValueError, KeyError, OSError, AssertionError, EOFError) as e:
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__  # DCP's: the rank's error
            if "Size mismatch" in why:  # a tensor of another shape than config.json describes
                raise CheckpointError(f"the sharded checkpoint in {out / SHARDED} does not fit {out / CONFIG} "
                                      f"({why}).") from None
            raise CheckpointError(f"the sharded checkpoint in {out / SHARDED} cannot be read (missing, truncated or "
                                  f"damaged files: {why}).") from None
        digests = {WEIGHTS: file_digest(out / WEIGHTS)}
        atomic_write(out / CONFIG, lambda p: Path(p).write_text(config_text(meta, digests)))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / WEIGHTS} and {out / CONFIG} (step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
