"""Depthwise causal 1-D convolution over length, the plain-PyTorch reference (Mamba's short conv).

Glossary (code name = meaning, shape):

    x           the input sequence, one channel per row      (b, d, l)
    weight      w, one length-k filter per channel           (d, k)   (conv1d.weight[:, 0, :])
    bias        per-channel bias                            (d,)
    conv_state  the last k inputs seen before x, oldest first (b, d, k)
    xpad        cat(conv_state[..., 1:], x): x with its k-1 predecessors in front (b, d, l + k - 1)
    b, d, l, k  batch, channels (d_inner), length, kernel width (d_conv = 4)

    out[:, c, t] = bias[c] + Σ_{j<k} weight[c, j] * xpad[:, c, t + j]

so weight[:, -1] multiplies the current input x_t and weight[:, 0] the input k-1 steps back.
This is ``F.conv1d(x, weight[:, None], bias, padding=k-1, groups=d)[..., :l]`` when conv_state is
zeros; here it is written as the explicit sum over the k taps.

Carrying state between calls: after ``causal_conv1d(x, ..., conv_state=s)`` the state for the next
call is ``torch.cat([s, x], -1)[..., -k:]`` (the last k inputs; zeros in front when fewer were seen).
This op does not update conv_state; ``causal_conv1d_update`` (one decode step) does, in place.

Computed in float32 (float64 if an input is float64), returned in x.dtype.
The official code doing the same: causal-conv1d ``causal_conv1d/causal_conv1d_interface.py::
causal_conv1d_ref`` and ``causal_conv1d_update_ref``.
"""

import torch
import torch.nn.functional as F

from .checks import check_causal_conv1d, check_causal_conv1d_update, compute_dtype


def _activate(out, activation):
    """Apply the activation named by ``activation`` (None or "silu")."""
    return F.silu(out) if activation == "silu" else out


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
    history = x.new_zeros(b, d, k - 1, dtype=f) if conv_state is None else conv_state[..., 1:].to(f)
    xpad = torch.cat([history, x.to(f)], dim=-1)  # (b, d, l + k - 1)
    w = weight.to(f)  # (d, k)

    out = x.new_zeros(b, d, l, dtype=f)  # (b, d, l)
    for j in range(k):
        out = out + w[None, :, j, None] * xpad[:, :, j : j + l]  # tap j sees input t - (k-1) + j
    if bias is not None:
        out = out + bias.to(f)[None, :, None]
    return _activate(out, activation).to(x.dtype)
# --8<-- [end:causal_conv1d]


# --8<-- [start:causal_conv1d_update]
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

    conv_state[..., :-1] = conv_state[..., 1:].clone()  # shift left by one (drop the oldest)
    conv_state[..., -1] = x  # the newest input goes last

    f = compute_dtype(x, conv_state, weight, bias)
    out = (conv_state.to(f) * weight.to(f)[None]).sum(-1)  # (b, d)
    if bias is not None:
        out = out + bias.to(f)[None, :]
    return _activate(out, activation).to(x.dtype)
# --8<-- [end:causal_conv1d_update]
