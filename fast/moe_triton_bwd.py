"""MoE experts in Triton, backward: the gradients of x, gates, w1 and w2 (see moe_triton_fwd.py first).

Glossary (as in moe_triton_fwd.py, plus):

    dout     gradient of out, token order                                    (T, d)
    g        gate of a sorted row, gates[slot]
    da_raw   dout[token] @ w2[e], before the gate                             (N, f)  never stored
    dgates   Σ_j da_raw * a = <dout[token], y>, per slot (y = a @ w2[e].T)      (T * k,) fp32
    dh       act'(h) · (g * da_raw): gate half and up half                     (N, F1)
    dx       Σ_slots dh @ w1[e], token order, fp32 atomics                      (T, d)
    dw1[e]   Σ_{rows of e} dh[r]ᵀ x[token_r]                                    (E, F1, d)
    dw2[e]   Σ_{rows of e} (g dout[token_r])ᵀ a[r]                              (E, d, f)

How the data flows (moe_triton.py launches these in this order):
    1. _expert_down_bwd_kernel, grid (row blocks, f blocks): gathers dout rows by token inside the
       GEMM with w2[e] (like the forward's first GEMM), and its epilogue does the rest per element:
       the gate's gradient (a partial sum over this program's f block, atomically added per slot),
       the gate product, and the activation's derivative, writing dh once.
    2. dx: the forward's _expert_down_kernel on dh with B_e = w1[e] and no gate.
    3. _expert_wgrad_kernel, grid (E, p blocks, q blocks): for expert e, walks its sorted rows
       offsets[e] : offsets[e+1] (read on the device) and accumulates Aᵀ @ B; A and B rows are
       either sorted rows or gathered token rows (optionally times the gate). Run for dw1 and dw2.
       An expert without rows stores zeros.
"""

import triton
import triton.language as tl

from .moe_triton_fwd import BLOCK_K, BLOCK_N, NUM_WARPS, _block_rows, _grouped_dot, launch_row_blocks


# --8<-- [start:expert_down_bwd_kernel]
@triton.jit
def _expert_down_bwd_kernel(
    dout_ptr, w2_ptr, h_ptr, a_ptr, gates_ptr, dh_ptr, dgates_ptr, order_ptr, sorted_expert_ptr,
    N, d, f, k, E, act,
    stride_ot, stride_od, stride_we, stride_wd, stride_wf,  # dout (T, d), w2 (E, d, f)
    stride_hm, stride_am,  # h, dh (N, F1), a (N, f), unit column strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, kept, expert, slot, token, e_first, e_last = _block_rows(order_ptr, sorted_expert_ptr, N, k, E, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) hidden units j < f
    col_ok = cols < f
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # da_raw = dout[token] @ w2[e]: B[kk, j] = w2[e, kk, j]
    acc = _grouped_dot(acc, dout_ptr, token, stride_ot, stride_od, expert, e_first, e_last,
                       w2_ptr, stride_we, stride_wd, stride_wf, cols, col_ok, d, BLOCK_K)

    mask = kept[:, None] & col_ok[None, :]
    dtype = h_ptr.dtype.element_ty
    a = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(dgates_ptr + slot, tl.sum(acc * a, axis=1), mask=kept)  # this f block's part of <dy, y>
    g = tl.load(gates_ptr + slot, mask=kept, other=0.0).to(tl.float32)
    da = (acc * g[:, None]).to(dtype).to(tl.float32)  # (BM, BN) dL/da, rounded like the reference's
    gate = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if act == 2:
        tl.store(dh_ptr + rows[:, None] * stride_hm + cols[None, :], tl.where(gate > 0, da, 0.0).to(dtype),
                 mask=mask)
    else:
        up = tl.load(h_ptr + rows[:, None] * stride_hm + (f + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
        if act == 0:
            s = tl.sigmoid(gate)
            fn, dfn = gate * s, s * (1.0 + gate * (1.0 - s))  # silu, silu'
        else:
            cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
            fn, dfn = gate * cdf, cdf + gate * tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # gelu, gelu'
        tl.store(dh_ptr + rows[:, None] * stride_hm + cols[None, :], (da * up * dfn).to(dtype), mask=mask)
        tl.store(dh_ptr + rows[:, None] * stride_hm + (f + cols)[None, :], (da * fn).to(dtype), mask=mask)
# --8<-- [end:expert_down_bwd_kernel]


# --8<-- [start:expert_wgrad_kernel]
@triton.jit
def _expert_wgrad_kernel(
    a_ptr, b_ptr, dw_ptr, gates_ptr, order_ptr, offsets_ptr,
    P, Q, k, a_gathered, b_gathered, a_gated,  # flags 0 / 1: rows by token (else sorted), A times gate
    stride_am, stride_ap, stride_bm, stride_bq, stride_we, stride_wp, stride_wq,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    e = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BP,) rows of dw[e]
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,) columns of dw[e]
    p_ok, q_ok = ps < P, qs < Q
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):  # this expert's sorted rows, BLOCK_R at a time
        rs = r0 + tl.arange(0, BLOCK_R)  # (BR,)
        r_ok = rs < end
        slot = tl.load(order_ptr + rs, mask=r_ok, other=0)
        a_rows = tl.where(a_gathered != 0, slot // k, rs)
        b_rows = tl.where(b_gathered != 0, slot // k, rs)
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ps[:, None] * stride_ap,
                      mask=p_ok[:, None] & r_ok[None, :], other=0.0)  # (BP, BR) = Aᵀ block
        if a_gated != 0:  # (g * dout) rounded to the input dtype, as the reference's autograd does
            g = tl.load(gates_ptr + slot, mask=r_ok, other=0.0).to(tl.float32)
            a_t = (a_t.to(tl.float32) * g[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=r_ok[:, None] & q_ok[None, :], other=0.0)  # (BR, BQ)
        acc = tl.dot(a_t, b, acc, input_precision="ieee")
    tl.store(dw_ptr + e * stride_we + ps[:, None] * stride_wp + qs[None, :] * stride_wq,
             acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
# --8<-- [end:expert_wgrad_kernel]


BLOCK_P, BLOCK_Q, BLOCK_R = 64, 64, 32


def launch_down_bwd(dout, w2, h, a, gates, dh, dgates, order, sorted_expert, k, act):
    """dh (N, F1) and dgates (T*k,) += from dout (T, d); see _expert_down_bwd_kernel."""
    N, f = a.shape
    E, d, _ = w2.shape
    launch_row_blocks(_expert_down_bwd_kernel, N, f, dout, w2, h, a, gates, dh, dgates, order, sorted_expert,
                      N, d, f, k, E, act, dout.stride(0), dout.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
                      h.stride(0), a.stride(0))


def launch_wgrad(a, b, dw, gates, order, offsets, k, a_gathered, b_gathered, a_gated):
    """dw[e] = Σ_{rows r of e} A[r]ᵀ B[r]: dw (E, P, Q), A rows (., P), B rows (., Q)."""
    E, P, Q = dw.shape
    grid = (E, triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q))
    _expert_wgrad_kernel[grid](a, b, dw, gates, order, offsets, P, Q, k, int(a_gathered), int(b_gathered),
                               int(a_gated), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               dw.stride(0), dw.stride(1), dw.stride(2),
                               BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS)


def aot_specs():
    specs = []
    for dt in ("fp32", "bf16"):
        for BM in (16, 64):
            consts = {"BLOCK_M": BM, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
            sig = {"dout_ptr": f"*{dt}", "w2_ptr": f"*{dt}", "h_ptr": f"*{dt}", "a_ptr": f"*{dt}",
                   "gates_ptr": f"*{dt}", "dh_ptr": f"*{dt}", "dgates_ptr": "*fp32", "order_ptr": "*i64",
                   "sorted_expert_ptr": "*i64", "N": "i32", "d": "i32", "f": "i32", "k": "i32", "E": "i32",
                   "act": "i32", "stride_ot": "i32", "stride_od": "i32", "stride_we": "i32", "stride_wd": "i32",
                   "stride_wf": "i32", "stride_hm": "i32", "stride_am": "i32"}
            specs.append((_expert_down_bwd_kernel, {**sig, **{c: "constexpr" for c in consts}}, consts))
        consts = {"BLOCK_P": BLOCK_P, "BLOCK_Q": BLOCK_Q, "BLOCK_R": BLOCK_R}
        sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "dw_ptr": f"*{dt}", "gates_ptr": f"*{dt}", "order_ptr": "*i64",
               "offsets_ptr": "*i64", "P": "i32", "Q": "i32", "k": "i32", "a_gathered": "i32",
               "b_gathered": "i32", "a_gated": "i32", "stride_am": "i32", "stride_ap": "i32", "stride_bm": "i32",
               "stride_bq": "i32", "stride_we": "i32", "stride_wp": "i32", "stride_wq": "i32"}
        specs.append((_expert_wgrad_kernel, {**sig, **{c: "constexpr" for c in consts}}, consts))
    return specs


AOT_SPECS = aot_specs()
