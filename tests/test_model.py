"""Laws of the whole model: presets, step == forward, causality, chunked prefill, state size, gradients."""

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe import Model, ModelConfig, count_params
from tests.helpers import assert_close

# fp32 end to end: the recurrent and parallel paths sum in different orders
STEP_ATOL, STEP_RTOL = 1e-4, 1e-4

# One small config per preset family (the presets' own choices, shrunk).
FAMILIES = {
    "blackmamba": dict(preset="tiny"),
    "moe-mamba": dict(preset="moe-mamba-25m", n_experts=5),
    "mamba": dict(preset="mamba-25m"),
    "transformer": dict(preset="transformer-25m", n_head=2, d_ff=48),
    "transformer-moe": dict(preset="transformer-moe-25m", n_head=2, n_experts=3),
    # MoE-Mamba's parallel design: every block x + mamba(norm(x)) + moe(norm(x))
    "moe-mamba-parallel": dict(preset="moe-mamba-25m", n_experts=5, layer_pattern=("parallel",)),
}
SMALL = dict(vocab_size=50, pad_vocab_size_multiple=16, d_model=32, n_layer=4, d_expert=24, max_seq_len=64)


@functools.lru_cache(maxsize=None)
def cached_model(family: str) -> Model:
    """Hypothesis examples share one model per family (tests must not change its weights)."""
    return small_model(family)


def small_model(family: str, backend: str = "reference", seed: int = 0, **overrides) -> Model:
    spec = dict(FAMILIES[family])
    preset = spec.pop("preset")
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, **{**SMALL, **spec, "backend": backend, **overrides})
    model = Model(config).eval()
    # random, not freshly initialised, weights: sharper routing and a non-trivial SSM
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(0.05 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize(
    "preset,total,active",
    [("blackmamba-1.5b", 1458.5e6, 343.7e6), ("blackmamba-2.8b", 2783.2e6, 628.8e6)],
)
def test_blackmamba_parameter_counts(preset, total, active):
    c = count_params(ModelConfig.from_preset(preset))
    assert abs(c.total - total) < 0.1e6, f"{preset}: total {c.total / 1e6:.2f}M, paper facts say {total / 1e6}M"
    assert abs(c.active - active) < 0.1e6, f"{preset}: active {c.active / 1e6:.2f}M, paper facts say {active / 1e6}M"


@pytest.mark.parametrize(
    "preset,total,active",
    [
        ("moe-mamba-25m", 542e6, 26e6), ("moe-mamba-100m", 2439e6, 117e6), ("mamba-25m", 27e6, 27e6),
        ("mamba-100m", 121e6, 121e6), ("transformer-moe-25m", 545e6, 25e6), ("transformer-moe-100m", 2454e6, 114e6),
    ],
)
def test_moe_mamba_paper_counts_without_embeddings(preset, total, active):
    """The MoE-Mamba paper quotes sizes without embedding and head, rounded to 2-3 digits: within 2%."""
    c = count_params(ModelConfig.from_preset(preset))
    got_total, got_active = c.total - c.embedding, c.active - c.embedding
    assert abs(got_total - total) / total < 0.02, f"{preset}: {got_total / 1e6:.1f}M vs paper {total / 1e6}M"
    assert abs(got_active - active) / active < 0.02, f"{preset}: {got_active / 1e6:.1f}M vs paper {active / 1e6}M"


def test_count_params_of_a_built_model_matches_meta_count():
    model = small_model("blackmamba")
    assert model.count_params() == count_params(model.config)
    tied = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    assert model.count_params().total == tied


def test_preset_structure_follows_the_papers():
    bm = ModelConfig.from_preset("blackmamba-1.5b")
    assert bm.layer_kinds[:4] == ("mamba", "moe", "mamba", "moe") and bm.padded_vocab_size == 50304
    assert (bm.d_inner, bm.dt_rank, bm.norm, bm.final_norm, bm.tie_embeddings) == (2304, 72, "rmsnorm", "layernorm", True)
    mm = ModelConfig.from_preset("moe-mamba-25m")
    assert (mm.norm, mm.final_norm, mm.tie_embeddings, mm.router, mm.capacity_factor) == (
        "layernorm", "none", False, "switch", 1.0)
    model = Model(ModelConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.embedding.weight
    assert [type(b.mixer).__name__ for b in model.layers] == ["MambaMixer", "MoE", "MambaMixer", "MoE"]


def test_mamba_init_follows_the_released_rule():
    """docs/paper-facts.md#initialization: A = -(1..n) per channel, D = 1, softplus(dt bias) in [1e-4, 0.1]."""
    model = Model(ModelConfig.from_preset("tiny"))
    mixer = model.layers[0].mixer
    n = model.config.d_state
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, n + 1.0)).expand_as(mixer.A_log))
    assert torch.all(mixer.D == 1) and mixer.A_log.dtype == torch.float32
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


# ---------------------------------------------------------------------------------------------------
# recurrent inference


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_step_equals_forward(family, backend):
    model = small_model(family, backend)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    state = model.init_state(2)
    stepped = torch.stack([model.step(ids[:, t], state) for t in range(ids.shape[1])], dim=1)
    assert_close(stepped, full, atol=STEP_ATOL, rtol=STEP_RTOL, what=f"{family}/{backend} step vs forward")


@pytest.mark.parametrize("family", list(FAMILIES))
@given(prompt_len=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_prefill_then_step_equals_forward(family, prompt_len, seed):
    """Prompts shorter than d_conv = 4 included (the released code fails on them)."""
    model = cached_model(family)
    ids = torch.randint(0, 50, (1, prompt_len + 3), generator=torch.Generator().manual_seed(seed))
    full = model(ids).logits
    state = model.init_state(1)
    pre = model(ids[:, :prompt_len], state=state).logits
    rest = torch.stack([model.step(ids[:, t], state) for t in range(prompt_len, ids.shape[1])], dim=1)
    assert_close(torch.cat([pre, rest], 1), full, atol=STEP_ATOL, rtol=STEP_RTOL, what=f"{family} prefill+step")


@pytest.mark.parametrize("family", ["blackmamba", "mamba", "transformer"])
@given(split=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_forward_in_two_chunks_with_state_equals_whole(family, split, seed):
    model = cached_model(family)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(seed))
    state = model.init_state(2)
    a = model(ids[:, :split], state=state).logits
    b = model(ids[:, split:], state=state).logits
    assert state.seq_len == 12
    assert_close(torch.cat([a, b], 1), model(ids).logits, atol=STEP_ATOL, rtol=STEP_RTOL, what="two chunks")


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for s in state.layers if s is not None for t in vars(s).values())


def test_mamba_state_size_does_not_grow_with_position():
    model = small_model("blackmamba")
    state = model.init_state(1)
    before = state_bytes(state)
    ids = torch.randint(0, 50, (1, 30))
    model(ids[:, :5], state=state)
    for t in range(5, 30):
        model.step(ids[:, t], state)
    assert state_bytes(state) == before
    c = model.config
    assert before == 2 * 4 * c.d_inner * (c.d_conv + c.d_state)  # two Mamba layers, fp32


def test_kv_cache_overflow_is_a_clear_error():
    model = small_model("transformer", max_seq_len=8)
    state = model.init_state(1)
    model(torch.zeros(1, 8, dtype=torch.long), state=state)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.step(torch.zeros(1, dtype=torch.long), state)


# ---------------------------------------------------------------------------------------------------
# causality and backends


@pytest.mark.parametrize("family", list(FAMILIES))
@given(t=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_model_is_causal_at_inference(family, t, seed):
    """Changing token t never changes logits before t. (Training-mode Sinkhorn routing looks at the
    whole batch, so BlackMamba's *training* forward is not causal across tokens: see moe.py.)"""
    model = cached_model(family)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (1, 11), generator=g)
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1 + torch.randint(0, 48, (1,), generator=g)) % 50
    a, b = model(ids).logits, model(changed).logits
    # not bitwise: an expert's matmul over a different set of rows may round differently (~1e-7)
    assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=0, what=f"logits before position {t}")
    assert not torch.equal(a[:, t:], b[:, t:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_and_fast_backends_agree_on_the_same_weights(family):
    model = small_model(family, "reference")
    ids = torch.randint(0, 50, (2, 10))
    ref = model(ids).logits
    model.set_backend("fast")
    assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4, what=f"{family} fast vs reference")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_forward_backward_reaches_every_parameter(family):
    model = small_model(family).train()
    ids = torch.randint(0, 50, (2, 10))
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    (loss + out.aux_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"


# ---------------------------------------------------------------------------------------------------
# initialization (docs/paper-facts.md#initialization)


def test_output_projections_have_the_std_their_init_rule_states():
    """Every mixer's last matrix is its family's init divided by sqrt(n_layer); the others are not scaled.

    nn.Linear's default init is U(±1/sqrt(fan_in)), std 1/sqrt(3 fan_in); the experts draw N(0, init_std).
    """
    torch.manual_seed(0)
    c = ModelConfig(d_model=64, n_layer=4, layer_pattern=("mamba", "moe", "attention", "mlp"), n_head=4,
                    d_ff=256, n_experts=4, d_expert=128, init_std=0.02)
    model = Model(c)
    mamba, moe, attn, mlp = (layer.mixer for layer in model.layers)
    scale = c.n_layer**-0.5
    default = lambda fan_in: (3 * fan_in) ** -0.5  # noqa: E731
    expected = {  # name: (weight, std the rule states)
        "mamba out_proj": (mamba.out_proj.weight, default(c.d_inner) * scale),
        "attention out_proj": (attn.out_proj.weight, default(c.d_model) * scale),
        "mlp fc2": (mlp.fc2.weight, default(c.d_ff) * scale),
        "expert w2": (moe.w2, c.init_std * scale),
        "mamba in_proj (not scaled)": (mamba.in_proj.weight, default(c.d_model)),
        "attention qkv (not scaled)": (attn.qkv.weight, default(c.d_model)),
        "mlp fc1 (not scaled)": (mlp.fc1.weight, default(c.d_model)),
        "expert w1 (not scaled)": (moe.w1, c.init_std),
        "embedding": (model.embedding.weight, c.init_std),
    }
    for what, (w, std) in expected.items():
        got = w.detach().float().std().item()
        # >= 4096 samples: the sample std is within ~1.5% of the true one; a missing or doubled
        # 1/sqrt(n_layer) = 1/2 is far outside 5%
        assert abs(got / std - 1) < 0.05, f"{what}: std {got:.5f}, the init rule says {std:.5f}"
    assert torch.all(moe.router.bias == 0), "the Sinkhorn router's bias starts at 0 (Zyphra's _init_weights)"


def test_the_switch_router_has_no_bias():
    model = small_model("moe-mamba")
    assert all(layer.mixer.router.bias is None for layer in model.layers[1::2])


# ---------------------------------------------------------------------------------------------------
# one mixer interface


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_mixer_is_called_the_same_way(family):
    """mixer(h, state=None) -> (out, stats), stats a RouterStats for MoE layers and None otherwise;
    given its state and one token, the same call advances the state (as Model.step does)."""
    from minimamba_moe import RouterStats
    from minimamba_moe.model import ParallelMambaMoE
    from minimamba_moe.moe import MoE

    model = cached_model(family)
    h = torch.randn(2, 5, model.config.d_model)
    for layer in model.layers:
        out, stats = layer.mixer(h)
        assert out.shape == h.shape
        routed = isinstance(layer.mixer, (MoE, ParallelMambaMoE))
        assert isinstance(stats, RouterStats) if routed else stats is None
        state = layer.mixer.init_state(2)
        outs = [layer.mixer(h[:, t : t + 1], state)[0] for t in range(5)]
        assert_close(torch.cat(outs, 1), out, atol=1e-5, rtol=1e-5, what=f"{type(layer.mixer).__name__} token by token")


# ---------------------------------------------------------------------------------------------------
# MoE-Mamba's parallel design


def test_parallel_block_sums_mamba_and_moe_of_one_normalised_input():
    """x -> x + mamba(norm(x)) + moe(norm(x)): one norm, both mixers on its output, outputs added."""
    model = small_model("moe-mamba-parallel")
    block = model.layers[0]
    x = torch.randn(2, 7, model.config.d_model)
    h = block.norm(x)
    expected = x + block.mixer.mamba(h)[0] + block.mixer.moe(h)[0]
    assert_close(block(x)[0], expected, atol=1e-6, rtol=1e-6, what="parallel block")


def test_parallel_parameter_counts_by_hand():
    """Per parallel block: one LayerNorm, one Mamba mixer, one Switch router and E ReLU experts."""
    c = ModelConfig.from_preset("moe-mamba-25m", **SMALL, n_experts=5, layer_pattern=("parallel",))
    d, di, r, n, E, f, V = c.d_model, c.d_inner, c.dt_rank, c.d_state, c.n_experts, c.d_expert, c.padded_vocab_size
    mamba = d * 2 * di + di * c.d_conv + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d
    expert = 2 * d * f  # ReLU: w1 (f, d), w2 (d, f)
    block = 2 * d + mamba + d * E + E * expert  # LayerNorm weight and bias; the Switch router has no bias
    emb = 2 * V * d  # untied embedding and head
    got = count_params(c)
    assert got.total == emb + c.n_layer * block, (got.total, emb + c.n_layer * block)
    assert got.active == emb + c.n_layer * (block - (E - 1) * expert), got.active
    # the sequential design at the same width spends the same parameters on twice the blocks
    seq = count_params(ModelConfig.from_preset("moe-mamba-25m", **{**SMALL, "n_layer": 2 * c.n_layer}, n_experts=5))
    assert seq.total - got.total == c.n_layer * 2 * d  # one more LayerNorm per Mamba/MoE pair
