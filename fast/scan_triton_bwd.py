"""The selective scan's backward in Triton: reverse chunks, reverse time, every gradient.

Read ``fast/scan_triton.py`` (the forward) first; the CPU version of the same backward, with the
same names, is ``_ScanCPU.backward`` in ``fast/scan_cpu.py``.

Glossary (besides the forward's):

    gy      dLoss/dy_t where y = Σ_n h_t C_t (before the D skip and the gate)  (BLOCK_D, BLOCK_L)
    gh      dLoss/dh_t, every path: from y_t and from h_{t+1}                   (BLOCK_D, BLOCK_N, BLOCK_L)
    carry   gradient flowing into the chunk's last state from after it        (BLOCK_D, BLOCK_N)
            (from the next chunk; g_last, the last state's gradient, for the final chunk)
    *_part  partial sums one program cannot finish alone: gA over batch rows, gB and gC over
            channel blocks, gD over batch rows; the launcher adds them up (no atomics, so the
            result does not depend on scheduling).

The state gradient runs backwards in time:

    gh_t = gy_t C_t + dA_{t+1} gh_{t+1}

which is again a composition of affine maps g -> a g + x, with a_t = dA_{t+1} and x_t = gy_t C_t,
so ``tl.associative_scan(..., reverse=True)`` with the forward's ``_combine`` gives every gh_t of a
chunk from the carry. dA_{t+1} is Δ loaded one position to the right (set to 0, i.e. a = 1, at the
chunk's last column, where the carry enters instead). The chunk's own states h_t are recomputed
from the forward's h_starts exactly as the forward did. Then, per position:

    dLoss/dC_t[n]  = Σ_d gy_t h_t                      dLoss/dB_t[n] = Σ_d gh_t Δ_t u_t
    dLoss/du_t     = Δ_t Σ_n gh_t B_t + D gy_t        dLoss/dΔ_t    = u_t Σ_n gh_t B_t + Σ_n P_t A
    dLoss/dA       = Σ_{b,t} P_t Δ_t                  with P_t = gh_t dA_t h_{t-1} = gh_t (h_t - dBu_t)

(dA_t h_{t-1} = h_t - dBu_t avoids shifting the state tile by one column.) The carry into the
previous chunk is dA_{t0} gh_{t0}; after chunk 0 it is the initial state's gradient.
"""

import torch
import triton
import triton.language as tl

from .scan_triton_chunk import (BLOCK_L, NUM_WARPS, _channel_block, _chunk_states, _combine, _load_chunk,
                                _load_delta, _load_params, block_sizes)

BLOCK_D_BWD = 16  # more live (BLOCK_D, BLOCK_N, BLOCK_L) tiles than the forward. Not tuned on a GPU yet.


# --8<-- [start:scan_bwd_kernel]
@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h_starts_ptr, g_out_ptr, g_last_ptr,
    g_u_ptr, g_delta_ptr, g_z_ptr, g_h0_ptr,  # (b, d, l) x3, (b, d, n): fp32
    gA_part_ptr, gD_part_ptr, gB_part_ptr, gC_part_ptr,  # (b, d, n), (b, d), (nblocks_d, b, n, l) x2: fp32
    Dm, L, N, n_chunks, batch,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_d, mask_d, offs_n, dn, mask_dn = _channel_block(Dm, N, BLOCK_D, BLOCK_N)  # (BLOCK_D,), (BLOCK_D, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    A, Dv, bias = _load_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, dn, mask_dn, HAS_D, HAS_BIAS, BLOCK_D)
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_GLAST:
        carry = tl.load(g_last_ptr + pid_b * Dm * N + dn, mask=mask_dn, other=0.0)
    gA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    gD = tl.zeros([BLOCK_D], dtype=tl.float32)
    part = (tl.program_id(1) * batch + pid_b) * N * L  # this program's slice of the gB / gC partials

    for i in range(0, n_chunks):
        c = n_chunks - 1 - i  # chunks in reverse
        t = c * BLOCK_L + offs_l
        u, dt_raw, dt, Bt, Ct, dl, mask_dl, nl, mask_nl = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, pid_b, offs_d, offs_n, t, Dm, L, N, HAS_BIAS, SOFTPLUS)
        h_start = tl.load(h_starts_ptr + (pid_b * n_chunks + c) * Dm * N + dn, mask=mask_dn, other=0.0)
        hs, dA, dBu = _chunk_states(A, h_start, u, dt, Bt)  # recompute: (BLOCK_D, BLOCK_N, BLOCK_L)

        # The output side: out = (y + D u) * silu(z).
        g_out = tl.load(g_out_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_L)
        gy = g_out
        if HAS_Z:
            zt = tl.load(z_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            gy = g_out * zt * sig
            y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
            g_z = g_out * y * sig * (1.0 + zt * (1.0 - sig))  # silu'(z) = σ(z)(1 + z(1 - σ(z)))
            tl.store(g_z_ptr + dl, g_z, mask=mask_dl)
        if HAS_D:
            gD += tl.sum(gy * u, axis=1)
        tl.store(gC_part_ptr + part + nl - pid_b * N * L, tl.sum(hs * gy[:, None, :], axis=0), mask=mask_nl)

        # gh: reverse scan of g -> dA_{t+1} g + gy_t C_t, entered by the carry at the last column.
        mask_next = mask_d[:, None] & (t[None, :] + 1 < L) & (offs_l[None, :] < BLOCK_L - 1)
        _, dt_next = _load_delta(delta_ptr, dl + 1, mask_next, bias, HAS_BIAS, SOFTPLUS)  # Δ_{t+1}, 0 off the mask:
        # a = 1 where the carry enters, or past the end
        a = tl.exp(dt_next[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
        x = gy[:, None, :] * Ct[None, :, :]  # (BLOCK_D, BLOCK_N, BLOCK_L)
        a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_combine, reverse=True)
        gh = x_cum + a_cum * carry[:, :, None]  # (BLOCK_D, BLOCK_N, BLOCK_L)
        first = offs_l[None, None, :] == 0
        carry = tl.sum(tl.where(first, dA * gh, 0.0), axis=2)  # dA_{t0} gh_{t0}: into h_{t0-1}

        # h_t = dA_t h_{t-1} + Δ_t u_t B_t: the dBu path, then the dA path.
        GB = tl.sum(gh * Bt[None, :, :], axis=1)  # Σ_n gh_t B_t: (BLOCK_D, BLOCK_L)
        g_u = GB * dt + Dv[:, None] * gy
        tl.store(g_u_ptr + dl, g_u, mask=mask_dl)
        tl.store(gB_part_ptr + part + nl - pid_b * N * L, tl.sum(gh * (dt * u)[:, None, :], axis=0), mask=mask_nl)
        P = gh * (hs - dBu)  # gh_t dA_t h_{t-1}: (BLOCK_D, BLOCK_N, BLOCK_L)
        g_dt = GB * u + tl.sum(P * A[:, :, None], axis=1)  # dLoss/dΔ after softplus
        gA += tl.sum(P * dt[:, None, :], axis=2)
        if SOFTPLUS:
            g_dt = g_dt * tl.sigmoid(dt_raw)
        tl.store(g_delta_ptr + dl, g_dt, mask=mask_dl)

    tl.store(g_h0_ptr + pid_b * Dm * N + dn, carry, mask=mask_dn)
    tl.store(gA_part_ptr + pid_b * Dm * N + dn, gA, mask=mask_dn)
    tl.store(gD_part_ptr + pid_b * Dm + offs_d, gD, mask=mask_d)
# --8<-- [end:scan_bwd_kernel]


def scan_backward(u, delta, A, B, C, D, z, delta_bias, h_starts, g_out, g_last, delta_softplus, block_l, block_d):
    """Gradients (u, delta, A, B, C, D, z, delta_bias, initial_state), fp32, from the forward's saved operands."""
    b, d, L = u.shape
    n = A.shape[1]
    BD, BN, BL = block_sizes(d, n, block_l, block_d or BLOCK_D_BWD)
    n_chunks = h_starts.shape[1]
    nblocks = triton.cdiv(d, BD)
    f32 = dict(dtype=torch.float32, device=u.device)
    g_u, g_delta = torch.empty(b, d, L, **f32), torch.empty(b, d, L, **f32)
    g_z = torch.empty(b, d, L, **f32) if z is not None else None
    g_h0, gA_part = torch.empty(b, d, n, **f32), torch.empty(b, d, n, **f32)
    gD_part = torch.empty(b, d, **f32)
    gB_part, gC_part = torch.empty(nblocks, b, n, L, **f32), torch.empty(nblocks, b, n, L, **f32)
    g_out = g_out.contiguous()
    g_last = None if g_last is None else g_last.to(torch.float32).contiguous()
    _scan_bwd_kernel[(b, nblocks)](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, h_starts, g_out, g_last if g_last is not None else A,
        g_u, g_delta, g_z if g_z is not None else g_u, g_h0, gA_part, gD_part, gB_part, gC_part,
        d, L, n, n_chunks, b,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_GLAST=g_last is not None,
        SOFTPLUS=delta_softplus, BLOCK_D=BD, BLOCK_N=BN, BLOCK_L=BL, num_warps=NUM_WARPS,
    )
    g_bias = g_delta.sum((0, 2)) if delta_bias is not None else None
    g_D = gD_part.sum(0) if D is not None else None
    return g_u, g_delta, gA_part.sum(0), gB_part.sum(0), gC_part.sum(0), g_D, g_z, g_bias, g_h0


def _aot_specs():
    """What the launcher launches for the model: every optional input present, softplus, n = 16."""
    specs = []
    for io in ("fp32", "bf16"):
        sig = {name: f"*{io}" for name in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "g_out_ptr")}
        for name in _scan_bwd_kernel.arg_names:
            if name.endswith("_ptr") and name not in sig:
                sig[name] = "*fp32"
        sig.update({"Dm": "i32", "L": "i32", "N": "i32", "n_chunks": "i32", "batch": "i32"})
        for has_glast in (False, True):
            c = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_GLAST=has_glast, SOFTPLUS=True,
                     BLOCK_D=BLOCK_D_BWD, BLOCK_N=16, BLOCK_L=BLOCK_L)
            signature = {k: sig[k] for k in _scan_bwd_kernel.arg_names if k in sig}
            signature.update({k: "constexpr" for k in c})
            specs.append((_scan_bwd_kernel, signature, c))
    return specs


AOT_SPECS = _aot_specs()  # (kernel, signature, constexprs) for fast/aot.py
