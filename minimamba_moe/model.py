"""The language model: embedding, a stack of pre-norm residual layers, final norm, output head.

    x = embed(tokens)                               (b, l, d), residual stream in fp32
    for each layer:  x = x + mixer(norm(x))         mixer: Mamba | MoE | attention | dense MLP
    logits = head(final_norm(x))                    (b, l, vocab)

BlackMamba alternates Mamba and MoE layers (layer 0 Mamba); MoE-Mamba pairs them the same way;
the baselines use only Mamba, or attention with MoE / dense MLPs. ``ModelConfig.layer_pattern``
says which (docs/paper-facts.md#presets).

Every mixer has the same interface, so a block never asks which kind it holds:

    mixer(h, state=None) -> (out, stats)     h, out (b, l, d); stats a RouterStats (MoE) or None
    mixer.init_state(batch_size) -> state    MambaState, KVCache, or None (MoE and MLP keep none)

Recurrent inference: ``init_state`` allocates each layer's state (a fixed-size MambaState, or a
KVCache for attention), ``forward(ids, state=...)`` prefills it and updates it in place, and
``step`` feeds one token: the same forward on a (b, 1) input, where a Mamba mixer given a state
takes its one-token kernels (as mamba_ssm's Mamba does once its inference offset is past 0).

Where the official code does the same: mamba_ssm/models/mixer_seq_simple.py (MixerModel,
allocate_inference_cache), Zyphra/BlackMamba mamba_model.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from .attention import CausalSelfAttention
from .config import ModelConfig
from .mamba import MambaMixer
from .moe import MLP, MoE, RouterStats


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (b, l, vocab_size)
    aux_loss: torch.Tensor  # () sum of the MoE layers' auxiliary losses (0 without any)
    router_stats: list[RouterStats]  # one per MoE layer, in layer order


class ParamCount(NamedTuple):
    total: int  # every parameter, the tied embedding once
    active: int  # used per token: experts counted top_k of n_experts
    embedding: int  # embedding + untied head (papers often quote counts without these)


@dataclass
class InferenceState:
    layers: list  # per layer: MambaState, KVCache, or None (MoE / MLP keep no state)
    seq_len: int = 0  # tokens consumed so far
    extra: dict = field(default_factory=dict)


# --8<-- [start:ParallelMambaMoE]
class ParallelMambaMoE(nn.Module):
    """MoE-Mamba's parallel design: one block's Mamba and MoE read the same normalised input and
    their outputs are summed, so the block computes x + mamba(norm(x)) + moe(norm(x)) (one norm,
    where the sequential design has two blocks and two norms). Docs: docs/paper-facts.md#results
    (MoE-Mamba found it worse than the sequential design)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.mamba = MambaMixer(config)
        self.moe = MoE(config)

    def init_state(self, batch_size: int, device=None, dtype=None):
        return self.mamba.init_state(batch_size, device, dtype)  # the MoE keeps none

    def forward(self, h: torch.Tensor, state=None) -> tuple[torch.Tensor, RouterStats]:
        a, _ = self.mamba(h, state)
        b, stats = self.moe(h)
        return a + b, stats
# --8<-- [end:ParallelMambaMoE]


MIXERS = {"mamba": MambaMixer, "moe": MoE, "attention": CausalSelfAttention, "mlp": MLP,
          "parallel": ParallelMambaMoE}  # by layer kind


# --8<-- [start:Block]
class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.mixer = MIXERS[kind](config)

    def forward(self, x: torch.Tensor, state=None) -> tuple[torch.Tensor, RouterStats | None]:
        """x (b, l, d) -> (x + mixer(norm(x)), the mixer's stats); ``state`` is the mixer's, updated in place."""
        h, stats = self.mixer(self.norm(x.to(self.norm.weight.dtype)), state)
        return x + h.to(x.dtype), stats
# --8<-- [end:Block]


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=eps)  # weight only
    return nn.LayerNorm(d, eps=eps)  # weight and bias


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        V, d = config.padded_vocab_size, config.d_model
        self.embedding = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_kinds)
        self.final_norm = None if config.final_norm == "none" else make_norm(config.final_norm, d, config.norm_eps)
        self.lm_head = nn.Linear(d, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Embedding (and untied head) N(0, init_std); output projections scaled by 1/sqrt(n_layer).

        The output projections are every mixer's last matrix, the one writing into the residual
        stream: Mamba and attention ``out_proj``, the dense MLP's ``fc2`` and the experts' ``w2``
        (docs/paper-facts.md#initialization says where each family's rule comes from).
        """
        nn.init.normal_(self.embedding.weight, std=self.config.init_std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        for p in self.parameters():
            if getattr(p, "_is_output_projection", False):
                p.div_(math.sqrt(self.config.n_layer))

    def set_backend(self, backend: str) -> None:
        """Run the same weights on another kernel backend: reference | fast | auto."""
        self.config.backend = backend
        self.config.validate()

    # --- training / prefill ---------------------------------------------------------------------
    # --8<-- [start:model_forward]
    def forward(self, input_ids: torch.Tensor, state: InferenceState | None = None) -> ModelOutput:
        """input_ids (b, l) int64 -> ModelOutput. With ``state``, continue from it and update it in place."""
        x = self.embedding(input_ids)  # (b, l, d)
        if self.config.residual_in_fp32:
            x = x.float()
        stats = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, None if state is None else state.layers[i])
            if s is not None:
                stats.append(s)
        if state is not None:
            state.seq_len += input_ids.shape[1]
        aux = sum((s.aux_loss for s in stats), torch.zeros((), device=x.device))
        return ModelOutput(self._logits(x), aux, stats)
    # --8<-- [end:model_forward]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x.to(self.final_norm.weight.dtype))
        logits = self.lm_head(x.to(self.lm_head.weight.dtype))
        return logits[..., : self.config.vocab_size]  # padded rows are never predicted

    # --- recurrent inference --------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> InferenceState:
        """Per-layer recurrent state for ``batch_size`` sequences, all at position 0."""
        return InferenceState([layer.mixer.init_state(batch_size, device, dtype) for layer in self.layers])

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, state: InferenceState) -> torch.Tensor:
        """One token per sequence: input_ids (b,) or (b, 1) -> logits (b, vocab_size); state updated in place."""
        return self.forward(input_ids.reshape(-1, 1), state).logits[:, 0]

    # --- bookkeeping ----------------------------------------------------------------------------
    def count_params(self) -> ParamCount:
        """Total and active (per-token) parameter counts; the tied embedding is counted once."""
        c = self.config
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.modules():
            if isinstance(moe, MoE):
                expert = moe.w1.numel() + moe.w2.numel()
                inactive += expert // c.n_experts * (c.n_experts - c.top_k)
        emb = self.embedding.weight.numel() + (0 if c.tie_embeddings else self.lm_head.weight.numel())
        return ParamCount(total, total - inactive, emb)


def count_params(config: ModelConfig) -> ParamCount:
    """Parameter counts of a config without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        return Model(config).count_params()
