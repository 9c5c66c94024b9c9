"""How much memory a run needs, counted before anything is allocated, and what the device has.

    training_memory(config, batch_size, seq_len, ...)   parameters, gradients, AdamW state, activations
    activation_bytes_per_token(config, act_bytes, ckpt) every layer's saved activations (plan.py, --plan)
    inference_memory(config, dtype)                      the weights sample.py loads
    available_memory(device)                             (bytes, "what that is") for the CPU or a GPU
    check_fits(estimate, device, hint)                   raise MemoryCheckError when it cannot fit

The parameters are counted on the meta device (``count_params``) for one period of
``layer_pattern`` and scaled to ``n_layer`` layers, so even a config with 200,000 layers is counted
in milliseconds. Activations here are a floor, not the whole story: the largest single activation,
the fp32 logits of one micro-batch with the cross-entropy's log-softmax and gradient beside them
(3 x batch x seq_len x padded vocab x 4 bytes). A run whose floor does not fit cannot run; one
whose floor fits may still run out (activations of every layer, fragmentation).

``activation_bytes_per_token`` counts every layer's activations (what ``train.py --plan`` shows): the
tensors each layer saves for its backward (fp32 residual stream, the rest in the compute dtype),
measured on the CPU path with ``torch.autograd.graph.saved_tensors_hooks`` at small sizes and written
as formulas in the model's dimensions (tests/test_plan.py holds them within 15% of that measurement);
kernels that save more or less move them by a few tens of percent.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from minimamba_moe.config import ModelConfig
from minimamba_moe.model import count_params

GiB = 2**30


class MemoryCheckError(ValueError):
    """The run's memory estimate exceeds what the device has."""


class MemoryEstimate(NamedTuple):
    params: int  # bytes of the weights
    grads: int  # bytes of their gradients
    optimizer: int  # bytes of the optimizer state (AdamW: two fp32 moments per parameter)
    activations: int  # bytes of the largest activation (a floor for all of them)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def n_params(config: ModelConfig) -> int:
    """Parameters of the model ``config`` describes, without allocating (meta device), in O(len(layer_pattern))."""
    period = len(config.layer_pattern)
    small = ModelConfig.from_dict({**config.to_dict(), "n_layer": period})
    double = ModelConfig.from_dict({**config.to_dict(), "n_layer": 2 * period})
    try:
        one, two = count_params(small).total, count_params(double).total
    except RuntimeError as e:  # a tensor too large for torch to describe, e.g. d_model=1e9
        raise MemoryCheckError(f"this model cannot be built: one of its tensors is too large for torch "
                               f"({str(e).splitlines()[0]}); choose smaller sizes (d_model, d_expert, ...)") from None
    return one + (two - one) * (config.n_layer // period - 1)


def training_memory(config: ModelConfig, batch_size: int, seq_len: int, shards: int = 1) -> MemoryEstimate:
    """Bytes one training process needs at least: fp32 weights, gradients and AdamW moments (each
    divided over ``shards`` processes under FSDP), and the fp32 logits of one micro-batch with the
    cross-entropy's log-softmax and gradient."""
    p = n_params(config) * 4 // shards
    logits = batch_size * seq_len * config.padded_vocab_size * 4
    return MemoryEstimate(params=p, grads=p, optimizer=2 * p, activations=3 * logits)


def layer_activation_bytes(config: ModelConfig, kind: str, act_bytes: int) -> int:
    """Bytes one layer of ``kind`` saves for its backward, per token (``act_bytes``: 2 for bf16, 4 for fp32)."""
    c, a = config, act_bytes
    d, di = c.d_model, c.d_inner
    block = 4 * d + a * d  # the fp32 residual input (for the norm) and the norm's output
    if kind == "parallel":  # one block's norm feeding a Mamba and an MoE
        return layer_activation_bytes(config, "mamba", a) + layer_activation_bytes(config, "moe", a) - block
    if kind == "mamba":  # in_proj's x and z, conv before/after silu, delta and its softplus, y, the scan's own
        return block + a * (9 * di + c.dt_rank + 2 * c.d_state)
    if kind == "moe":  # fp32 router input and logits; per chosen expert: its input row, w1's output, activation
        f1 = c.d_expert if c.mlp_activation == "relu" else 2 * c.d_expert
        return block + 4 * (d + c.n_experts) + c.top_k * a * (d + f1 + c.d_expert)
    if kind == "attention":  # qkv, rotated q and k, the attention output (flash: no l x l matrix)
        return block + a * 7 * d
    f1 = c.d_ff if c.mlp_activation == "relu" else 2 * c.d_ff  # dense mlp: fc1's output, the activation's
    return block + a * (f1 + 2 * c.d_ff)


def head_activation_bytes(config: ModelConfig, act_bytes: int) -> int:
    """Per token: the final norm's input and output, and fp32 logits, log-softmax and their gradient."""
    return 4 * config.d_model + act_bytes * config.d_model + 3 * 4 * config.padded_vocab_size


def activation_bytes_per_token(config: ModelConfig, act_bytes: int, checkpointing: bool) -> int:
    """Bytes of activations per token of a micro-batch at the end of the forward (the peak)."""
    per_layer = [layer_activation_bytes(config, kind, act_bytes) for kind in config.layer_kinds]
    head = head_activation_bytes(config, act_bytes)
    if not checkpointing:
        return sum(per_layer) + head
    return config.n_layer * 4 * config.d_model + max(per_layer) + head  # inputs kept, one layer recomputed


def inference_memory(config: ModelConfig, dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    """Bytes sample.py needs at least: the weights in ``dtype`` (plus one row of fp32 logits)."""
    size = torch.empty((), dtype=dtype).element_size()
    return MemoryEstimate(params=n_params(config) * size, grads=0, optimizer=0,
                          activations=config.padded_vocab_size * 4)


def available_memory(device: str | torch.device = "cpu") -> tuple[int, str]:
    """(bytes, a description) that the device can still give: a GPU's free memory, or the machine's
    available RAM (MemAvailable, else total physical memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{free / GiB:.1f} GiB free of {total / GiB:.1f} GiB on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], f"{info['MemAvailable'] / GiB:.1f} GiB available of {info['MemTotal'] / GiB:.1f} GiB RAM"
    except (OSError, KeyError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, f"{total / GiB:.1f} GiB RAM"


def check_fits(estimate: MemoryEstimate, device, lower: str, processes: int = 1) -> None:
    """Raise MemoryCheckError (one sentence: the estimate, what the device has, what to lower) if
    ``processes`` copies of ``estimate`` exceed the memory available on ``device``."""
    have, described = available_memory(device)
    need = estimate.total * processes
    if need > have:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in estimate._asdict().items() if v)
        each = f" x {processes} processes" if processes > 1 else ""
        raise MemoryCheckError(f"this run needs at least {need / GiB:.1f} GiB ({parts} GiB{each}) but the machine has "
                               f"{described}: {lower}")
