"""Selective state-space scan (Mamba-1), the plain-PyTorch reference.

Math: Mamba (Gu & Dao 2023) section 3.2, Algorithm 2; steps 1-6 of docs/paper-facts.md#selective-scan.

Glossary (code name = paper symbol, shape in mamba_ssm's ``selective_scan_fn`` layout):

    u           x_t, the input sequence                    (b, d, l)
    delta       Δ_t, the input-dependent step size        (b, d, l)
    delta_bias  bias added to Δ before softplus           (d,)     (dt_proj.bias in the model)
    A           A, the state matrix (diagonal per channel) (d, n)   (negative: A = -exp(A_log))
    B, C        B_t, C_t, input-dependent                 (b, n, l)
    D           D, the skip connection                    (d,)
    z           the gate branch; out *= silu(z)            (b, d, l)
    dA          Ā_t = exp(Δ_t A)   (zero-order hold)       (b, d, l, n)
    dBu         B̄_t x_t = Δ_t B_t x_t   (Euler step)       (b, d, l, n)
    h           h_t, the hidden state                      (b, d, n)
    y           y_t = C_t · h_t                            (b, d, l)
    b, d, l, n  batch, channels (d_inner), length, state size (d_state)

Recurrence: h_t = Ā_t * h_{t-1} + B̄_t x_t,  y_t = Σ_n h_t[n] C_t[n],  out = (y + D x) * silu(z).

Everything is computed in float32 (float64 if an input is float64) and cast back to u.dtype.
The official code doing the same: mamba_ssm ``mamba_ssm/ops/selective_scan_interface.py::
selective_scan_ref`` (the scan) and ``mamba_ssm/ops/triton/selective_state_update.py::
selective_state_update_ref`` (one decode step, same argument layout as below).
"""

import torch
import torch.nn.functional as F

from .checks import check_selective_scan, check_selective_state_update, compute_dtype


# --8<-- [start:selective_scan]
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
    b, d, l, n = check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)

    dtype_in = u.dtype
    f = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u, delta, A, B, C = u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f)

    # Step 1: the step size.
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[None, :, None]  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)  # (b, d, l)

    # Steps 2-3: discretize. Index [b, d, l, n] so that dA[:, :, t] is one position's (b, d, n).
    dA = torch.exp(delta[..., None] * A[None, :, None, :])  # (b, d, l, n)
    dBu = (delta * u)[..., None] * B.transpose(1, 2)[:, None, :, :]  # (b, d, l, n)

    # Steps 4-5: the recurrence, one position at a time.
    if initial_state is None:
        h = u.new_zeros(b, d, n)  # (b, d, n)
    else:
        h = initial_state.to(f)  # (b, d, n)
    ys = []
    for t in range(l):
        h = dA[:, :, t] * h + dBu[:, :, t]  # (b, d, n)
        ys.append((h * C[:, None, :, t]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, l)

    out = y if D is None else y + D.to(f)[None, :, None] * u  # (b, d, l)
    if z is not None:
        out = out * F.silu(z.to(f))  # (b, d, l)
    out = out.to(dtype_in)  # Step 6: back to the input dtype.
    return (out, h) if return_last_state else out
# --8<-- [end:selective_scan]


# --8<-- [start:selective_state_update]
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

    dtype_in = x.dtype
    f = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    x, dt, A, B, C = x.to(f), dt.to(f), A.to(f), B.to(f), C.to(f)

    if dt_bias is not None:
        dt = dt + dt_bias.to(f)  # (b, d)
    if dt_softplus:
        dt = F.softplus(dt)  # (b, d)
    dA = torch.exp(dt[..., None] * A)  # (b, d, n)
    dBx = (dt * x)[..., None] * B[:, None, :]  # (b, d, n)
    h = dA * state.to(f) + dBx  # (b, d, n)
    state.copy_(h)  # the in-place update

    out = (h * C[:, None, :]).sum(-1)  # (b, d)
    if D is not None:
        out = out + D.to(f) * x  # (b, d)
    if z is not None:
        out = out * F.silu(z.to(f))  # (b, d)
    return out.to(dtype_in)
# --8<-- [end:selective_state_update]
