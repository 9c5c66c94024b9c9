"""The selective scan (Mamba-1), fast: Triton on CUDA tensors, vectorised PyTorch elsewhere.

Same signatures and docstrings as ``reference/selective_scan.py`` (diff the two files); the
argument checks are the reference's (``reference/checks.py``), so both raise the same errors.
Read in this order:

    reference/selective_scan.py   the math as a loop over time (the spec)
    fast/scan_cpu.py              chunked per-step loop on (b, d, n) tiles + hand-written backward
    fast/scan_triton.py           the Triton forward and backward kernels (CUDA, or the interpreter)
    fast/state_update_triton.py   the Triton decode step

Dispatch: CUDA tensors in float32/bfloat16/float16 go to Triton; everything else (CPU, float64,
and problems too big for the kernels' 32-bit offsets: 2**31 elements in one operand) goes to the
PyTorch path of fast/scan_cpu.py, which needs no triton. The Triton launchers are also
importable on their own (``selective_scan_triton``, ``selective_state_update_triton``) so the tests
can run them on CPU tensors under ``TRITON_INTERPRET=1``.
"""

import torch
import torch.nn.functional as F

from minimamba_moe.reference.checks import check_selective_scan, check_selective_state_update, compute_dtype

from .scan_cpu import selective_scan_cpu

try:  # triton is a dependency on Linux only; elsewhere every tensor takes the PyTorch path
    from .scan_triton import largest_operand, selective_scan_triton
    from .state_update_triton import selective_state_update_triton
except ImportError:
    selective_scan_triton = selective_state_update_triton = None

OFFSET_LIMIT = 2**31  # the Triton kernels' offsets are 32-bit: larger problems take the PyTorch path

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_triton(*tensors):
    """True when every given tensor is on CUDA in a dtype the kernels take (and triton imported)."""
    ts = [t for t in tensors if t is not None]
    return selective_scan_triton is not None and all(t.is_cuda and t.dtype in _TRITON_DTYPES for t in ts)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   initial_state: torch.Tensor | None = None,
                   return_last_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the selective scan over a whole sequence.

    Args:
        u: (b, d, l) input x_t, any float dtype; l >= 1.
        delta: (b, d, l) step size Δ before bias and softplus.
        A: (d, n) state matrix (one diagonal per channel, negative for a stable scan).
        B: (b, n, l) input matrix, one per position.
        C: (b, n, l) output matrix, one per position.
        D: (d,) skip weight, optional: out = y + D * u.
        z: (b, d, l) gate, optional: out = out * silu(z).
        delta_bias: (d,) added to delta before the softplus, optional.
        delta_softplus: apply softplus to (delta + delta_bias).
        initial_state: (b, d, n) state h_{-1}, optional (zeros if None).
        return_last_state: also return the state after the last position.

    Returns:
        out: (b, d, l) in u.dtype; or (out, last_state) when return_last_state, with
        last_state (b, d, n) in float32 (float64 if an input is float64).

    Raises:
        ValueError: if a tensor's shape does not match the layout above.
    """
    check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)

    f = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if (f == torch.float32 and _use_triton(u, delta, A, B, C, D, z, delta_bias, initial_state)
            and largest_operand(*u.shape, A.shape[1]) < OFFSET_LIMIT):
        out, last = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    else:
        out, last = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, f)
    return (out, last) if return_last_state else out


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           dt_bias: torch.Tensor | None = None, dt_softplus: bool = False) -> torch.Tensor:
    """Advance the scan by one position (decoding), updating ``state`` in place.

    Equals one position of ``selective_scan`` started from ``initial_state=state``.

    Args:
        state: (b, d, n) the state h_{t-1}, float32 (or float64); overwritten with h_t.
        x: (b, d) input x_t.
        dt: (b, d) step size Δ_t before bias and softplus.
        A: (d, n) state matrix.
        B: (b, n) input matrix for this position.
        C: (b, n) output matrix for this position.
        D: (d,) skip weight, optional.
        z: (b, d) gate, optional: out = out * silu(z).
        dt_bias: (d,) added to dt before the softplus, optional.
        dt_softplus: apply softplus to (dt + dt_bias).

    Returns:
        out: (b, d) in x.dtype.

    Raises:
        ValueError: if a tensor's shape does not match the layout above.
    """
    check_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias)

    f = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    if (f == torch.float32 and state.dtype == torch.float32 and _use_triton(state, x, dt, A, B, C, D, z, dt_bias)
            and state.numel() < OFFSET_LIMIT):
        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

    # One position needs no loop: the reference's math, (b, d, n) tiles, fused where torch allows.
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)  # (b, d)
    if dt_softplus:
        dt = F.softplus(dt)  # (b, d)
    xf = x.to(f)
    dA = torch.exp(dt[..., None] * A.to(f))  # (b, d, n)
    h = torch.addcmul(dA * state.to(f), (dt * xf)[..., None], B.to(f)[:, None, :])  # dA h + Δ x B
    state.copy_(h)
    out = torch.einsum("bdn,bn->bd", h, C.to(f))  # (b, d)
    if D is not None:
        out = out + D.to(f) * xf
    if z is not None:
        out = out * F.silu(z.to(f))
    return out.to(x.dtype)
