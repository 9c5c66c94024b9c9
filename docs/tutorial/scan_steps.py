# %%
"""The selective scan, the hard way: from a cumulative sum to the chunked Triton kernel and its backward.

The companion script of docs/selective-scan.md. Each step is one command; on a machine without a
GPU, Triton's interpreter runs the kernels on CPU tensors:

    TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py cumsum
    TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py recurrence
    TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py combine
    TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py tiled
    TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py chunked
    TRITON_INTERPRET=1 python docs/tutorial/scan_steps.py backward

Steps 1-3 are small kernels written for this tutorial (one program, one sequence); step 4
(tiled) is a tutorial-sized version of the real kernel (many programs, many channels, chunks,
masks, no extras); steps 5-6 (chunked, backward) run the project's own kernels
(fast/scan_triton.py, fast/scan_triton_bwd.py) against the reference
loop (reference/selective_scan.py). Every step prints what it compared and the largest error;
tests/test_docs.py runs each command and checks that the page shows its output.
"""

# %% [markdown]
# In a notebook: without a GPU, Triton's interpreter runs the kernels on the CPU. It is chosen when
# triton is imported, so it is set first.

# %% active="ipynb"
# import os
#
# import torch
#
# if not torch.cuda.is_available():
#     os.environ["TRITON_INTERPRET"] = "1"

# %%
import argparse
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("No CUDA device: run with TRITON_INTERPRET=1 so that Triton's interpreter runs the kernels on the CPU.")

import triton  # noqa: E402  (after the check: the interpreter is chosen when triton is imported)
import triton.language as tl  # noqa: E402

from minimamba_moe import reference  # noqa: E402
from minimamba_moe.fast.scan_triton import selective_scan_triton
from minimamba_moe.fast.scan_triton_chunk import _combine  # noqa: E402

# --8<-- [start:helpers]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # TRITON_INTERPRET=1 runs CPU tensors


def err(a, b):
    """The largest absolute difference, printed with one significant digit (the exact bits vary by machine)."""
    e = (a.double() - b.double()).abs().max().item()
    return "0" if e == 0 else f"{e:.0e}"
# --8<-- [end:helpers]


# %%
# --8<-- [start:cumsum]
@triton.jit
def _add(a, b):
    return a + b


# %%
@triton.jit
def cumsum_kernel(x_ptr, h_ptr, L: tl.constexpr):
    """h_t = h_{t-1} + x_t for one sequence of L positions (L a power of 2), one program."""
    t = tl.arange(0, L)  # (L,) every position at once
    x = tl.load(x_ptr + t)
    h = tl.associative_scan(x, 0, _add)  # log2(L) parallel steps, not L dependent ones
    tl.store(h_ptr + t, h)
# --8<-- [end:cumsum]


# %%
def step_cumsum():
    # --8<-- [start:cumsum-run]
    x = torch.arange(1.0, 9.0, device=DEVICE)  # 1, 2, ..., 8
    h = torch.empty_like(x)
    cumsum_kernel[(1,)](x, h, L=8)
    print("x               ", x.tolist())
    print("h (Triton)      ", h.tolist())
    print("torch.cumsum(x) ", torch.cumsum(x, 0).tolist())
    # --8<-- [end:cumsum-run]


# %%
# --8<-- [start:recurrence]
def recurrence_loop(a, b):
    """h_t = a_t h_{t-1} + b_t with h_{-1} = 0: the scan's recurrence for one scalar state. a, b: (L,)."""
    h, hs = torch.zeros((), dtype=b.dtype), []
    for t in range(len(b)):
        h = a[t] * h + b[t]
        hs.append(h)
    return torch.stack(hs)


# %%
def recurrence_by_cumsum(a, b):
    """The same h_t as two cumulative sums: h_t = π_t Σ_{s<=t} b_s / π_s, π_t = a_0 a_1 ... a_t."""
    log_p = torch.cumsum(torch.log(a), 0)  # log π_t
    return torch.exp(log_p) * torch.cumsum(b * torch.exp(-log_p), 0)
# --8<-- [end:recurrence]


# %%
def step_recurrence():
    # --8<-- [start:recurrence-run]
    g = torch.Generator().manual_seed(0)
    for L in (16, 1000):
        a = torch.full((L,), 0.9)  # a decay in (0, 1), as exp(Δ A) always is
        b = torch.rand(L, generator=g)
        loop, by_cumsum = recurrence_loop(a, b), recurrence_by_cumsum(a, b)
        print(f"l = {L:4d}: max |loop - cumsum form| = {err(loop, by_cumsum)}, "
              f"last h: loop {loop[-1].item():.4f}, cumsum form {by_cumsum[-1].item():.4f}")
    # --8<-- [end:recurrence-run]


# %%
# --8<-- [start:combine-kernel]
@triton.jit
def recurrence_kernel(a_ptr, b_ptr, h_ptr, L: tl.constexpr):
    """h_t = a_t h_{t-1} + b_t, h_{-1} = 0, for one sequence: a scan of (a, b) pairs with _combine."""
    t = tl.arange(0, L)
    a = tl.load(a_ptr + t)
    b = tl.load(b_ptr + t)
    a_cum, b_cum = tl.associative_scan((a, b), 0, combine_fn=_combine)  # the map h_{-1} -> h_t
    tl.store(h_ptr + t, b_cum)  # = a_cum * h_{-1} + b_cum, and h_{-1} = 0
# --8<-- [end:combine-kernel]


# %%
def step_combine():
    # --8<-- [start:combine-run]
    g = torch.Generator().manual_seed(0)
    for L in (16, 1024):
        a = torch.full((L,), 0.9).to(DEVICE)
        b = torch.rand(L, generator=g).to(DEVICE)
        h = torch.empty_like(b)
        recurrence_kernel[(1,)](a, b, h, L=L)
        loop = recurrence_loop(a.cpu(), b.cpu())
        print(f"l = {L:4d}: max |Triton scan - loop| = {err(h.cpu(), loop)}, "
              f"last h {h[-1].item():.4f}")
    # --8<-- [end:combine-run]


# %%
# --8<-- [start:scan-inputs]
def scan_inputs(b=2, d=6, n=4, l=37, seed=0, dtype=torch.float32):
    """Random inputs of the model's kind: A negative, delta around 0 before the softplus."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)

    return dict(u=r(b, d, l), delta=0.5 * r(b, d, l), A=-torch.exp(r(d, n)), B=r(b, n, l), C=r(b, n, l),
                D=r(d), z=r(b, d, l), delta_bias=r(d), delta_softplus=True)
# --8<-- [end:scan-inputs]


# %%
# --8<-- [start:tiled-kernel]
@triton.jit
def tiled_scan_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, Dm, L, N,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = Σ_n h C, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, h_{-1} = 0, Δ = softplus(delta).

    u, delta, y (b, Dm, L); A (Dm, N); B, C (b, N, L): float32, contiguous.
    Grid: (b, cdiv(Dm, BLOCK_D)).
    """
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)  # batch row, block of channels
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) this program's channels
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) the whole state: BLOCK_N >= N
    offs_l = tl.arange(0, BLOCK_L)  # (BLOCK_L,) a position within a chunk
    mask_dn = (offs_d[:, None] < Dm) & (offs_n[None, :] < N)  # (BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # the state entering the chunk: h_{-1} = 0
    for start in range(0, L, BLOCK_L):
        t = start + offs_l  # (BLOCK_L,) this chunk's positions
        mask_dl = (offs_d[:, None] < Dm) & (t[None, :] < L)  # (BLOCK_D, BLOCK_L)
        mask_nl = (offs_n[:, None] < N) & (t[None, :] < L)  # (BLOCK_N, BLOCK_L)
        dl = pid_b * Dm * L + offs_d[:, None] * L + t[None, :]  # offsets into (b, Dm, L)
        nl = pid_b * N * L + offs_n[:, None] * L + t[None, :]  # offsets into (b, N, L)
        u = tl.load(u_ptr + dl, mask=mask_dl, other=0.0)
        dt = tl.log(1.0 + tl.exp(tl.load(delta_ptr + dl, mask=mask_dl, other=0.0)))  # softplus
        dt = tl.where(mask_dl, dt, 0.0)  # softplus(0) = log 2: padding must get Δ = 0 itself
        Bt = tl.load(B_ptr + nl, mask=mask_nl, other=0.0)
        Ct = tl.load(C_ptr + nl, mask=mask_nl, other=0.0)
        dA = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L); 1 on padding
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # (BLOCK_D, BLOCK_N, BLOCK_L); 0 on padding
        a_cum, b_cum = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
        hs = a_cum * h[:, :, None] + b_cum  # (BLOCK_D, BLOCK_N, BLOCK_L) every state of the chunk
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BLOCK_D, BLOCK_L) y_t = Σ_n h_t C_t
        tl.store(y_ptr + dl, y, mask=mask_dl)
        h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)  # last column
# --8<-- [end:tiled-kernel]


# %%
# --8<-- [start:tiled-launcher]
def tiled_scan(u, delta, A, B, C, block_d, block_l):
    """The launcher: y (b, d, l) from float32 inputs, one program per (batch row, channel block)."""
    b, d, l = u.shape
    y = torch.empty_like(u)
    grid = (b, triton.cdiv(d, block_d))
    tiled_scan_kernel[grid](u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(),
                            C.contiguous(), y, d, l, A.shape[1], BLOCK_D=block_d,
                            BLOCK_N=triton.next_power_of_2(A.shape[1]), BLOCK_L=block_l)
    return y
# --8<-- [end:tiled-launcher]


# %%
def step_tiled():
    # --8<-- [start:tiled-run]
    x = scan_inputs(d=6, n=3, l=37)  # 6 channels, a state of 3, 37 positions: every mask is needed
    x = {k: x[k] for k in ("u", "delta", "A", "B", "C")}  # no D, z or delta_bias yet
    want = reference.selective_scan(**x, delta_softplus=True)  # the loop over time
    for block_d, block_l in ((4, 8), (8, 32)):
        y = tiled_scan(**x, block_d=block_d, block_l=block_l)
        print(f"BLOCK_D = {block_d}, BLOCK_N = 4, BLOCK_L = {block_l:2d}: "
              f"{2 * -(-6 // block_d)} programs x {-(-37 // block_l)} chunks, "
              f"max |y - reference| = {err(y, want)}")
    # --8<-- [end:tiled-run]


# %%
def step_chunked():
    # --8<-- [start:chunked-run]
    x = scan_inputs(l=37)  # 37 positions: chunks of 8 leave a partial chunk at the end
    want, want_last = reference.selective_scan(**x, return_last_state=True)  # the loop over time
    for block_l in (8, 32):
        out, last = selective_scan_triton(**x, block_l=block_l, block_d=4)
        chunks = -(-37 // block_l)
        print(f"BLOCK_L = {block_l:2d} ({chunks} chunks): max |out - reference| = {err(out, want)}, "
              f"max |last state - reference| = {err(last, want_last)}")
    # --8<-- [end:chunked-run]


# %%
def step_backward():
    # --8<-- [start:backward-run]
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    x = scan_inputs(l=37, dtype=torch.float64)
    grads = {}
    for which, scan in (("reference", reference.selective_scan),
                        ("triton", lambda **k: selective_scan_triton(**k, block_l=8, block_d=4)[0])):
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in x.items() if torch.is_tensor(v)}
        out = scan(**leaves, delta_softplus=True)
        out.backward(torch.ones_like(out))  # dLoss/dout = 1: Loss = out.sum()
        grads[which] = {k: leaves[k].grad for k in names}
    for k in names:
        print(f"d out.sum() / d {k:10s} max |triton - reference| = {err(grads['triton'][k], grads['reference'][k])}")
    # --8<-- [end:backward-run]


# %%
STEPS = {"cumsum": step_cumsum, "recurrence": step_recurrence, "combine": step_combine,
         "tiled": step_tiled, "chunked": step_chunked, "backward": step_backward}

# %% [markdown]
# In a notebook, every step in turn; as a script, the step named on the command line.

# %% active="ipynb"
# torch.set_num_threads(1)
# for name, step in STEPS.items():
#     print(f"--- {name}")
#     step()

# %% active="py"
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS, help="which step of docs/selective-scan.md to run")
    torch.set_num_threads(1)
    STEPS[parser.parse_args().step]()
