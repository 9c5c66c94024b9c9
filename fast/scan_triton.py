"""The selective scan in Triton: the forward kernel, its launcher, and the autograd Function.

Read ``reference/selective_scan.py`` first (the math as a loop over time), then this file (the
forward), then ``fast/scan_triton_bwd.py`` (the backward). Math: docs/paper-facts.md#selective-scan.

Glossary (code name = meaning, shape; the reference's names where they exist):

    u, delta, z    x_t, Δ_t before bias/softplus, the gate         (b, d, l)   fp32/bf16/fp16 in HBM
    A              state matrix, negative                         (d, n)      fp32
    B, C           input / output matrices per position           (b, n, l)
    D, delta_bias  skip weight, bias added to Δ                   (d,)        fp32
    h              the state carried from chunk to chunk          (BLOCK_D, BLOCK_N) fp32, registers
    dA, dBu        exp(Δ A) and Δ B u for one chunk               (BLOCK_D, BLOCK_N, BLOCK_L) registers only
    h_starts       the state before every chunk, for the backward (b, nchunks, d, n) fp32
    BLOCK_D        channels per program; BLOCK_N >= n, the whole state; BLOCK_L positions per chunk

Parallelism: one program per (batch row, block of BLOCK_D channels): channels never interact, so
this grid needs no communication. Inside a program the sequence is walked chunk by chunk, the
state h carried in registers from one chunk to the next.

Inside a chunk, the recurrence h_t = dA_t h_{t-1} + dBu_t is a composition of affine maps
h -> a h + b, and composing two of them is associative:

    (a1, b1) then (a2, b2)  =  (a1 a2,  a2 b1 + b2)            (_combine, fast/scan_triton_chunk.py)

so ``tl.associative_scan`` over the chunk's (dA, dBu) pairs gives, for every position t in the
chunk, the map from the chunk's start state to h_t: h_t = a_cum_t h_start + b_cum_t. Why this and
not a plain loop over t: the loop runs BLOCK_L dependent steps on a (BLOCK_D, BLOCK_N) tile, while
the scan does the chunk in log2(BLOCK_L) parallel steps over the whole (BLOCK_D, BLOCK_N, BLOCK_L)
tile, and the loads of u, Δ, B, C, z and the store of the output become (.., BLOCK_L) vector
accesses instead of one column at a time (a design argument: no GPU was available to measure
it; the tile sizes below are untuned). Why chunks at all: a_cum is a product of decays that
underflows over long spans; within a chunk it only ever multiplies h_start (no division by it),
so nothing can overflow at any length. Only h_starts (one state per chunk) reaches HBM; dA, dBu
and the states at every position never do. The backward recomputes them from h_starts.

Padding: positions past the end of the sequence get Δ = 0, so dA = 1 and dBu = 0: the state
passes through them unchanged and the chunk's last column is the sequence's last state.
"""

import torch
import triton
import triton.language as tl

from .scan_triton_bwd import BLOCK_D_BWD, scan_backward
from .scan_triton_chunk import NUM_WARPS, _channel_block, _chunk_states, _load_chunk, _load_params, block_sizes


# --8<-- [start:scan_fwd_kernel]
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,  # inputs
    out_ptr, last_ptr, h_starts_ptr,  # outputs: (b, d, l) u.dtype, (b, d, n) fp32, (b, nchunks, d, n) fp32
    Dm, L, N, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d, mask_d, offs_n, dn, mask_dn = _channel_block(Dm, N, BLOCK_D, BLOCK_N)  # (BLOCK_D,), (BLOCK_D, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    A, Dv, bias = _load_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, dn, mask_dn, HAS_D, HAS_BIAS, BLOCK_D)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # h_{-1}
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * Dm * N + dn, mask=mask_dn, other=0.0)

    for c in range(0, n_chunks):
        # Save the state entering this chunk: all the backward needs to rebuild the chunk.
        tl.store(h_starts_ptr + (pid_b * n_chunks + c) * Dm * N + dn, h, mask=mask_dn)
        t = c * BLOCK_L + offs_l  # (BLOCK_L,) positions of this chunk
        u, dt_raw, dt, Bt, Ct, dl, mask_dl, nl, mask_nl = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, pid_b, offs_d, offs_n, t, Dm, L, N, HAS_BIAS, SOFTPLUS)
        hs, dA, dBu = _chunk_states(A, h, u, dt, Bt)  # (BLOCK_D, BLOCK_N, BLOCK_L)
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # y_t = Σ_n h_t C_t: (BLOCK_D, BLOCK_L)
        h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)  # last column
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zt = tl.load(z_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)
            y *= zt * tl.sigmoid(zt)  # silu(z)
        tl.store(out_ptr + dl, y.to(out_ptr.dtype.element_ty), mask=mask_dl)

    tl.store(last_ptr + pid_b * Dm * N + dn, h, mask=mask_dn)
# --8<-- [end:scan_fwd_kernel]


def _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Contiguous kernel operands: u, delta, B, C, z in u's dtype; A, D, bias, h0 fp32."""
    io = u.dtype if u.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    seq = [None if t is None else t.to(io).contiguous() for t in (u, delta, B, C, z)]
    par = [None if t is None else t.to(torch.float32).contiguous() for t in (A, D, delta_bias, initial_state)]
    return seq, par


class _ScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, block_l, block_d):
        (u_, dl_, B_, C_, z_), (A_, D_, bias_, h0_) = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
        b, d, L = u.shape
        n = A.shape[1]
        BD, BN, BL = block_sizes(d, n, block_l, block_d)
        n_chunks = triton.cdiv(L, BL)
        out = torch.empty(b, d, L, dtype=u.dtype, device=u.device)
        last = torch.empty(b, d, n, dtype=torch.float32, device=u.device)
        h_starts = torch.empty(b, n_chunks, d, n, dtype=torch.float32, device=u.device)
        _scan_fwd_kernel[(b, triton.cdiv(d, BD))](
            u_, dl_, A_, B_, C_, D_ if D_ is not None else A_, z_ if z_ is not None else u_,
            bias_ if bias_ is not None else A_, h0_ if h0_ is not None else A_,
            out, last, h_starts, d, L, n, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=BD, BLOCK_N=BN, BLOCK_L=BL, num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(u_, dl_, A_, B_, C_, D_, z_, bias_, h_starts)
        ctx.set_materialize_grads(False)  # an unused last state arrives as None: the kernel skips it
        ctx.delta_softplus, ctx.block_l, ctx.block_d = bool(delta_softplus), BL, block_d
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        return out, last

    @staticmethod
    def backward(ctx, g_out, g_last):
        if g_out is None:
            g_out = torch.zeros_like(ctx.saved_tensors[0])
        grads = scan_backward(*ctx.saved_tensors, g_out, g_last, ctx.delta_softplus, ctx.block_l, ctx.block_d)
        grads = [None if g is None or dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None)


def largest_operand(b, d, L, n):
    """Elements of the largest tensor the forward or backward kernel indexes: u-shaped (b, d, L),
    h_starts (b, chunks, d, n), the gB/gC partials (d blocks, b, n, L). The kernels' offsets are
    32-bit, so fast/selective_scan.py sends the scan here only while this is below 2**31."""
    chunks = triton.cdiv(L, block_sizes(d, n)[2])
    d_blocks = triton.cdiv(d, block_sizes(d, n, None, BLOCK_D_BWD)[0])
    return max(b * d * L, b * chunks * d * n, d_blocks * b * n * L)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                          delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                          initial_state: torch.Tensor | None = None, block_l: int | None = None,
                          block_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.selective_scan in Triton (arguments unchecked): -> (out (b, d, l) u.dtype, last (b, d, n) fp32).

    Differentiable in every tensor argument. ``block_l`` / ``block_d`` override the chunk length and
    the channel block (the tests use tiny ones under TRITON_INTERPRET=1).
    """
    return _ScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, block_l, block_d)
