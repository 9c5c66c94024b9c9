"""Depthwise causal 1-D convolution, fast: one grouped ``F.conv1d`` instead of a loop over taps.

Same signatures and docstrings as ``reference/causal_conv1d.py`` (read it first; diff the two).
The reference sums the k taps explicitly; here the left history (k-1 zeros, or the last k-1
columns of conv_state) is concatenated in front of x and a grouped convolution (groups = d, one
filter per channel) does the sum in one call, on any device. Autograd differentiates it.

Glossary (as in the reference):
    x           the input sequence                           (b, d, l)
    weight      one length-k filter per channel              (d, k)
    bias        per-channel bias                            (d,)
    conv_state  the last k inputs seen before x, oldest first (b, d, k)
    xpad        cat(conv_state[..., 1:], x)                  (b, d, l + k - 1)

Computed in float32 (float64 if an input is float64), returned in x.dtype.
"""

import contextlib

import torch
import torch.nn.functional as F

from minimamba_moe.reference.checks import check_causal_conv1d, check_causal_conv1d_update, compute_dtype


def _autocast_off(x):
    """Autocast off on x's device: these ops compute in float32 as the reference does, where autocast
    would run F.conv1d and einsum in bf16."""
    device = x.device.type
    available = torch.amp.is_autocast_available(device)  # not on the meta device
    return torch.autocast(device, enabled=False) if available else contextlib.nullcontext()


# --8<-- [start:causal_conv1d]
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  conv_state: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution of a whole sequence.

    Args:
        x: (b, d, l) input.
        weight: (d, k) one filter per channel; weight[:, -1] multiplies the current input.
        bias: (d,) optional.
        conv_state: (b, d, k) the last k inputs seen before x, oldest first (zeros if None).
            Only its last k-1 columns are used. Not modified.
        activation: None or "silu", applied after the bias.

    Returns:
        out: (b, d, l) in x.dtype.

    Raises:
        ValueError: on a shape mismatch or an unknown activation.
    """
    b, d, l, k = check_causal_conv1d(x, weight, bias, conv_state, activation)

    f = compute_dtype(x, weight, bias, conv_state)
    if conv_state is None:
        xpad = F.pad(x.to(f), (k - 1, 0))  # (b, d, l + k - 1), zeros in front
    else:
        xpad = torch.cat([conv_state[..., 1:].to(f), x.to(f)], dim=-1)  # (b, d, l + k - 1)
    # groups=d: channel c is convolved with weight[c] alone; F.conv1d is a cross-correlation, so
    # out[t] = Σ_j weight[c, j] xpad[t + j], the reference's sum.
    with _autocast_off(x):
        out = F.conv1d(xpad, weight.to(f)[:, None, :], None if bias is None else bias.to(f), groups=d)  # (b, d, l)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
# --8<-- [end:causal_conv1d]


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """One decode step: push ``x`` into ``conv_state`` (in place) and convolve the window.

    Args:
        x: (b, d) the new input.
        conv_state: (b, d, k) the last k inputs, oldest first; updated in place: shifted left by
            one with x put last.
        weight: (d, k) one filter per channel.
        bias: (d,) optional.
        activation: None or "silu".

    Returns:
        out: (b, d) in x.dtype, equal to position t of ``causal_conv1d`` over the whole sequence.

    Raises:
        ValueError: on a shape mismatch or an unknown activation.
    """
    check_causal_conv1d_update(x, conv_state, weight, bias, activation)

    # torch.roll copies, so the shift is safe in place (a plain overlapping slice assignment is not).
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = x  # the newest input goes last

    f = compute_dtype(x, conv_state, weight, bias)
    with _autocast_off(x):
        out = torch.einsum("bdk,dk->bd", conv_state.to(f), weight.to(f))  # (b, d)
    if bias is not None:
        out = out + bias.to(f)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
