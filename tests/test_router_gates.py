"""The gate each router multiplies an expert's output by, as a law of the whole MoE layer.

BlackMamba's Sinkhorn router (docs/paper-facts.md#router-and-sinkhorn): the gate is the sigmoid of
the chosen expert's *own* logit, whichever way the expert was chosen (the Sinkhorn-balanced
choice in training, the argmax at inference). A softmax over the experts instead of that sigmoid
would give the same argmax and train as well, so only a law on the layer's output catches it.
Switch (MoE-Mamba): the gate is the softmax probability of the chosen expert.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe import ModelConfig
from minimamba_moe.moe import MoE, route_sinkhorn
from minimamba_moe.reference.moe import expert_mlp
from tests.helpers import assert_close


def layer(router: str, seed: int, backend: str = "reference") -> MoE:
    torch.manual_seed(seed)
    extra = dict(capacity_factor=None) if router == "switch" else {}
    c = ModelConfig(d_model=16, n_experts=5, d_expert=12, router=router, mlp_activation="swiglu",
                    backend=backend, **extra)
    moe = MoE(c)
    with torch.no_grad():  # sharper logits than the init gives: gates far from 1/2 and 1/E
        moe.router.weight.mul_(8.0)
        if moe.router.bias is not None:
            moe.router.bias.normal_(0, 1.0)
    return moe


def per_token_outputs(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """(T, E, d): every expert's ungated output for every token."""
    c = moe.config
    return torch.stack([expert_mlp(x, moe.w1[e], moe.w2[e], c.mlp_activation) for e in range(c.n_experts)], 1)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("training", [True, False])
@given(seed=st.integers(0, 2**16), tokens=st.integers(3, 40))
def test_sinkhorn_gate_is_the_sigmoid_of_the_chosen_experts_own_logit(backend, training, seed, tokens):
    moe = layer("sinkhorn", seed, backend).train(training)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        out, _ = moe(x)
        logits = moe.router_logits(x)
        chosen = route_sinkhorn(logits, moe.config, training)[0][:, 0]  # the layer's own choice
        if not training:
            assert torch.equal(chosen, logits.argmax(-1))
        ys = per_token_outputs(moe, x)
    rows = torch.arange(tokens)
    gate = torch.sigmoid(logits[rows, chosen])
    assert_close(out, gate[:, None] * ys[rows, chosen], atol=1e-5, rtol=1e-5,
                 what="Sinkhorn MoE output vs sigmoid(own logit) x chosen expert")
    softmax_gate = torch.softmax(logits, -1)[rows, chosen]
    assert (gate - softmax_gate).abs().max() > 1e-3  # the law tells the two gates apart here


@given(seed=st.integers(0, 2**16))
def test_switch_gate_is_the_softmax_probability_of_the_chosen_expert(seed):
    moe = layer("switch", seed).eval()
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        out, _ = moe(x)
        probs = torch.softmax(moe.router_logits(x), -1)
        ys = per_token_outputs(moe, x)
    rows, chosen = torch.arange(24), probs.argmax(-1)
    assert_close(out, probs[rows, chosen][:, None] * ys[rows, chosen], atol=1e-5, rtol=1e-5,
                 what="Switch MoE output vs softmax(chosen) x chosen expert")
