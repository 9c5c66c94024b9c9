"""Laws of the MoE layer and its routers: conservation of token-slots, capacity, gates, equivariance."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe import ModelConfig
from minimamba_moe.config import ACTIVATIONS
from minimamba_moe.moe import MLP, MoE
from minimamba_moe.reference import sinkhorn
from tests.helpers import assert_close


def make_moe(seed=0, **fields) -> MoE:
    base = dict(d_model=16, d_expert=12, n_experts=4, top_k=1, router="switch", mlp_activation="relu")
    config = ModelConfig(**{**base, **fields})
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # sharp enough that routing is not a tie
    return moe


moe_fields = st.fixed_dictionaries({
    "n_experts": st.integers(1, 6),
    "router": st.sampled_from(["switch", "sinkhorn"]),
    "mlp_activation": st.sampled_from(ACTIVATIONS),
    "seed": st.integers(0, 2**16),
}).flatmap(lambda d: st.fixed_dictionaries({
    **{k: st.just(v) for k, v in d.items()},
    "top_k": st.integers(1, d["n_experts"]),
    "capacity_factor": st.none() if d["router"] == "sinkhorn" else st.one_of(st.none(), st.floats(0.25, 2.0)),
}))


@given(fields=moe_fields, T=st.integers(1, 40), training=st.booleans())
def test_every_token_slot_is_processed_or_counted_as_dropped(fields, T, training):
    moe = make_moe(**fields).train(training)
    _, stats = moe(torch.randn(1, T, 16))
    k, E = fields["top_k"], fields["n_experts"]
    assert stats.tokens_per_expert.shape == (E,)
    assert int(stats.tokens_per_expert.sum() + stats.dropped) == T * k
    cf = fields["capacity_factor"]
    if training and cf is not None:
        assert int(stats.tokens_per_expert.max()) <= int(cf * T * k / E)
    else:
        assert int(stats.dropped) == 0, "only training with a capacity factor drops tokens"


@given(fields=moe_fields, T=st.integers(1, 30))
def test_routing_gives_k_distinct_experts_with_valid_gates(fields, T):
    from minimamba_moe.moe import route_sinkhorn, route_switch

    moe = make_moe(**fields)
    logits = moe.router(torch.randn(T, 16)).float()
    route = route_switch if fields["router"] == "switch" else route_sinkhorn
    for training in (False, True):
        idx, gates, _ = route(logits, moe.config, training)
        assert idx.shape == gates.shape == (T, fields["top_k"])
        kept = idx >= 0
        assert torch.all(gates >= 0) and torch.all(gates[~kept] == 0)
        chosen = idx.clone()
        chosen[~kept] = -torch.arange(1, int((~kept).sum()) + 1)  # make dropped slots distinct
        assert all(len(set(row.tolist())) == len(row) for row in chosen), "an expert chosen twice for a token"
        if fields["router"] == "switch":  # chosen softmax probabilities: sum <= 1
            assert torch.all(gates.sum(-1) <= 1 + 1e-6)
        else:  # sigmoid gates
            assert torch.all(gates < 1)


def test_normalize_top_k_makes_gates_sum_to_one():
    moe = make_moe(n_experts=5, top_k=3, normalize_top_k=True)
    from minimamba_moe.moe import route_switch

    _, gates, _ = route_switch(moe.router(torch.randn(20, 16)).float(), moe.config, training=False)
    assert_close(gates.sum(-1), torch.ones(20), atol=1e-6, rtol=0, what="gate sums")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_equals_the_dense_mlp(activation):
    """E = 1, switch router: the softmax over one expert is 1, so the layer is the dense MLP."""
    moe = make_moe(n_experts=1, mlp_activation=activation, d_expert=12)
    mlp = MLP(ModelConfig(d_model=16, d_ff=12, mlp_activation=activation))
    with torch.no_grad():
        mlp.fc1.weight.copy_(moe.w1[0])
        mlp.fc2.weight.copy_(moe.w2[0])
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert_close(moe.double()(x)[0], mlp.double()(x)[0], atol=1e-12, rtol=1e-12, what="MoE(E=1) vs MLP")


@given(fields=moe_fields, T=st.integers(2, 25), seed=st.integers(0, 1000))
def test_permuting_tokens_permutes_outputs(fields, T, seed):
    moe = make_moe(**fields).eval().double()  # no capacity pressure at inference
    x = torch.randn(T, 16, dtype=torch.float64)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    y, _ = moe(x[None])
    y_perm, _ = moe(x[perm][None])
    assert_close(y_perm[0], y[0][perm], atol=1e-9, rtol=1e-9, what="permuted tokens")  # fp64; row order changes matmul blocking


def test_sinkhorn_router_trains_on_the_balanced_choice_and_infers_on_the_sigmoid():
    moe = make_moe(router="sinkhorn", n_experts=4, sinkhorn_stopping="marginal", sinkhorn_tol=1e-6)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # every token prefers expert 0
    x = torch.randn(1, 64, 16)
    logits = moe.router(x[0]).float()
    _, train_stats = moe.train()(x)
    P, _ = sinkhorn(logits, stopping="marginal", tol=1e-6, max_iters=100)
    assert torch.equal(train_stats.tokens_per_expert, torch.bincount(P.argmax(1), minlength=4))
    _, eval_stats = moe.eval()(x)
    assert torch.equal(eval_stats.tokens_per_expert, torch.bincount(logits.argmax(1), minlength=4))
    assert train_stats.tokens_per_expert.max() < eval_stats.tokens_per_expert.max(), "Sinkhorn did not balance"


def test_gradient_reaches_the_router_only_through_the_gate():
    moe = make_moe(router="sinkhorn").train()
    y, _ = moe(torch.randn(1, 32, 16))
    y.square().sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_switch_aux_loss_with_uniform_router_probabilities_equals_its_coefficient():
    """alpha * E * sum_e mean_t p_e * f_e with p_e = 1/E is alpha * sum_e f_e = alpha, however tokens go."""
    moe = make_moe(n_experts=6, aux_loss_coef=0.01)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, stats = moe.train()(torch.randn(1, 30, 16))
    assert abs(stats.aux_loss.item() - 0.01) < 1e-7


@pytest.mark.parametrize("router", ["switch", "sinkhorn"])
def test_router_logits_are_computed_in_fp32_under_bf16_autocast(router):
    """Routing is decided in fp32 (Switch's selective precision): autocast must not round the router matmul."""
    moe = make_moe(router=router, n_experts=6)
    x = torch.randn(1, 40, 16)
    bias = None if moe.router.bias is None else moe.router.bias.detach()
    exact = torch.nn.functional.linear(x[0], moe.router.weight.detach(), bias)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.router_logits(x[0])
        _, stats = moe.eval()(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, exact), f"max abs error {(logits - exact).abs().max().item():.3g}"
    assert torch.equal(stats.tokens_per_expert, torch.bincount(exact.argmax(1), minlength=6))


def test_router_stats_report_the_sinkhorn_passes():
    moe = make_moe(router="sinkhorn", sinkhorn_stopping="marginal", sinkhorn_tol=1e-6, sinkhorn_max_iters=50)
    x = torch.randn(1, 64, 16)
    _, stats = moe.train()(x)
    _, n_iters = sinkhorn(moe.router_logits(x[0]), stopping="marginal", tol=1e-6, max_iters=50)
    assert stats.sinkhorn_iters.dtype == torch.int64 and int(stats.sinkhorn_iters) == int(n_iters) >= 1
    assert int(moe.eval()(x)[1].sinkhorn_iters) == 0, "no Sinkhorn at inference"
    assert int(make_moe(router="switch").train()(x)[1].sinkhorn_iters) == 0, "the switch router runs no Sinkhorn"
