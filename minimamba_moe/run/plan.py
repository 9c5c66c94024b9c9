"""A plan before a run: sizes, memory per GPU, FLOPs and time per step, counted without allocating.

    make_plan(config, batch_size, seq_len, grad_accum, nproc, ...) -> Plan
    format_plan(plan) -> str          what ``python train.py --plan`` prints

Parameters are counted on the meta device. Memory per GPU, for AdamW with fp32 master weights
(memory.py's ``training_memory`` and ``activation_bytes_per_token``):

    weights     4 bytes/param                 FSDP: / nproc, plus one layer gathered in bf16 (2 bytes/param)
    gradients   4 bytes/param                 FSDP: / nproc (reduced in fp32), plus that layer's bf16 grads
    optimizer   8 bytes/param (two moments)   FSDP: / nproc
    activations per token of a micro-batch, with all layers' saved tensors, or with activation
                checkpointing only each layer's input plus one layer recomputed at a time

Under DDP every process holds everything. Nothing here counts the CUDA context, allocator
fragmentation or communication buffers (~1-3 GiB in practice).

Time per step = tokens per step x training FLOPs per token / (nproc x peak x MFU), with the
FLOPs from flops.py and the peak and MFU stated (an H100 SXM's dense bf16 peak, 989 TFLOP/s, by
default; a well-tuned run reaches 30-50% MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minimamba_moe.config import ModelConfig
from minimamba_moe.flops import flops_per_token
from minimamba_moe.flops import mfu as flops_mfu
from .memory import activation_bytes_per_token, training_memory
from minimamba_moe.model import Model, count_params

H100_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 (NVIDIA's datasheet: 1979 with 2:4 sparsity)
GiB = 2**30


@dataclass
class Plan:
    config: ModelConfig
    nproc: int
    fsdp: bool
    batch_size: int
    seq_len: int
    grad_accum: int
    bf16: bool
    activation_checkpointing: bool
    peak_tflops: float
    mfu: float
    params_total: int
    params_active: int
    largest_layer: int  # parameters of the largest layer (what FSDP gathers at once)
    flops_per_token: float  # training (forward + backward)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * self.nproc

    def memory(self, sharded: bool | None = None, checkpointing: bool | None = None) -> dict[str, int]:
        """Bytes per GPU: weights, gradients, optimizer, activations (and their total)."""
        sharded = self.fsdp if sharded is None else sharded
        checkpointing = self.activation_checkpointing if checkpointing is None else checkpointing
        shards = self.nproc if sharded else 1
        gathered = self.largest_layer * (2 if self.bf16 else 4) if sharded and shards > 1 else 0
        est = training_memory(self.config, self.batch_size, self.seq_len, shards)  # fp32 weights, grads, AdamW
        act = activation_bytes_per_token(self.config, 2 if self.bf16 else 4, checkpointing)
        m = dict(weights=est.params + gathered, gradients=est.grads + gathered, optimizer=est.optimizer,
                 activations=act * self.batch_size * self.seq_len)
        m["total"] = sum(m.values())
        return m

    @property
    def step_seconds(self) -> float:
        return self.tokens_per_step * self.flops_per_token / (self.nproc * self.peak_tflops * 1e12 * self.mfu)


def make_plan(config: ModelConfig, batch_size: int, seq_len: int, grad_accum: int = 1, nproc: int = 1,
              fsdp: bool = True, bf16: bool = True, activation_checkpointing: bool = False,
              peak_tflops: float = H100_BF16_TFLOPS, mfu: float = 0.4) -> Plan:
    """The plan of a run; FSDP shards only with more than one process."""
    counts = count_params(config)
    period = ModelConfig.from_dict({**config.to_dict(), "n_layer": len(config.layer_pattern)})
    with torch.device("meta"):
        layers = Model(period).layers  # one of each layer kind
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return Plan(config, nproc, fsdp and nproc > 1, batch_size, seq_len, grad_accum, bf16, activation_checkpointing,
                peak_tflops, mfu, counts.total, counts.active, largest,
                flops_per_token(config, seq_len, training=True).total)


def mfu(config: ModelConfig, seq_len: int, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one GPU processing ``tokens_per_s`` training tokens per second."""
    return flops_mfu(config, seq_len, tokens_per_s, peak_tflops * 1e12)


def _gib(b: int) -> str:
    return f"{b / GiB:7.2f} GiB"


def format_plan(p: Plan) -> str:
    """The plan as train.py --plan prints it."""
    c = p.config
    lines = [
        f"plan: {c.name}, {p.nproc} process{'es' if p.nproc > 1 else ''}, "
        f"{'FSDP2 (sharded)' if p.fsdp else 'DDP' if p.nproc > 1 else 'one process'}, "
        f"{'bf16' if p.bf16 else 'fp32'} compute, activation checkpointing {'on' if p.activation_checkpointing else 'off'}",
        f"  parameters           {p.params_total / 1e6:10.1f} M total, {p.params_active / 1e6:.1f} M active per token",
        f"  tokens per step      {p.tokens_per_step:10,d}  (batch_size {p.batch_size} x seq_len {p.seq_len} x "
        f"grad_accum {p.grad_accum} x {p.nproc} processes)",
        f"  FLOPs per token      {p.flops_per_token / 1e9:10.2f} GFLOP (training: 3 x forward; minimamba_moe/flops.py)",
        "  memory per GPU           this run   sharded(FSDP)     DDP   | activations: checkpointed / all kept",
    ]
    run = p.memory()
    sharded, ddp = p.memory(sharded=True), p.memory(sharded=False)
    ckpt, full = p.memory(checkpointing=True), p.memory(checkpointing=False)
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        extra = f"  | {_gib(ckpt['activations'])} / {_gib(full['activations'])}" if key == "activations" else ""
        lines.append(f"    {key:<12} {_gib(run[key])} {_gib(sharded[key])} {_gib(ddp[key])}{extra}")
    lines += [
        f"  time per step        {p.step_seconds:10.2f} s at {p.mfu:.0%} MFU of {p.peak_tflops:g} TFLOP/s per GPU "
        f"({p.tokens_per_step / p.step_seconds:,.0f} tokens/s)",
        "  (estimates: no CUDA context, fragmentation or communication buffers, ~1-3 GiB more per GPU)",
    ]
    return "\n".join(lines)
