"""The pieces of the selective scan shared by its Triton forward and backward kernels.

``fast/scan_triton.py`` (the forward and the autograd Function) and ``fast/scan_triton_bwd.py`` (the
backward) both import from here, so neither imports the other's module back; the decode step
(``fast/state_update_triton.py``) takes ``_softplus`` and ``_channel_block`` from here too. The
chunked scan these helpers serve is explained at the top of ``fast/scan_triton.py``.

A kernel's program starts with ``_channel_block`` (which channels it owns) and ``_load_params``
(their A, D, bias), then per chunk ``_load_chunk`` (the chunk's u, Δ, B, C) and ``_chunk_states``.
"""

import triton
import triton.language as tl

# Launch configuration. BLOCK_L is the chunk length and must be the same in the forward and the
# backward (the backward starts from the forward's h_starts). Not tuned on a GPU yet.
BLOCK_L = 32
BLOCK_D_FWD = 16
NUM_WARPS = 4


# --8<-- [start:combine]
@triton.jit
def _combine(a1, b1, a2, b2):
    """Compose two affine maps: first h -> a1 h + b1, then h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2
# --8<-- [end:combine]


# --8<-- [start:softplus]
@triton.jit
def _softplus(x):
    """log(1 + e^x) in fp32 without overflow, and accurate for very negative x (Kahan's log1p)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, log1p_e)
# --8<-- [end:softplus]


# --8<-- [start:loads]
@triton.jit
def _channel_block(Dm, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels: offs_d, mask_d (BLOCK_D,); offs_n (BLOCK_N,); dn, mask_dn (BLOCK_D, BLOCK_N)."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_d = offs_d < Dm
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    dn = offs_d[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N) offsets in a (d, n) matrix
    return offs_d, mask_d, offs_n, dn, mask_dn


@triton.jit
def _load_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, dn, mask_dn,
                 HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The channel block's parameters in fp32: A (BLOCK_D, BLOCK_N); D, delta_bias (BLOCK_D,), 0 if absent."""
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    return A, Dv, bias


@triton.jit
def _load_delta(delta_ptr, dl, mask_dl, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Δ at offsets dl (BLOCK_D, BLOCK_L) in fp32: dt_raw = Δ + bias, and dt = softplus(dt_raw), 0 off mask_dl."""
    dt_raw = tl.load(delta_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias[:, None]
    dt = dt_raw
    if SOFTPLUS:
        dt = _softplus(dt_raw)
    return dt_raw, tl.where(mask_dl, dt, 0.0)  # padding: dA = 1, dBu = 0


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, pid_b, offs_d, offs_n, t, Dm, L, N,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One chunk's inputs in fp32: u, Δ (processed; 0 past the end) (BLOCK_D, BLOCK_L); B, C (BLOCK_N, BLOCK_L)."""
    mask_dl = (offs_d[:, None] < Dm) & (t[None, :] < L)
    mask_nl = (offs_n[:, None] < N) & (t[None, :] < L)
    dl = pid_b * Dm * L + offs_d[:, None] * L + t[None, :]  # (b, d, l) contiguous
    nl = pid_b * N * L + offs_n[:, None] * L + t[None, :]  # (b, n, l) contiguous
    u = tl.load(u_ptr + dl, mask=mask_dl, other=0.0).to(tl.float32)
    dt_raw, dt = _load_delta(delta_ptr, dl, mask_dl, bias, HAS_BIAS, SOFTPLUS)
    Bt = tl.load(B_ptr + nl, mask=mask_nl, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + nl, mask=mask_nl, other=0.0).to(tl.float32)
    return u, dt_raw, dt, Bt, Ct, dl, mask_dl, nl, mask_nl
# --8<-- [end:loads]


# --8<-- [start:chunk_states]
@triton.jit
def _chunk_states(A, h, u, dt, Bt):
    """States at every position of the chunk from its start state h (BLOCK_D, BLOCK_N) -> (BLOCK_D, BLOCK_N, BLOCK_L)."""
    dA = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
    dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # (BLOCK_D, BLOCK_N, BLOCK_L)
    a_cum, b_cum = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
    return a_cum * h[:, :, None] + b_cum, dA, dBu
# --8<-- [end:chunk_states]


def block_sizes(d, n, block_l=None, block_d=None):
    """(BLOCK_D, BLOCK_N, BLOCK_L) the launchers use: small tiles for small problems (the interpreter)."""
    return (min(block_d or BLOCK_D_FWD, triton.next_power_of_2(d)), max(2, triton.next_power_of_2(n)),
            block_l or BLOCK_L)
