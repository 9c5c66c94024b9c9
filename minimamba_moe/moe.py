"""Mixture-of-Experts MLP layer, its two routers, and the dense MLP of the baselines.

Glossary (code name -> paper symbol):
    T            tokens in the local batch (b * l, flattened)
    E            n_experts;  k = top_k
    logits       router scores x W (+ b)                                (T, E)
    expert_idx   the k experts chosen per token; -1 marks a dropped slot  (T, k)
    gates        the weight each chosen expert's output is multiplied by  (T, k)
    w1, w2       stacked expert weights, nn.Linear layout:
                 w1 (E, 2*f, d) gate rows then up rows (SwiGLU / GeGLU), or (E, f, d) (ReLU); w2 (E, d, f)

Routers:
- ``route_sinkhorn`` (BlackMamba, docs/paper-facts.md#router-and-sinkhorn): gate = sigmoid(logit)
  of the chosen expert; in training the expert is the argmax of the Sinkhorn-balanced matrix over
  the local batch (no gradient through the choice, only through the sigmoid); at inference the
  argmax of the sigmoid. No capacity limit, nothing dropped, no auxiliary loss.
- ``route_switch`` (MoE-Mamba section 3, Switch Transformer sections 2.1-2.2;
  docs/paper-facts.md#switch-router): softmax over experts, top-k, the chosen probability is the
  gate; in training at most ``int(cf * T * k / E)`` token-slots per
  expert, in token order (all first choices before second choices), the rest dropped (they
  produce zero and ride the residual); auxiliary loss ``alpha * E * sum_e mean_t(p[t, e]) * f_e``
  with f_e the fraction of token-slots routed to e. At inference there is no capacity limit, so a
  token's output does not depend on which other tokens share its batch (and step == forward).
- ``route_sigmoid`` (an ablation baseline, not from either paper): BlackMamba's router without
  Sinkhorn: the top-k logits choose the experts in training as at inference, gate = sigmoid(logit),
  no balancing of any kind, no capacity limit, no auxiliary loss.

Numerics: the router's matmul runs in fp32 (input and weight cast, autocast off), as Switch
Transformer's "selective precision" does (section 2.4), so under bf16 autocast the routes and gates
are decided from fp32 logits. The Sinkhorn router's bias starts at 0, as Zyphra's ``_init_weights``
zeroes every Linear bias; its weight keeps nn.Linear's default init, as there.

Called as every mixer is: ``moe(x, state=None) -> (out, RouterStats)``; it keeps no state.

Where the official code does the same: Zyphra/BlackMamba ``switch_mlp.py`` (``SwitchMLP``: router,
sigmoid gate; ``sinkhorn``), Megatron-LM ``megatron/core/transformer/moe/router.py``; Switch:
``mesh_tensorflow`` / ``fairseq`` ``top1gating``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .ops import get_ops


@dataclass
class RouterStats:
    """What one MoE layer's routing did in a forward pass (device tensors: no host sync)."""

    tokens_per_expert: torch.Tensor  # (E,) int64: token-slots each expert processed
    dropped: torch.Tensor  # () int64: token-slots dropped by the capacity limit
    aux_loss: torch.Tensor  # () fp32: this layer's load-balancing loss (already times its coefficient)
    sinkhorn_iters: torch.Tensor  # () int64: Sinkhorn passes (0 when Sinkhorn did not run)


# --8<-- [start:route_sinkhorn]
def route_sinkhorn(logits: torch.Tensor, config: ModelConfig, training: bool):
    """logits (T, E) fp32 -> expert_idx (T, k), gates (T, k), sinkhorn_iters ()."""
    k = config.top_k
    iters = torch.zeros((), dtype=torch.int64, device=logits.device)
    if training:
        with torch.no_grad():
            P, iters = get_ops(config.backend).sinkhorn(
                logits.detach(), init=config.sinkhorn_init, stopping=config.sinkhorn_stopping,
                tol=config.sinkhorn_tol, max_iters=config.sinkhorn_max_iters,
                logit_scale=config.sinkhorn_logit_scale,
            )
            expert_idx = P.topk(k, dim=-1).indices
    else:
        expert_idx = logits.topk(k, dim=-1).indices  # sigmoid is monotone: same as argmax of sigmoid
    gates = torch.sigmoid(logits).gather(1, expert_idx)
    return expert_idx, gates, iters
# --8<-- [end:route_sinkhorn]


# --8<-- [start:route_sigmoid]
def route_sigmoid(logits: torch.Tensor, config: ModelConfig):
    """logits (T, E) fp32 -> expert_idx (T, k), gates (T, k): top-k logits, sigmoid gates, no balancing."""
    expert_idx = logits.topk(config.top_k, dim=-1).indices  # (T, k)
    return expert_idx, torch.sigmoid(logits).gather(1, expert_idx)
# --8<-- [end:route_sigmoid]


# --8<-- [start:route_switch]
def route_switch(logits: torch.Tensor, config: ModelConfig, training: bool):
    """logits (T, E) fp32 -> expert_idx (T, k) with -1 for dropped slots, gates (T, k), aux_loss ()."""
    T, E = logits.shape
    k = config.top_k
    probs = torch.softmax(logits, dim=-1)  # (T, E)
    gates, expert_idx = probs.topk(k, dim=-1)  # (T, k)
    if config.normalize_top_k:
        gates = gates / gates.sum(-1, keepdim=True)
    onehot = F.one_hot(expert_idx.t().reshape(-1), E)  # (k*T, E), slot-major: first choices first
    frac = onehot.float().mean(0)  # f_e, fraction of token-slots sent to each expert
    aux = config.aux_loss_coef * E * (probs.mean(0) * frac).sum()
    if training and config.capacity_factor is not None:
        capacity = int(config.capacity_factor * T * k / E)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (k*T,) arrival order within its expert
        keep = (position < capacity).view(k, T).t()  # (T, k)
        expert_idx = torch.where(keep, expert_idx, torch.full_like(expert_idx, -1))
        gates = gates * keep
    return expert_idx, gates, aux
# --8<-- [end:route_switch]


class Stateless(nn.Module):
    """A mixer that carries nothing from one token to the next (MoE, MLP)."""

    def init_state(self, batch_size: int, device=None, dtype=None) -> None:
        return None


class MoE(Stateless):
    """x (b, l, d) -> (b, l, d): every token through its top-k experts, weighted by its gates."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E, d, f = config.n_experts, config.d_model, config.d_expert
        f1 = f if config.mlp_activation == "relu" else 2 * f
        self.router = nn.Linear(d, E, bias=config.router in ("sinkhorn", "sigmoid"))
        self.w1 = nn.Parameter(torch.empty(E, f1, d))
        self.w2 = nn.Parameter(torch.empty(E, d, f))
        self.w2._is_output_projection = True  # Model scales these by 1/sqrt(n_layer) at init
        with torch.no_grad():  # Megatron-LM's expert init: N(0, init_std), w2 then scaled
            self.w1.normal_(0.0, config.init_std)
            self.w2.normal_(0.0, config.init_std)
            if self.router.bias is not None:
                self.router.bias.zero_()

    # --8<-- [start:router_logits]
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> logits (T, E) fp32, computed in fp32 even under autocast (see the module doc)."""
        bias = None if self.router.bias is None else self.router.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float(), bias)
    # --8<-- [end:router_logits]

    # --8<-- [start:MoE_forward]
    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, RouterStats]:
        c = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        logits = self.router_logits(x)  # (T, E)
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        if c.router == "sinkhorn":
            expert_idx, gates, iters = route_sinkhorn(logits, c, self.training)
            aux = torch.zeros((), device=x.device)
        elif c.router == "sigmoid":
            expert_idx, gates = route_sigmoid(logits, c)
            aux, iters = torch.zeros((), device=x.device), zero
        else:
            expert_idx, gates, aux = route_switch(logits, c, self.training)
            iters = zero
        out = get_ops(c.backend).moe_experts(x, expert_idx, gates.to(x.dtype), self.w1, self.w2, c.mlp_activation)
        # count slots per expert without a host sync: bucket 0 collects the dropped (-1) slots
        counts = torch.zeros(c.n_experts + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, expert_idx.reshape(-1) + 1, torch.ones_like(expert_idx.reshape(-1)))
        stats = RouterStats(
            tokens_per_expert=counts[1:],
            dropped=counts[0],
            aux_loss=aux,
            sinkhorn_iters=iters,
        )
        return out.view(shape), stats
    # --8<-- [end:MoE_forward]


class MLP(Stateless):
    """The dense MLP of the Transformer baseline: one expert, always on. mlp(x, state=None) -> (out, None)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        f = config.d_ff
        self.fc1 = nn.Linear(config.d_model, f if config.mlp_activation == "relu" else 2 * f, bias=False)
        self.fc2 = nn.Linear(f, config.d_model, bias=False)
        self.fc2.weight._is_output_projection = True

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        shape = x.shape
        out = get_ops(self.config.backend).expert_mlp(
            x.reshape(-1, shape[-1]), self.fc1.weight, self.fc2.weight, self.config.mlp_activation)
        return out.view(shape), None
