"""Fused Sinkhorn in Triton: every pass, and the stopping rule, in one launch of one program.

Glossary (code name = meaning, shape; the math is reference/sinkhorn.py's):

    c        exp(logit_scale * logits), recomputed from the logits on every read  (T, E)  fp32
    d0, d1   row scaling (T,) kept in global memory (the d0 output), column scaling (E,) in registers
    BLOCK_T  token rows one step of a sweep loads; BLOCK_E >= E, all experts in one tile
    n        passes done, err the stopping rule's error, both device scalars

Why one program: a pass is two reductions in opposite directions — d0_t needs a row of c (easy,
per token), d1_e needs the whole column (a sum over every token). With one program the column
sums are a running register accumulator, and the loop `while n < max_iters and err >= tol` runs on
the device: no launch per pass, no host sync per pass (the reference does both). A (4096, 64) fp32
matrix is 1 MiB, so every sweep over it is served from L2. Router batches are small enough for
this; a multi-program version would need a grid-wide barrier per pass.

Data flow of one pass (the kernel below):
    sweep 1, per block of rows: r = c_blk @ d1 -> d0_blk = (1/T) / (r + eps) -> store d0_blk,
             colsum += d0_blkᵀ @ c_blk
    then     d1 = (1/E) / (colsum + eps)
    rule     absolute: err = mean|d1 - d1_old|;  marginal: sweep 2, err = max_t |T d0_t (c @ d1)_t - 1|
After the loop one more sweep writes P = d0[:, None] * c * d1[None, :] and the pass count.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _load_c(logits_ptr, rows, cols, T, E, stride_t, stride_e, logit_scale):
    """c for a (BLOCK_T, BLOCK_E) tile; 0 outside the matrix, so padding adds nothing to any sum."""
    mask = (rows[:, None] < T) & (cols[None, :] < E)
    z = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :] * stride_e, mask=mask, other=0.0)
    return tl.where(mask, tl.exp(logit_scale * z.to(tl.float32)), 0.0)


@triton.jit
def _sinkhorn_kernel(
    logits_ptr, P_ptr, d0_ptr, n_iters_ptr,  # (T, E) any float, (T, E) fp32, (T,) fp32, (1,) int64
    T, E, stride_t, stride_e,
    logit_scale, tol, eps,
    max_iters, init_uniform, marginal,  # int flags: 0 / 1
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_E)  # (BLOCK_E,)
    col_ok = cols < E
    inv_T = 1.0 / T.to(tl.float32)
    inv_E = 1.0 / E.to(tl.float32)

    # d1 at the start: 1 (uniform), or 1 / (E * colsum(c)) (blackmamba), one sweep
    colsum = tl.zeros([BLOCK_E], dtype=tl.float32)
    if init_uniform == 0:
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            colsum += tl.sum(_load_c(logits_ptr, rows, cols, T, E, stride_t, stride_e, logit_scale), axis=0)
    d1 = tl.where(col_ok, 1.0, 0.0)
    if init_uniform == 0:
        d1 = tl.where(col_ok, 1.0 / (E * tl.where(col_ok, colsum, 1.0)), 0.0)  # no 1/0 in the padding

    n = tl.full((), 0, tl.int32)
    err = tl.full((), float("inf"), tl.float32)
    while (n < max_iters) & (err >= tol):
        d1_old = d1
        colsum = tl.zeros([BLOCK_E], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):  # sweep 1: rows, then the running column sums
            rows = t0 + tl.arange(0, BLOCK_T)
            c = _load_c(logits_ptr, rows, cols, T, E, stride_t, stride_e, logit_scale)  # (BLOCK_T, BLOCK_E)
            d0 = inv_T / (tl.sum(c * d1[None, :], axis=1) + eps)  # (BLOCK_T,)
            d0 = tl.where(rows < T, d0, 0.0)
            tl.store(d0_ptr + rows, d0, mask=rows < T)
            colsum += tl.sum(c * d0[:, None], axis=0)
        d1 = tl.where(col_ok, inv_E / (colsum + eps), 0.0)  # (BLOCK_E,)
        if marginal != 0:
            tl.debug_barrier()  # d0 was stored by other threads of this program
            err = 0.0
            for t0 in range(0, T, BLOCK_T):  # sweep 2: row marginals under the new d1
                rows = t0 + tl.arange(0, BLOCK_T)
                c = _load_c(logits_ptr, rows, cols, T, E, stride_t, stride_e, logit_scale)
                d0 = tl.load(d0_ptr + rows, mask=rows < T, other=0.0)
                row_err = tl.abs(T * d0 * tl.sum(c * d1[None, :], axis=1) - 1.0)
                err = tl.maximum(err, tl.max(tl.where(rows < T, row_err, 0.0), axis=0))
        else:
            err = tl.sum(tl.abs(d1 - d1_old), axis=0) * inv_E
        n += 1
        tl.debug_barrier()  # the next sweep overwrites d0

    for t0 in range(0, T, BLOCK_T):  # P = d0[:, None] * c * d1[None, :]
        rows = t0 + tl.arange(0, BLOCK_T)
        c = _load_c(logits_ptr, rows, cols, T, E, stride_t, stride_e, logit_scale)
        d0 = tl.load(d0_ptr + rows, mask=rows < T, other=0.0)
        mask = (rows[:, None] < T) & col_ok[None, :]
        tl.store(P_ptr + rows[:, None] * E + cols[None, :], d0[:, None] * c * d1[None, :], mask=mask)
    tl.store(n_iters_ptr, n.to(tl.int64))


def block_sizes(E):
    """BLOCK_E: all experts in one tile (>= 16); BLOCK_T: rows per step, a 2048-element tile."""
    BLOCK_E = max(16, triton.next_power_of_2(E))
    return 2048 // BLOCK_E, BLOCK_E


def sinkhorn_triton(logits: torch.Tensor, init: str = "blackmamba", stopping: str = "absolute", tol: float = 1e-4,
                    max_iters: int = 100, eps: float = 1e-8,
                    logit_scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.sinkhorn in one launch (fp32). logits (T, E), E <= 64 -> (P (T, E) fp32, n_iters ())."""
    T, E = logits.shape
    if E > 64:
        raise ValueError(f"sinkhorn_triton keeps all experts in one tile: E <= 64, got {E}")
    P = torch.empty(T, E, dtype=torch.float32, device=logits.device)
    d0 = torch.ones(T, dtype=torch.float32, device=logits.device)
    n_iters = torch.zeros(1, dtype=torch.int64, device=logits.device)
    BLOCK_T, BLOCK_E = block_sizes(E)
    _sinkhorn_kernel[(1,)](
        logits, P, d0, n_iters, T, E, logits.stride(0), logits.stride(1),
        float(logit_scale), float(tol), float(eps),
        max_iters, int(init == "uniform"), int(stopping == "marginal"),
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=4,
    )
    return P, n_iters[0]
