"""Mixture-of-Experts feed-forward, fast: grouped matmuls over expert-sorted token-slots.

Same signature and docstring as ``reference.moe.moe_experts`` (diff them). Where the work happens:

    CUDA tensors -> moe_triton.py   Triton grouped GEMMs, ScatterMoE-style: gather rows inside the
                                    first GEMM, fused gated activation, gate * scatter-add in the
                                    second; hand-written backward kernels
    CPU tensors  -> moe_cpu.py      sort + torch grouped_mm (per-expert matmuls as fallback),
    (and float64, and CUDA          hand-written backward; without gradients, in blocks of rows
    problems too big for the
    kernels' 32-bit offsets)
    both         -> routing.py      expert histogram, offsets and permutation, on the device

Glossary (code name = meaning, shape): as in reference/moe.py —

    x           token activations                              (T, d)
    expert_idx  the expert of each (token, slot); -1 = dropped  (T, k)   int64
    gates       weight of each (token, slot)'s expert output    (T, k)
    w1          first layer of every expert, nn.Linear layout   (E, 2f, d) gated / (E, f, d) relu
    w2          second layer of every expert                    (E, d, f)
"""

import torch

from minimamba_moe.reference.checks import check_expert_range, check_moe_experts

from .moe_cpu import MoEExpertsCPU, moe_experts_no_grad

try:  # triton is a dependency on Linux only; elsewhere every tensor takes the PyTorch path
    from .moe_triton import largest_operand, moe_experts_triton
except ImportError:
    moe_experts_triton = None

OFFSET_LIMIT = 2**31  # the Triton kernels' offsets are 32-bit: larger problems take the PyTorch path


def moe_experts(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                activation: str = "swiglu") -> torch.Tensor:
    """Send every (token, slot) to its expert and sum the gated outputs per token.

    Args:
        x: (T, d) tokens.
        expert_idx: (T, k) int64 expert of each slot, in [0, E), or -1 for a dropped slot
            (contributes exactly zero, whatever its gate).
        gates: (T, k) weight multiplying each slot's expert output.
        w1: (E, 2f, d) for "swiglu"/"geglu", (E, f, d) for "relu"; nn.Linear layout.
        w2: (E, d, f).
        activation: "swiglu", "geglu" or "relu".

    Returns:
        out: (T, d) in x.dtype; out[t] = Σ_j gates[t, j] * expert_{expert_idx[t, j]}(x[t]).

    Raises:
        ValueError: on an unknown activation, a shape mismatch, a non-integer expert_idx or an
            index outside [-1, E). (The fast backend on CUDA tensors skips the index check, which
            would cost a host sync per call, and drops such slots instead.)
    """
    E = check_moe_experts(x, expert_idx, gates, w1, w2, activation)[3]
    if _on_gpu(x) and largest_operand(*expert_idx.shape, x.shape[1], w1.shape[1], w2.shape[2], E) < OFFSET_LIMIT:
        # The range check would read the indices back to the host (a sync per layer): on the GPU it
        # is skipped, and an index outside [0, E) is treated like -1 (dropped) by the kernels.
        return _triton_under_autocast(x, expert_idx, gates, w1, w2, activation)
    check_expert_range(expert_idx, E)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gates, w1, w2)):
        return MoEExpertsCPU.apply(x, expert_idx, gates, w1, w2, activation)
    return moe_experts_no_grad(x, expert_idx, gates, w1, w2, activation)


def _on_gpu(x):
    """True when x is a CUDA tensor the kernels take (not float64) and triton imported."""
    return x.is_cuda and x.dtype != torch.float64 and moe_experts_triton is not None


def _triton_under_autocast(x, expert_idx, gates, w1, w2, activation):
    """moe_experts_triton, its operands cast as autocast casts a matmul's when autocast is on for x's device.

    Under train.py's bf16 autocast the residual stream, hence x, and the expert weights are fp32;
    autocast cannot see inside the Triton kernels, so without this cast they would run fp32 dots
    (no tensor cores) while the reference's matmuls run in bf16. The casts are differentiable: fp32
    weights get fp32 gradients. The output comes back in x's dtype, as the reference's does.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        out = moe_experts_triton(x.to(low), expert_idx, gates, w1.to(low), w2.to(low), activation)
        return out.to(x.dtype)
    return moe_experts_triton(x, expert_idx, gates, w1, w2, activation)
