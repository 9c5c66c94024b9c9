"""ModelConfig: every architecture choice in one dataclass, plus the papers' presets.

Every number, and where it comes from (paper section, table or released file): docs/paper-facts.md.

- BlackMamba (Zyphra, arXiv 2402.01771): Mamba and MoE layers alternate, RMSNorm pre-norm,
  final LayerNorm, tied embedding, 8 experts top-1 with a sigmoid gate whose expert is chosen by
  Sinkhorn during training, gated expert MLPs.
- MoE-Mamba (Pióro et al., arXiv 2401.04081): (Mamba, Switch-MoE) pairs, LayerNorm pre-norm, no final
  norm, untied head, 42 ReLU experts top-1 with a softmax router, capacity factor 1 and an auxiliary
  load-balancing loss; plus its baselines (dense Mamba, Transformer-MoE, dense Transformer).

Layer kinds (``layer_pattern`` repeats to ``n_layer`` layers):
    "mamba"      Mamba mixer (selective SSM)             minimamba_moe/mamba.py
    "moe"        Mixture-of-Experts MLP                  minimamba_moe/moe.py
    "attention"  causal self-attention with RoPE          minimamba_moe/attention.py
    "mlp"        dense MLP (same expert MLP, one expert)  minimamba_moe/moe.py
    "parallel"   Mamba and MoE side by side in one block: x + mamba(norm(x)) + moe(norm(x))
                 (MoE-Mamba's "parallel MoE-Mamba", its alternative design inspired by
                 GPT-J / PaLM; docs/paper-facts.md#results)              minimamba_moe/model.py
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from minimamba_moe.reference.checks import ACTIVATIONS, SINKHORN_INITS, SINKHORN_STOPPINGS  # the kernels' choices

LAYER_KINDS = ("mamba", "moe", "attention", "mlp", "parallel")
NORMS = ("rmsnorm", "layernorm")
FINAL_NORMS = (*NORMS, "none")
ROUTERS = ("sinkhorn", "switch", "sigmoid")
BACKENDS = ("reference", "fast", "auto")


class ConfigError(ValueError):
    """A ModelConfig field has a value the model cannot be built with."""


@dataclass
class ModelConfig:
    # --- sizes ---------------------------------------------------------------------------------
    vocab_size: int = 256  # tokenizer vocabulary; the embedding is padded (see below)
    pad_vocab_size_multiple: int = 64  # embedding rows rounded up to a multiple of this
    d_model: int = 128
    n_layer: int = 4
    layer_pattern: tuple[str, ...] = ("mamba", "moe")  # repeated to n_layer layers
    max_seq_len: int = 256  # context the model is trained at; bounds attention's KV cache
    # --- Mamba mixer (docs/paper-facts.md#mamba-mixer) ------------------------------------------
    d_state: int = 16  # N
    d_conv: int = 4  # kernel of the depthwise causal conv
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int | None = None  # None -> ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    # --- attention (baselines) -----------------------------------------------------------------
    n_head: int = 4
    rope_theta: float = 10000.0
    # --- MLPs and experts ----------------------------------------------------------------------
    mlp_activation: str = "swiglu"  # expert and dense MLP: swiglu | geglu | relu
    d_ff: int = 512  # hidden width of the dense "mlp" layer
    n_experts: int = 4
    top_k: int = 1
    d_expert: int = 256  # hidden width of each expert ("ffn per expert")
    router: str = "sinkhorn"  # sinkhorn (BlackMamba) | switch (MoE-Mamba, Switch Transformer) | sigmoid
    capacity_factor: float | None = None  # switch only; None = no capacity limit, nothing dropped
    aux_loss_coef: float = 0.0  # switch load-balancing loss weight (alpha)
    normalize_top_k: bool = False  # switch, top_k > 1: rescale the chosen probabilities to sum to 1
    sinkhorn_init: str = "blackmamba"  # blackmamba (1/(E*colsum)) | uniform (d1 = 1)
    sinkhorn_stopping: str = "absolute"  # absolute (as released) | marginal
    sinkhorn_tol: float = 1e-4
    sinkhorn_max_iters: int = 100
    sinkhorn_logit_scale: float = 2.0  # cost = exp(scale * logits); 2 as released, 1 in Megatron-LM
    # --- norms, embedding, numerics -----------------------------------------------------------
    norm: str = "rmsnorm"
    final_norm: str = "layernorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    init_std: float = 0.02
    backend: str = "auto"  # kernels: reference | fast | auto (fast)
    name: str = "custom"  # the preset this config came from

    def __post_init__(self) -> None:
        if isinstance(self.layer_pattern, str):  # "mamba,moe" from a command line
            self.layer_pattern = tuple(s.strip() for s in self.layer_pattern.split(",") if s.strip())
        else:
            self.layer_pattern = tuple(self.layer_pattern)
        self.validate()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The kind of every layer, layer 0 first."""
        p = self.layer_pattern
        return tuple(p[i % len(p)] for i in range(self.n_layer))

    # --- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what it may be."""

        def need(ok: bool, fld: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"ModelConfig.{fld} = {getattr(self, fld)!r} is invalid: {allowed}.")

        for fld in ("vocab_size", "pad_vocab_size_multiple", "d_model", "n_layer", "max_seq_len",
                    "d_state", "d_conv", "expand", "n_head", "d_ff", "n_experts", "top_k",
                    "d_expert", "sinkhorn_max_iters"):
            v = getattr(self, fld)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, fld, "it must be a positive integer")
        need(self.dt_rank is None or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
             "dt_rank", "it must be a positive integer, or None for ceil(d_model / 16)")
        need(len(self.layer_pattern) > 0 and all(k in LAYER_KINDS for k in self.layer_pattern),
             "layer_pattern", f"every entry must be one of {', '.join(LAYER_KINDS)}")
        need(self.n_layer % len(self.layer_pattern) == 0, "n_layer",
             f"it must be a multiple of len(layer_pattern) = {len(self.layer_pattern)}")
        need(self.mlp_activation in ACTIVATIONS, "mlp_activation", f"allowed: {', '.join(ACTIVATIONS)}")
        need(self.router in ROUTERS, "router", f"allowed: {', '.join(ROUTERS)}")
        need(self.top_k <= self.n_experts, "top_k", f"it must be at most n_experts = {self.n_experts}")
        need(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
             "it must be a positive number, or None for no capacity limit")
        need(self.capacity_factor is None or self.router == "switch", "capacity_factor",
             "only the switch router drops tokens; use None with router='sinkhorn'")
        need(self.aux_loss_coef >= 0, "aux_loss_coef", "it must be >= 0")
        need(self.sinkhorn_init in SINKHORN_INITS, "sinkhorn_init", f"allowed: {', '.join(SINKHORN_INITS)}")
        need(self.sinkhorn_stopping in SINKHORN_STOPPINGS, "sinkhorn_stopping",
             f"allowed: {', '.join(SINKHORN_STOPPINGS)}")
        need(self.sinkhorn_tol > 0, "sinkhorn_tol", "it must be > 0")
        need(self.norm in NORMS, "norm", f"allowed: {', '.join(NORMS)}")
        need(self.final_norm in FINAL_NORMS, "final_norm", f"allowed: {', '.join(FINAL_NORMS)}")
        need(self.norm_eps > 0, "norm_eps", "it must be > 0")
        need(self.backend in BACKENDS, "backend", f"allowed: {', '.join(BACKENDS)}")
        need(0 < self.dt_min <= self.dt_max, "dt_min", "it must satisfy 0 < dt_min <= dt_max")
        if "attention" in self.layer_pattern:
            need(self.d_model % self.n_head == 0 and (self.d_model // self.n_head) % 2 == 0, "n_head",
                 f"d_model = {self.d_model} must split into n_head heads of even size (RoPE rotates pairs)")

    # --- presets and (de)serialisation ---------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The named preset (see PRESETS), with any field overridden by keyword."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"Unknown preset {name!r}.{hint} Presets: {', '.join(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a plain dict (e.g. a checkpoint's config.json); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"ModelConfig has no field {k!r}.{hint}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_pattern"] = list(self.layer_pattern)
        return d


# BlackMamba: alternating Mamba / MoE, GPT-NeoX vocab padded to 50304, context 2048.
_BLACKMAMBA = dict(
    vocab_size=50277, pad_vocab_size_multiple=128, layer_pattern=("mamba", "moe"), max_seq_len=2048,
    n_experts=8, top_k=1, router="sinkhorn", mlp_activation="swiglu",
    norm="rmsnorm", final_norm="layernorm", tie_embeddings=True,
)
# MoE-Mamba and its baselines: GPT-2 vocab, LayerNorm pre-norm, no final norm, untied head.
_MOE_MAMBA = dict(
    vocab_size=50257, pad_vocab_size_multiple=64, max_seq_len=1024,
    norm="layernorm", final_norm="none", tie_embeddings=False,
    mlp_activation="relu", router="switch", top_k=1, capacity_factor=1.0, aux_loss_coef=0.01,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(  # BlackMamba-style, bytes, trains in minutes on a 2-core CPU
        vocab_size=256, pad_vocab_size_multiple=64, d_model=128, n_layer=4, layer_pattern=("mamba", "moe"),
        max_seq_len=256, n_experts=4, top_k=1, d_expert=256, router="sinkhorn", mlp_activation="swiglu",
        norm="rmsnorm", final_norm="layernorm", tie_embeddings=True,
    ),
    "blackmamba-1.5b": dict(_BLACKMAMBA, d_model=1152, n_layer=30, d_expert=3072),
    "blackmamba-2.8b": dict(_BLACKMAMBA, d_model=1472, n_layer=36, d_expert=3872),
    "moe-mamba-25m": dict(_MOE_MAMBA, d_model=512, n_layer=16, layer_pattern=("mamba", "moe"),
                          n_experts=42, d_expert=1536),
    "moe-mamba-100m": dict(_MOE_MAMBA, d_model=768, n_layer=32, layer_pattern=("mamba", "moe"),
                           n_experts=42, d_expert=2304),
    "mamba-25m": dict(_MOE_MAMBA, d_model=512, n_layer=16, layer_pattern=("mamba",)),
    "mamba-100m": dict(_MOE_MAMBA, d_model=768, n_layer=32, layer_pattern=("mamba",)),
    "transformer-25m": dict(_MOE_MAMBA, d_model=512, n_layer=16, layer_pattern=("attention", "mlp"),
                            n_head=8, d_ff=2048),
    "transformer-moe-25m": dict(_MOE_MAMBA, d_model=512, n_layer=16, layer_pattern=("attention", "moe"),
                                n_head=8, n_experts=32, d_expert=2048),
    "transformer-moe-100m": dict(_MOE_MAMBA, d_model=768, n_layer=32, layer_pattern=("attention", "moe"),
                                 n_head=12, n_experts=32, d_expert=3072),
}
