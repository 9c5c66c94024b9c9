"""MoE experts in Triton: the autograd Function tying routing.py, moe_triton_fwd.py and moe_triton_bwd.py.

Glossary: see moe_triton_fwd.py (forward kernels) and moe_triton_bwd.py (backward kernels).

    forward:   group_by_expert -> up kernel (gather x, GEMM w1, act) -> down kernel (GEMM w2, gate,
               scatter-add)                                   2 launches after the sort
    backward:  down_bwd kernel (gather dout, GEMM w2, dgates, act') -> down kernel for dx (GEMM w1)
               -> wgrad kernel for dw1 -> wgrad kernel for dw2      4 launches

Nothing here reads a device value on the host: grids are sized by N = T * k (all slots, dropped
ones included; programs whose rows are all dropped do no work), so a layer runs without a sync.
Saved for the backward: h (N, F1) and a (N, f) in x.dtype, and the routing arrays — no permuted
copy of x or of dout is ever made. fp32 and bf16/fp16 only (the tests run it in the interpreter).
"""

import torch

from minimamba_moe.reference.checks import ACTIVATIONS

from .moe_triton_bwd import launch_down_bwd, launch_wgrad
from .moe_triton_fwd import launch_down, launch_up
from .routing import group_by_expert


# --8<-- [start:MoEExpertsTriton]
class MoEExpertsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_idx, gates, w1, w2, activation):
        T, d = x.shape
        k = expert_idx.shape[1]
        E, _, f = w2.shape
        act = ACTIVATIONS.index(activation)  # 0 swiglu, 1 geglu, 2 relu
        r = group_by_expert(expert_idx, E)
        x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
        ctx.gates_dtype = gates.dtype
        gates = gates.reshape(T * k).to(x.dtype).contiguous()  # (N,) indexed by slot
        N = T * k
        h = torch.empty(N, w1.shape[1], dtype=x.dtype, device=x.device)  # (N, F1)
        a = torch.empty(N, f, dtype=x.dtype, device=x.device)  # (N, f)
        out = torch.zeros(T, d, dtype=torch.float32, device=x.device)  # (T, d) fp32 scatter-add target
        if N:
            launch_up(x, w1, h, a, r.order, r.sorted_expert, k, act)
            # y = a @ w2[e].T: B_e[j, n] = w2[e, n, j]
            launch_down(a, w2, (w2.stride(0), w2.stride(2), w2.stride(1)), out, gates, r.order, r.sorted_expert,
                        k, has_gate=True)
        ctx.save_for_backward(x, w1, w2, gates, r.order, r.sorted_expert, r.offsets, h, a)
        ctx.k, ctx.act = k, act
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, gates, order, sorted_expert, offsets, h, a = ctx.saved_tensors
        T, d = x.shape
        k = ctx.k
        dout = dout.to(x.dtype).contiguous()
        dh = torch.empty_like(h)  # (N, F1)
        dgates = torch.zeros(T * k, dtype=torch.float32, device=x.device)  # (N,) by slot
        dx = torch.zeros(T, d, dtype=torch.float32, device=x.device)
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        if T * k:
            launch_down_bwd(dout, w2, h, a, gates, dh, dgates, order, sorted_expert, k, ctx.act)
            # dx[token] += dh @ w1[e]: B_e[i, n] = w1[e, i, n]
            launch_down(dh, w1, (w1.stride(0), w1.stride(1), w1.stride(2)), dx, gates, order, sorted_expert, k,
                        has_gate=False)
            launch_wgrad(dh, x, dw1, gates, order, offsets, k, a_gathered=False, b_gathered=True, a_gated=False)
            launch_wgrad(dout, a, dw2, gates, order, offsets, k, a_gathered=True, b_gathered=False, a_gated=True)
        else:
            dw1.zero_()
            dw2.zero_()
        return dx.to(x.dtype), None, dgates.view(T, k).to(ctx.gates_dtype), dw1, dw2, None
# --8<-- [end:MoEExpertsTriton]


def largest_operand(T, k, d, F1, f, E):
    """Elements of the largest tensor the kernels index: x (T, d), h (T k, F1), a (T k, f), w1
    (E, F1, d), w2 (E, d, f). The kernels' offsets are 32-bit, so fast/moe.py sends the experts
    here only while this is below 2**31."""
    return max(T * d, T * k * F1, T * k * f, E * F1 * d, E * d * f)


def moe_experts_triton(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor,
                       w2: torch.Tensor, activation: str = "swiglu") -> torch.Tensor:
    """moe_experts through the Triton kernels (any device the kernels run on; arguments not re-checked)."""
    return MoEExpertsTriton.apply(x, expert_idx, gates, w1, w2, activation)
