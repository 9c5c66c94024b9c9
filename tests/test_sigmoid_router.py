"""The "sigmoid" router (the router ablation's no-balancing baseline): top-k of the logits in
training as at inference, gate = sigmoid(logit), no auxiliary loss, nothing dropped."""

from types import SimpleNamespace
from unittest import mock

import torch
from hypothesis import given, strategies as st

from minimamba_moe.config import ModelConfig
from minimamba_moe.moe import MoE
from minimamba_moe.ops import get_ops


@given(seed=st.integers(0, 2**16), top_k=st.integers(1, 3), training=st.booleans())
def test_sigmoid_router_picks_argmax_with_sigmoid_gate(seed, top_k, training):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_experts=5, top_k=top_k, d_expert=8, router="sigmoid", backend="reference")
    moe = MoE(cfg).train(training)
    x = torch.randn(3, 7, 16)
    logits = moe.router(x.reshape(-1, 16)).float()  # (T, E)
    captured = {}
    ops = get_ops(cfg.backend)

    def spy(x, expert_idx, gates, w1, w2, act):  # record what the router hands to the experts
        captured.update(idx=expert_idx, gates=gates)
        return ops.moe_experts(x, expert_idx, gates, w1, w2, act)

    with mock.patch("minimamba_moe.moe.get_ops", lambda backend: SimpleNamespace(moe_experts=spy)):
        _, stats = moe(x)
    expected = logits.topk(top_k, dim=-1).indices
    assert torch.equal(captured["idx"], expected)
    assert torch.equal(captured["idx"][:, 0], logits.argmax(-1))
    torch.testing.assert_close(captured["gates"], torch.sigmoid(logits).gather(1, expected))
    assert stats.aux_loss.item() == 0.0 and stats.dropped.item() == 0 and stats.sinkhorn_iters.item() == 0
    assert stats.tokens_per_expert.sum().item() == 21 * top_k


def test_sigmoid_router_gradient_reaches_the_router():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_experts=4, d_expert=8, router="sigmoid", backend="reference")
    moe = MoE(cfg)
    out, _ = moe(torch.randn(2, 5, 16))
    out.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.router.bias is not None  # BlackMamba's router, biased, without Sinkhorn
