"""The ops' argument checks and choice lists, written once and used by both backends.

``reference/`` and ``fast/`` call the same ``check_<op>`` at the top of each op, so a bad argument
raises the same ValueError, with the same sentence, whichever backend runs. The choice lists here
are the only definitions of them; ``minimamba_moe.config`` imports them for its own validation.

Each ``check_<op>`` takes the op's arguments, raises ValueError naming the first bad one, and
returns the sizes the op goes on with.
"""

import torch

# --- choice lists ----------------------------------------------------------------------------------
ACTIVATIONS = ("swiglu", "geglu", "relu")  # expert / dense MLP (docs/paper-facts.md#expert-mlp)
CONV_ACTIVATIONS = (None, "silu")  # after the causal conv; the Mamba mixer uses silu
SINKHORN_INITS = ("blackmamba", "uniform")  # d1 = 1/(E colsum(c)) as released | d1 = 1 as Megatron-LM
SINKHORN_STOPPINGS = ("absolute", "marginal")  # mean|d1 - d1_old| < tol as released | row-marginal error


# --- building blocks -------------------------------------------------------------------------------
def check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    """Raise ValueError unless ``tensor.shape == expected``, naming the argument and both shapes."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(expected)}, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """Raise ValueError unless ``tensor`` has ``ndim`` dimensions; ``layout`` names them, e.g. "(b, d, l)"."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(tensor.shape)}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_optional(**shapes) -> None:
    """check_shape for each name=(tensor, expected) whose tensor is not None."""
    for name, (tensor, expected) in shapes.items():
        if tensor is not None:
            check_shape(name, tensor, expected)


def compute_dtype(*tensors) -> torch.dtype:
    """The dtype the ops compute in: float32, or float64 when any given tensor is float64.

    float32 is the rule (fp32 whatever the input dtype: docs/paper-facts.md#selective-scan);
    float64 inputs keep float64 so that the tests can check exact laws and run
    ``torch.autograd.gradcheck``.
    """
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# --- one check per op --------------------------------------------------------------------------------
def check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """-> (b, d, l, n)."""
    check_ndim("u", u, 3, "(b, d, l)")
    b, d, l = u.shape
    check_ndim("A", A, 2, "(d, n)")
    n = A.shape[1]
    check_shape("delta", delta, (b, d, l))
    check_shape("A", A, (d, n))
    check_shape("B", B, (b, n, l))
    check_shape("C", C, (b, n, l))
    check_optional(D=(D, (d,)), z=(z, (b, d, l)), delta_bias=(delta_bias, (d,)),
                   initial_state=(initial_state, (b, d, n)))
    if l < 1:
        raise ValueError(f"u must have length l >= 1, got shape {tuple(u.shape)}")
    return b, d, l, n


def check_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias):
    """-> (b, d, n)."""
    check_ndim("state", state, 3, "(b, d, n)")
    b, d, n = state.shape
    check_shape("x", x, (b, d))
    check_shape("dt", dt, (b, d))
    check_shape("A", A, (d, n))
    check_shape("B", B, (b, n))
    check_shape("C", C, (b, n))
    check_optional(D=(D, (d,)), z=(z, (b, d)), dt_bias=(dt_bias, (d,)))
    return b, d, n


def check_causal_conv1d(x, weight, bias, conv_state, activation):
    """-> (b, d, l, k)."""
    check_ndim("x", x, 3, "(b, d, l)")
    b, d, l = x.shape
    check_ndim("weight", weight, 2, "(d, k)")
    k = weight.shape[1]
    check_shape("weight", weight, (d, k))
    check_optional(bias=(bias, (d,)), conv_state=(conv_state, (b, d, k)))
    check_choice("activation", activation, CONV_ACTIVATIONS)
    return b, d, l, k


def check_causal_conv1d_update(x, conv_state, weight, bias, activation):
    """-> (b, d, k)."""
    check_ndim("conv_state", conv_state, 3, "(b, d, k)")
    b, d, k = conv_state.shape
    check_shape("x", x, (b, d))
    check_shape("weight", weight, (d, k))
    check_optional(bias=(bias, (d,)))
    check_choice("activation", activation, CONV_ACTIVATIONS)
    return b, d, k


def check_sinkhorn(logits, init, stopping, max_iters):
    """-> (T, E)."""
    check_ndim("logits", logits, 2, "(T, E)")
    check_choice("init", init, SINKHORN_INITS)
    check_choice("stopping", stopping, SINKHORN_STOPPINGS)
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    return logits.shape


def check_expert_mlp(x, w1, w2, activation):
    """-> (d, f)."""
    check_choice("activation", activation, ACTIVATIONS)
    check_ndim("x", x, 2, "(N, d)")
    check_ndim("w2", w2, 2, "(d, f)")
    d, f = w2.shape
    check_shape("x", x, (x.shape[0], d))
    check_shape("w1", w1, (f if activation == "relu" else 2 * f, d))
    return d, f


def check_moe_experts(x, expert_idx, gates, w1, w2, activation):
    """Shapes, dtypes and the activation, not the index range (see check_expert_range) -> (T, d, k, E, f)."""
    check_choice("activation", activation, ACTIVATIONS)
    check_ndim("x", x, 2, "(T, d)")
    T, d = x.shape
    check_ndim("expert_idx", expert_idx, 2, "(T, k)")
    k = expert_idx.shape[1]
    check_shape("expert_idx", expert_idx, (T, k))
    check_shape("gates", gates, (T, k))
    check_ndim("w2", w2, 3, "(E, d, f)")
    E, _, f = w2.shape
    check_shape("w2", w2, (E, d, f))
    check_shape("w1", w1, (E, f if activation == "relu" else 2 * f, d))
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expert_idx must be an integer tensor (int64), got {expert_idx.dtype}")
    return T, d, k, E, f


def check_expert_range(expert_idx, n_experts):
    """Every index in [0, n_experts) or -1 (dropped). Reads the range back to the host (a sync on a GPU)."""
    if expert_idx.numel() and (expert_idx.min() < -1 or expert_idx.max() >= n_experts):
        raise ValueError(f"expert_idx values must be in [0, {n_experts}) or -1 (dropped), got range "
                         f"[{expert_idx.min().item()}, {expert_idx.max().item()}]")
