"""MoE experts in Triton, forward: two grouped GEMMs over the expert-sorted token-slots (ScatterMoE-style).

Glossary (code name = meaning, shape; routing.py builds order / sorted_expert / offsets):

    N        token-slots T * k; sorted row r holds slot order[r] of token order[r] // k
    x        token activations, read in place through the gather (no permuted copy)   (T, d)
    w1, w2   expert weights, nn.Linear layout                 (E, F1, d), (E, d, f); F1 = 2f or f
    h        pre-activation, sorted rows                      (N, F1)  kept for the backward
    a        act(h): silu/gelu(gate half) * up half, or relu  (N, f)
    out      Σ_slots gate * a @ w2[e].T, fp32, token order     (T, d)
    ACT      0 swiglu, 1 geglu (exact erf gelu), 2 relu — a runtime flag, uniform over a program
    BLOCK_M  sorted rows per program: 16 when decoding (N small), 64 for training batches

How the data flows:
    1. _expert_up_kernel, grid (row blocks, f blocks): rows' tokens are gathered straight from x
       inside the K loop; the gate and up columns of one hidden block are two accumulators of the
       same program, so the activation is fused into the epilogue and h, a are written once.
       (Each accumulator's pass loads its x tiles itself: the second pass's loads hit L1/L2. One dot
       over a [gate | up] weight tile would load them once, at the cost of splitting the tile in registers.)
    2. _expert_down_kernel, grid (row blocks, output blocks): a @ w2[e].T, then the epilogue
       multiplies each row by its slot's gate and atomically adds it into out[token] (scatter-add;
       with k > 1 the k slots of a token meet there). The backward reuses it for dx (no gate).

A block of sorted rows can straddle experts (offsets are not multiples of BLOCK_M; no padding).
The program loops over the experts its rows belong to, e_first..e_last, and in each pass loads
only the rows of that expert (the others masked to 0): every row is multiplied by its own
expert's weights exactly once. _block_rows (which rows, which experts) and _grouped_dot (that
loop) serve every row-block kernel, here and in moe_triton_bwd.py; launch_row_blocks sizes their
grids. Sorted rows are contiguous per expert, so a block straddles
1 + (expert boundaries inside it) experts — usually one or two. Dropped slots (sorted_expert = E)
match no expert: they are never loaded, computed or added.

Precision: tl.dot accumulates in fp32; fp32 inputs use input_precision="ieee" (no TF32) so the
kernels agree with the reference to rounding; h, a are rounded to x.dtype like the reference.
"""

import triton
import triton.language as tl


# --8<-- [start:block_rows]
@triton.jit
def _block_rows(order_ptr, sorted_expert_ptr, N, k, E, BLOCK_M: tl.constexpr):
    """This program's sorted rows: (rows, row_ok, expert, slot, token, e_first, e_last)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < N
    expert = tl.load(sorted_expert_ptr + rows, mask=row_ok, other=E)  # (BM,) E = dropped
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0)  # (BM,)
    kept = expert < E
    e_first = tl.min(expert, axis=0)
    e_last = tl.max(tl.where(kept, expert, -1), axis=0)  # -1 if nothing kept: no expert pass
    return rows, row_ok & kept, expert, slot, slot // k, e_first, e_last
# --8<-- [end:block_rows]


# --8<-- [start:grouped_dot]
@triton.jit
def _grouped_dot(acc, a_ptr, a_rows, stride_am, stride_ak, expert, e_first, e_last,
                 w_ptr, stride_we, stride_wk, stride_wn, cols, col_ok, K, BLOCK_K: tl.constexpr):
    """acc (BM, BN) += A[a_rows[i], :K] @ W_e[:K, cols] for each row i, e = expert[i]: one pass per
    expert of the block, loading only that expert's rows (the others read as 0; dropped rows match
    no pass). W_e[kk, n] = w_ptr[e * stride_we + kk * stride_wk + n * stride_wn]."""
    for e in range(e_first, e_last + 1):  # the experts of this block's rows, usually one
        in_e = expert == e  # (BM,)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_ok = ks < K
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=in_e[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            b = tl.load(w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BK, BN)
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc
# --8<-- [end:grouped_dot]


# --8<-- [start:expert_up_kernel]
@triton.jit
def _expert_up_kernel(
    x_ptr, w1_ptr, h_ptr, a_ptr, order_ptr, sorted_expert_ptr,
    N, d, f, k, E, act,
    stride_xt, stride_xd, stride_we, stride_wr, stride_wd,  # x (T, d), w1 (E, F1, d)
    stride_hm, stride_am,  # h (N, F1), a (N, f), unit column strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, kept, expert, slot, token, e_first, e_last = _block_rows(order_ptr, sorted_expert_ptr, N, k, E, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) hidden units j < f
    col_ok = cols < f
    # x[token] @ w1[e, j, :].T: B[kk, j] = w1[e, j, kk], the gather happens in the A load
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # h[:, j]      (relu: the only half)
    acc_gate = _grouped_dot(acc_gate, x_ptr, token, stride_xt, stride_xd, expert, e_first, e_last,
                            w1_ptr, stride_we, stride_wd, stride_wr, cols, col_ok, d, BLOCK_K)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # h[:, f + j]  (gated only)
    if act != 2:
        acc_up = _grouped_dot(acc_up, x_ptr, token, stride_xt, stride_xd, expert, e_first, e_last,
                              w1_ptr + f * stride_wr, stride_we, stride_wd, stride_wr, cols, col_ok, d, BLOCK_K)

    # epilogue: round h to the activations' dtype (as the reference's x @ w1.T), apply act, store both
    dtype = h_ptr.dtype.element_ty
    mask = kept[:, None] & col_ok[None, :]
    gate = acc_gate.to(dtype).to(tl.float32)
    tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], gate.to(dtype), mask=mask)
    if act == 2:
        out = tl.maximum(gate, 0.0)
    else:
        up = acc_up.to(dtype).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * stride_hm + (f + cols)[None, :], up.to(dtype), mask=mask)
        if act == 0:
            out = gate * tl.sigmoid(gate) * up  # silu(gate) * up
        else:
            out = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up  # gelu(gate) * up
    tl.store(a_ptr + rows[:, None] * stride_am + cols[None, :], out.to(dtype), mask=mask)
# --8<-- [end:expert_up_kernel]


# --8<-- [start:expert_down_kernel]
@triton.jit
def _expert_down_kernel(
    a_ptr, w_ptr, out_ptr, gates_ptr, order_ptr, sorted_expert_ptr,
    N, K, n_out, k, E, has_gate,
    stride_am, stride_ak,  # A sorted rows (N, K)
    stride_we, stride_wk, stride_wn,  # B_e[kk, n] = w_ptr[e * stride_we + kk * stride_wk + n * stride_wn]
    stride_ot, stride_on,  # out (T, n_out) fp32, accumulated with atomics
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, kept, expert, slot, token, e_first, e_last = _block_rows(order_ptr, sorted_expert_ptr, N, k, E, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features
    col_ok = cols < n_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _grouped_dot(acc, a_ptr, rows, stride_am, stride_ak, expert, e_first, e_last,
                       w_ptr, stride_we, stride_wk, stride_wn, cols, col_ok, K, BLOCK_K)

    # epilogue: y rounded like the reference's a @ w2.T, times the slot's gate, scatter-added to its token
    y = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
    if has_gate != 0:
        y = y * tl.load(gates_ptr + slot, mask=kept, other=0.0).to(tl.float32)[:, None]
    tl.atomic_add(out_ptr + token[:, None] * stride_ot + cols[None, :] * stride_on, y,
                  mask=kept[:, None] & col_ok[None, :])
# --8<-- [end:expert_down_kernel]


BLOCK_N, BLOCK_K = 64, 32
NUM_WARPS = 4


def block_m(n_slots):
    """Rows per program: decode steps (a few slots) waste less on 16-row blocks than on 64."""
    return 16 if n_slots <= 64 else 64


def launch_row_blocks(kernel, N, n_cols, *args):
    """kernel[grid](*args) for a kernel over sorted rows: grid (blocks of BLOCK_M rows, blocks of BLOCK_N columns)."""
    BM = block_m(N)
    grid = (triton.cdiv(N, BM), triton.cdiv(n_cols, BLOCK_N))
    kernel[grid](*args, BLOCK_M=BM, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)


def launch_up(x, w1, h, a, order, sorted_expert, k, act):
    """h, a = x[token] @ w1[e].T, act(...)  (sorted rows)."""
    N, f = a.shape
    E, _, d = w1.shape
    launch_row_blocks(_expert_up_kernel, N, f, x, w1, h, a, order, sorted_expert, N, d, f, k, E, act,
                      x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0), a.stride(0))


def launch_down(a, w, w_strides, out, gates, order, sorted_expert, k, has_gate):
    """out[token] += gate * a @ B_e with B_e[kk, n] given by w_strides = (e, kk, n) strides of w."""
    N, K = a.shape
    E, n_out = w.shape[0], out.shape[1]
    launch_row_blocks(_expert_down_kernel, N, n_out, a, w, out, gates, order, sorted_expert, N, K, n_out, k, E,
                      int(has_gate), a.stride(0), a.stride(1), *w_strides, out.stride(0), out.stride(1))


def aot_specs():
    """What the launchers launch: both BLOCK_M, fp32 and bf16 activations/weights."""
    specs = []
    for dt in ("fp32", "bf16"):
        for BM in (16, 64):
            consts = {"BLOCK_M": BM, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
            up = {"x_ptr": f"*{dt}", "w1_ptr": f"*{dt}", "h_ptr": f"*{dt}", "a_ptr": f"*{dt}", "order_ptr": "*i64",
                  "sorted_expert_ptr": "*i64", "N": "i32", "d": "i32", "f": "i32", "k": "i32", "E": "i32",
                  "act": "i32", "stride_xt": "i32", "stride_xd": "i32", "stride_we": "i32", "stride_wr": "i32",
                  "stride_wd": "i32", "stride_hm": "i32", "stride_am": "i32"}
            down = {"a_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": "*fp32", "gates_ptr": f"*{dt}",
                    "order_ptr": "*i64", "sorted_expert_ptr": "*i64", "N": "i32", "K": "i32", "n_out": "i32",
                    "k": "i32", "E": "i32", "has_gate": "i32", "stride_am": "i32", "stride_ak": "i32",
                    "stride_we": "i32", "stride_wk": "i32", "stride_wn": "i32", "stride_ot": "i32",
                    "stride_on": "i32"}
            for kernel, sig in ((_expert_up_kernel, up), (_expert_down_kernel, down)):
                specs.append((kernel, {**sig, **{c: "constexpr" for c in consts}}, consts))
    return specs


AOT_SPECS = aot_specs()
