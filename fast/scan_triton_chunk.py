"""The pieces of the selective scan shared by its Triton forward and backward kernels.

``fast/scan_triton.py`` (the forward and the autograd Function) and ``fast/scan_triton_bwd.py`` (the
backward) both import from here, so neither imports the other's module back; the decode step
(``fast/state_update_triton.py``) takes ``_softplus`` from here too. The chunked scan these helpers
serve is explained at the top of ``fast/scan_triton.py``.
"""

import triton
import triton.language as tl

# Launch configuration. BLOCK_L is the chunk length and must be the same in the forward and the
# backward (the backward starts from the forward's h_starts). Not tuned on a GPU yet.
BLOCK_L = 32
BLOCK_D_FWD = 16
NUM_WARPS = 4


@triton.jit
def _combine(a1, b1, a2, b2):
    """Compose two affine maps: first h -> a1 h + b1, then h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """log(1 + e^x) in fp32 without overflow, and accurate for very negative x (Kahan's log1p)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, pid_b, offs_d, offs_n, t, Dm, L, N,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One chunk's inputs in fp32: u, Δ (processed; 0 past the end) (BLOCK_D, BLOCK_L); B, C (BLOCK_N, BLOCK_L)."""
    mask_dl = (offs_d[:, None] < Dm) & (t[None, :] < L)
    mask_nl = (offs_n[:, None] < N) & (t[None, :] < L)
    dl = pid_b * Dm * L + offs_d[:, None] * L + t[None, :]  # (b, d, l) contiguous
    nl = pid_b * N * L + offs_n[:, None] * L + t[None, :]  # (b, n, l) contiguous
    u = tl.load(u_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)
    dt_raw = tl.load(delta_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias[:, None]
    dt = dt_raw
    if SOFTPLUS:
        dt = _softplus(dt_raw)
    dt = tl.where(mask_dl, dt, 0.0)  # padding: dA = 1, dBu = 0
    Bt = tl.load(B_ptr + nl, mask=mask_nl, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + nl, mask=mask_nl, other=0.0).to(tl.float32)
    return u, dt_raw, dt, Bt, Ct, dl, mask_dl, nl, mask_nl


@triton.jit
def _chunk_states(A, h, u, dt, Bt):
    """States at every position of the chunk from its start state h (BLOCK_D, BLOCK_N) -> (BLOCK_D, BLOCK_N, BLOCK_L)."""
    dA = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
    dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # (BLOCK_D, BLOCK_N, BLOCK_L)
    a_cum, b_cum = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
    return a_cum * h[:, :, None] + b_cum, dA, dBu


def block_sizes(d, n, block_l=None, block_d=None):
    """(BLOCK_D, BLOCK_N, BLOCK_L) the launchers use: small tiles for small problems (the interpreter)."""
    return (min(block_d or BLOCK_D_FWD, triton.next_power_of_2(d)), max(2, triton.next_power_of_2(n)),
            block_l or BLOCK_L)
