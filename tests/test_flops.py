"""minimamba_moe/flops.py against torch.utils.flop_counter.FlopCounterMode, on the parts it can see.

FlopCounterMode counts matmuls (mm, addmm, bmm), convolutions and, under the math attention
backend, the two attention bmms; it does not count elementwise work (scan, norms, activations).
So the laws held here, on the reference kernels (plain matmuls the counter sees):

- forward: counter's mm + addmm == FlopCount.matmul, and its bmm == attention_scores;
- training: forward + backward is exactly 3x those (each matmul's backward is two of its size);
- the fast path's depthwise conv (an aten.convolution) == the ``conv`` part.

Tolerance: relative 1e-9 (the counts are integers; routing is top-k with no capacity limit, so
every token reaches exactly top_k experts).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minimamba_moe.config import ModelConfig
from minimamba_moe.flops import PARTS, flops_per_token, mfu, training_flops
from minimamba_moe.model import Model

RTOL = 1e-9
CONFIGS = {
    "mamba": dict(layer_pattern=("mamba",), d_model=64, n_layer=2),
    "blackmamba": dict(layer_pattern=("mamba", "moe"), d_model=64, n_layer=4, n_experts=4, top_k=1, router="sigmoid"),
    "moe-mamba-top2": dict(layer_pattern=("mamba", "moe"), d_model=48, n_layer=2, n_experts=6, top_k=2,
                           router="switch", mlp_activation="relu", d_expert=144, tie_embeddings=False,
                           norm="layernorm", final_norm="none"),
    "transformer": dict(layer_pattern=("attention", "mlp"), d_model=64, n_head=2, n_layer=2, d_ff=160),
    "transformer-moe": dict(layer_pattern=("attention", "moe"), d_model=64, n_head=4, n_layer=2, n_experts=4,
                            mlp_activation="geglu", router="sigmoid"),
    "moe-mamba-parallel": dict(layer_pattern=("parallel",), d_model=48, n_layer=2, n_experts=6, top_k=1,
                               router="switch", mlp_activation="relu", d_expert=144, tie_embeddings=False,
                               norm="layernorm", final_norm="none"),
}


def counted(config: ModelConfig, b: int, l: int, backward: bool) -> dict[str, float]:
    """FlopCounterMode's FLOPs per token, by aten op name."""
    torch.manual_seed(0)
    model = Model(config)
    model.train(backward)
    ids = torch.randint(0, config.vocab_size, (b, l))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = model(ids)
        if backward:
            out.logits.float().pow(2).mean().backward()
    return {str(k).removeprefix("aten."): v / (b * l) for k, v in fc.get_flop_counts()["Global"].items()}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1.0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("training", [False, True])
def test_matmul_and_attention_flops_match_the_counter(name, training):
    cfg = ModelConfig(**CONFIGS[name], backend="reference")
    l = 24
    seen = counted(cfg, 2, l, backward=training)
    mine = flops_per_token(cfg, l, training=training)
    factor = 3 if training else 1
    mm = seen.get("mm", 0) + seen.get("addmm", 0)
    assert close(mm, factor * mine.matmul), f"{name}: counter {mm} vs flops.py {factor * mine.matmul}, rel err {abs(mm / (factor * mine.matmul) - 1):.3g}"
    att = seen.get("bmm", 0)
    assert close(att, factor * mine.parts["attention_scores"]), f"{name}: counter bmm {att} vs {factor * mine.parts['attention_scores']}"


def test_conv_flops_match_the_counter_on_the_fast_path():
    cfg = ModelConfig(**CONFIGS["blackmamba"], backend="fast")
    seen = counted(cfg, 2, 16, backward=False)
    mine = flops_per_token(cfg, 16, training=False)
    assert mine.parts["conv"] > 0
    assert close(seen["convolution"], mine.parts["conv"]), (seen["convolution"], mine.parts["conv"])


def test_breakdown_laws():
    cfg = ModelConfig(**CONFIGS["transformer-moe"])
    f = flops_per_token(cfg, 128)
    assert set(f.parts) == set(PARTS)
    assert f.training and f.total == pytest.approx(3 * f.forward)
    assert flops_per_token(cfg, 128, training=False).total == pytest.approx(f.forward)
    # attention scores grow linearly with the context, nothing else depends on it but softmax
    g = flops_per_token(cfg, 256)
    assert g.parts["attention_scores"] == pytest.approx(2 * f.parts["attention_scores"])
    assert g.matmul == f.matmul
    # a Mamba model's FLOPs per token do not depend on the context at all
    m = ModelConfig(**CONFIGS["blackmamba"])
    assert flops_per_token(m, 64).total == flops_per_token(m, 8192).total
    # only the active experts count: more experts at the same top_k cost only the router
    more = ModelConfig(**{**CONFIGS["blackmamba"], "n_experts": 16})
    diff = flops_per_token(more, 64).forward - flops_per_token(m, 64).forward
    assert diff == pytest.approx(2 * m.d_model * 12 * 2)  # router: 2 MoE layers x 12 more experts
    assert training_flops(m, 64, 1000) == pytest.approx(1000 * flops_per_token(m, 64).total)
    assert mfu(m, 64, tokens_per_s=1e6, peak_flops=flops_per_token(m, 64).total * 2e6) == pytest.approx(0.5)


def test_preset_sanity():
    """6N per token for a dense model whose matmuls dominate (Kaplan et al. 2020): within 15%."""
    cfg = ModelConfig.from_preset("mamba-100m")
    from minimamba_moe.model import count_params

    n = count_params(cfg).active - cfg.padded_vocab_size * cfg.d_model  # the input embedding is a lookup
    f = flops_per_token(cfg, 1024)
    assert 0.85 < f.total / (6 * n) < 1.15, f.total / (6 * n)


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(ModelConfig(), 0)
