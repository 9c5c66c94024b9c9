"""Mixture-of-Experts feed-forward: run routed tokens through their experts, plain-PyTorch reference.

Glossary (code name = meaning, shape):

    x           token activations                              (T, d)
    expert_idx  the expert of each (token, slot); -1 = dropped  (T, k)   int64
    gates       weight of each (token, slot)'s expert output    (T, k)
    w1          first layer of every expert, nn.Linear layout   (E, 2f, d) gated / (E, f, d) relu
                (gated: rows [:f] are the gate, rows [f:] the up projection; BlackMamba's linear_fc1)
    w2          second layer of every expert                    (E, d, f)  (linear_fc2)
    T, d, k     tokens, model width, slots per token (top-k)
    E, f        experts, hidden width per expert (ffn)

    expert_e(v) = act(v @ w1[e].T) @ w2[e].T
        swiglu: act(h) = silu(h[:, :f]) * h[:, f:]     (BlackMamba paper)
        geglu:  act(h) = gelu(h[:, :f]) * h[:, f:]     (BlackMamba released code; exact erf gelu)
        relu:   act(h) = relu(h)                       (MoE-Mamba / Switch)
    out[t] = Σ_j gates[t, j] * expert_{expert_idx[t, j]}(x[t])   over slots with expert_idx >= 0

The experts run in x.dtype; their gated outputs are summed in float32 (float64 for float64 x) and
cast to x.dtype at the end. Routing (which expert, which gate, capacity drops) is the caller's job.
The official code doing the same: Zyphra BlackMamba ``switch_mlp.py::SwitchMLP.forward`` (a loop
over local experts, top-1) and Megatron-LM ``megatron/core/transformer/moe/experts.py::SequentialMLP``.
"""

import torch
import torch.nn.functional as F

from .checks import check_expert_mlp, check_expert_range, check_moe_experts, compute_dtype


# --8<-- [start:expert_mlp]
def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert's MLP: act(x @ w1.T) @ w2.T, no biases.

    Args:
        x: (N, d) the tokens routed to this expert.
        w1: (2f, d) for "swiglu"/"geglu" (rows [:f] gate, rows [f:] up), (f, d) for "relu".
        w2: (d, f).
        activation: "swiglu", "geglu" or "relu".

    Returns:
        (N, d) in the dtype of x @ w1.T (x.dtype when the weights share it).

    Raises:
        ValueError: on an unknown activation or a shape mismatch.
    """
    d, f = check_expert_mlp(x, w1, w2, activation)

    h = x @ w1.T  # (N, 2f) or (N, f)
    if activation == "swiglu":
        a = F.silu(h[:, :f]) * h[:, f:]  # (N, f)
    elif activation == "geglu":
        a = F.gelu(h[:, :f]) * h[:, f:]  # (N, f)
    else:
        a = F.relu(h)  # (N, f)
    return a @ w2.T  # (N, d)
# --8<-- [end:expert_mlp]


# --8<-- [start:moe_experts]
def moe_experts(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                activation: str = "swiglu") -> torch.Tensor:
    """Send every (token, slot) to its expert and sum the gated outputs per token.

    Args:
        x: (T, d) tokens.
        expert_idx: (T, k) int64 expert of each slot, in [0, E), or -1 for a dropped slot
            (contributes exactly zero, whatever its gate).
        gates: (T, k) weight multiplying each slot's expert output.
        w1: (E, 2f, d) for "swiglu"/"geglu", (E, f, d) for "relu"; nn.Linear layout.
        w2: (E, d, f).
        activation: "swiglu", "geglu" or "relu".

    Returns:
        out: (T, d) in x.dtype; out[t] = Σ_j gates[t, j] * expert_{expert_idx[t, j]}(x[t]).

    Raises:
        ValueError: on an unknown activation, a shape mismatch, a non-integer expert_idx or an
            index outside [-1, E). (The fast backend on CUDA tensors skips the index check, which
            would cost a host sync per call, and drops such slots instead.)
    """
    T, d, _, E, _ = check_moe_experts(x, expert_idx, gates, w1, w2, activation)
    check_expert_range(expert_idx, E)

    acc = compute_dtype(x)
    out = x.new_zeros(T, d, dtype=acc)  # (T, d)
    for e in range(E):
        tokens, slots = torch.nonzero(expert_idx == e, as_tuple=True)  # (N,), (N,)
        if tokens.numel() == 0:
            continue  # this expert got no tokens
        y = expert_mlp(x[tokens], w1[e], w2[e], activation)  # (N, d)
        y = y.to(acc) * gates[tokens, slots].to(acc)[:, None]  # (N, d)
        out = out.index_add(0, tokens, y)  # a token with several slots on e gets each added
    return out.to(x.dtype)
# --8<-- [end:moe_experts]
