"""One decode step of the selective scan in Triton: the state updated in place, y out.

The math of ``reference.selective_state_update`` (one position of docs/paper-facts.md#selective-scan), read that first:

    Δ = softplus(dt + dt_bias)          (b, d)
    h = exp(Δ A) * h + Δ x B            (b, d, n)   written back into ``state``
    out = (Σ_n h C + D x) * silu(z)     (b, d)

Glossary: state (b, d, n) fp32, updated in place; x, dt, z (b, d); B, C (b, n); A (d, n);
D, dt_bias (d,). One program per (batch row, block of BLOCK_D channels): it reads its
(BLOCK_D, BLOCK_N) tile of the state once and writes it once. A decode step is pure memory
traffic (the state dominates: b d n fp32), so the only goal is to touch every byte once.
"""

import torch
import triton
import triton.language as tl

from .scan_triton_chunk import _channel_block, _softplus

BLOCK_D_STEP = 32
NUM_WARPS = 4


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    Dm, N,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d, mask_d, offs_n, dn, mask_dn = _channel_block(Dm, N, BLOCK_D, BLOCK_N)  # (BLOCK_D,), (BLOCK_D, BLOCK_N)
    mask_n = offs_n < N
    bd = pid_b * Dm + offs_d  # offsets in (b, d)

    h = tl.load(state_ptr + pid_b * Dm * N + dn, mask=mask_dn, other=0.0)  # (BLOCK_D, BLOCK_N) fp32
    x = tl.load(x_ptr + bd, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dt = tl.load(dt_ptr + bd, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)  # (BLOCK_D, BLOCK_N)
    Bv = tl.load(B_ptr + pid_b * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
    Cv = tl.load(C_ptr + pid_b * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)

    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]  # h_t = dA h_{t-1} + Δ x B
    tl.store(state_ptr + pid_b * Dm * N + dn, h, mask=mask_dn)

    y = tl.sum(h * Cv[None, :], axis=1)  # (BLOCK_D,)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) * x
    if HAS_Z:
        z = tl.load(z_ptr + bd, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + bd, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def block_sizes(d, n):
    return min(BLOCK_D_STEP, triton.next_power_of_2(d)), max(2, triton.next_power_of_2(n))


def selective_state_update_triton(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                  B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                                  z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                                  dt_softplus: bool = False) -> torch.Tensor:
    """reference.selective_state_update in Triton (arguments unchecked; state fp32): -> out (b, d) in x.dtype."""
    b, d, n = state.shape
    io = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    x_, dt_, B_, C_ = (t.to(io).contiguous() for t in (x, dt, B, C))
    z_ = None if z is None else z.to(io).contiguous()
    A_, D_, bias_ = (None if t is None else t.to(torch.float32).contiguous() for t in (A, D, dt_bias))
    work = state if state.is_contiguous() else state.contiguous()
    out = torch.empty(b, d, dtype=x.dtype, device=x.device)
    BD, BN = block_sizes(d, n)
    _state_update_kernel[(b, triton.cdiv(d, BD))](
        work, x_, dt_, A_, B_, C_, D_ if D_ is not None else A_, z_ if z_ is not None else x_,
        bias_ if bias_ is not None else A_, out, d, n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=BD, BLOCK_N=BN, num_warps=NUM_WARPS,
    )
    if work is not state:
        state.copy_(work)
    return out
