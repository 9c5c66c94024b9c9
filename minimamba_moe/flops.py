"""FLOPs per token of any ModelConfig: what "equal training FLOPs" and MFU are computed from.

    flops_per_token(config, seq_len, training=True) -> FlopCount (a per-part breakdown)
    training_flops(config, seq_len, n_tokens)       -> total FLOPs to train on n_tokens tokens
    mfu(config, seq_len, tokens_per_s, peak_flops)  -> model FLOPs utilisation, 0..1

Conventions (the usual ones: Kaplan et al. 2020 §2.1, Chinchilla App. F, PaLM App. B):

- One multiply-add is 2 FLOPs; a matmul (m, k) @ (k, n) is 2 m k n.
- Per token, forward. Training counts 3x the forward: the backward of a matmul is two matmuls
  of the same size (input gradient and weight gradient), and the same factor is applied to the
  scan, conv and elementwise parts (an approximation there; they are a few % of the total).
  Activation recomputation is not counted (it is hardware work, not model work).
- Attention scores: QKᵀ and attention-weights x V cost 2 * 2 * d_model * L per token at context
  L, counted over the full L x L matrix as a plain (non-causal-skipping) kernel computes it,
  i.e. the PaLM convention. With ``seq_len=L`` this is the training / prefill cost; for one
  decoding step at context c pass ``seq_len=c``.
- MoE: only the top_k active experts of a token, plus the router matmul. Tokens dropped by a
  capacity limit are counted as if processed (an upper bound; the Switch router drops a few %).
- Selective scan (Mamba, Gu & Dao 2023 Alg. 2), per token per (channel, state) pair: Δ·A, exp,
  Δ·B·u (2), h = dA·h + dBu (2), y += C·h (2): 8 FLOPs, counting exp as 1. Per channel: softplus
  of Δ, D skip, silu(z) gate and the product: ~8 more. The conv is depthwise: 2 * d_conv per
  channel (its bias and silu are counted as elementwise).
- Norms and residual adds ("elementwise") are counted at ~5 FLOPs per element; the embedding
  lookup is free; the output head is a full matmul over the padded vocabulary.

``torch.utils.flop_counter.FlopCounterMode`` counts only matmuls, convolutions and attention
kernels; tests/test_flops.py holds the ``matmul``, ``attention`` and ``conv`` parts to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

TRAINING_MULTIPLIER = 3  # forward + backward ~= 3 x forward (backward = 2 matmuls per forward matmul)
SCAN_FLOPS_PER_STATE = 8  # per token, per (d_inner, d_state) element
SCAN_FLOPS_PER_CHANNEL = 8  # per token, per d_inner channel: softplus, D skip, silu gate, product
ELEMENTWISE_FLOPS = 5  # per element of a norm or residual add


@dataclass
class FlopCount:
    """FLOPs per token. ``parts`` are forward FLOPs; ``total`` is forward x3 when ``training``."""

    parts: dict[str, float]  # forward FLOPs per token, by part (see PARTS)
    seq_len: int
    training: bool

    @property
    def forward(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def total(self) -> float:
        return self.forward * (TRAINING_MULTIPLIER if self.training else 1)

    @property
    def matmul(self) -> float:
        """Forward FLOPs in weight matmuls (what FlopCounterMode counts as mm / addmm)."""
        return float(sum(self.parts[p] for p in MATMUL_PARTS))

    def as_dict(self) -> dict:
        return {"parts": dict(self.parts), "seq_len": self.seq_len, "training": self.training,
                "forward": self.forward, "total": self.total, "matmul": self.matmul}


MATMUL_PARTS = ("mamba_proj", "attention_proj", "mlp", "experts", "router", "head")
PARTS = MATMUL_PARTS + ("attention_scores", "scan", "conv", "elementwise")


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True) -> FlopCount:
    """FLOPs per token of ``config`` at context ``seq_len`` (see the module doc for what counts)."""
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    c = config
    d, di, n, r = c.d_model, c.d_inner, c.d_state, c.dt_rank
    gated = c.mlp_activation != "relu"
    p = dict.fromkeys(PARTS, 0.0)

    def mlp_flops(f: int) -> float:  # one expert / dense MLP: fc1 (d -> f or 2f), act, fc2 (f -> d)
        return 2 * d * (2 * f if gated else f) + 2 * f * d

    for kind in c.layer_kinds:
        p["elementwise"] += ELEMENTWISE_FLOPS * 2 * d  # pre-norm + residual add
        if kind in ("mamba", "parallel"):  # parallel: a Mamba and an MoE on one norm's output
            # in_proj d -> 2 di; x_proj di -> r + 2n; dt_proj r -> di; out_proj di -> d
            p["mamba_proj"] += 2 * d * 2 * di + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * d
            p["conv"] += 2 * di * c.d_conv  # depthwise taps
            p["elementwise"] += 5 * di  # conv bias + silu
            p["scan"] += SCAN_FLOPS_PER_STATE * di * n + SCAN_FLOPS_PER_CHANNEL * di
        elif kind == "attention":
            p["attention_proj"] += 2 * d * 3 * d + 2 * d * d  # qkv, out
            p["attention_scores"] += 2 * 2 * d * seq_len  # q·k over the context, weights·v
            p["elementwise"] += ELEMENTWISE_FLOPS * c.n_head * seq_len + 6 * 2 * d  # softmax, RoPE on q and k
        if kind == "parallel":
            p["elementwise"] += d  # the second add
        if kind in ("moe", "parallel"):
            p["router"] += 2 * d * c.n_experts
            p["experts"] += c.top_k * mlp_flops(c.d_expert)
            p["elementwise"] += c.top_k * (4 * c.d_expert + 2 * d)  # activation, gate product, combine
        elif kind == "mlp":
            p["mlp"] += mlp_flops(c.d_ff)
            p["elementwise"] += 4 * c.d_ff
    p["head"] += 2 * d * c.padded_vocab_size
    if c.final_norm != "none":
        p["elementwise"] += ELEMENTWISE_FLOPS * d
    return FlopCount({k: float(v) for k, v in p.items()}, seq_len, training)


def training_flops(config: ModelConfig, seq_len: int, n_tokens: int) -> float:
    """FLOPs to train ``config`` on ``n_tokens`` tokens in windows of ``seq_len``."""
    return flops_per_token(config, seq_len, training=True).total * n_tokens


def mfu(config: ModelConfig, seq_len: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of a training run: achieved model FLOP/s over the hardware peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops!r}.")
    return flops_per_token(config, seq_len, training=True).total * tokens_per_s / peak_flops
