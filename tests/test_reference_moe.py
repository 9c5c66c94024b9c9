"""Property tests for reference.moe_experts / expert_mlp (float64, tiny sizes).

Laws: one expert is a dense MLP; k = E with softmax gates is the dense mixture; dropped slots add
exactly zero; permuting tokens permutes outputs; idle experts and all-to-one routing are fine;
gradients match finite differences; bad arguments raise ValueError naming the argument.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe.reference import expert_mlp, moe_experts
from minimamba_moe.reference.checks import ACTIVATIONS
from tests.helpers import assert_close

ATOL = 1e-12  # float64, the same products summed in another order
RTOL = 1e-10

seeds = st.integers(0, 2**31 - 1)
activations = st.sampled_from(ACTIVATIONS)
sizes = st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 4))  # T, d, f, E


def make_weights(g, E, d, f, activation):
    rows = f if activation == "relu" else 2 * f
    w1 = torch.randn(E, rows, d, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, d, f, generator=g, dtype=torch.float64)
    return w1, w2


def dense_mlp(x, w1, w2, activation):
    """One expert written independently with F.linear."""
    h = F.linear(x, w1)
    f = w2.shape[1]
    if activation == "swiglu":
        h = F.silu(h[:, :f]) * h[:, f:]
    elif activation == "geglu":
        h = F.gelu(h[:, :f]) * h[:, f:]
    else:
        h = F.relu(h)
    return F.linear(h, w2)


def make_routing(g, T, k, E, drop_fraction=0.0):
    idx = torch.randint(0, E, (T, k), generator=g)
    if drop_fraction:
        idx[torch.rand(T, k, generator=g) < drop_fraction] = -1
    gates = torch.rand(T, k, generator=g, dtype=torch.float64)
    return idx, gates


@given(seeds, sizes, activations)
def test_one_expert_is_a_dense_mlp(seed, size, activation):
    T, d, f, _ = size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1, w2 = make_weights(g, 1, d, f, activation)
    out = moe_experts(x, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1, dtype=torch.float64), w1, w2, activation)
    dense = dense_mlp(x, w1[0], w2[0], activation)
    assert_close(expert_mlp(x, w1[0], w2[0], activation), dense, atol=ATOL, rtol=RTOL, what="expert_mlp")
    assert_close(out, dense, atol=ATOL, rtol=RTOL, what="E=1 moe")


@given(seeds, sizes, activations)
def test_all_experts_with_softmax_gates_is_the_dense_mixture(seed, size, activation):
    T, d, f, E = size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1, w2 = make_weights(g, E, d, f, activation)
    p = torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64), dim=-1)  # (T, E)
    perm = torch.argsort(torch.rand(T, E, generator=g), dim=1)  # each token lists the experts in its own order
    out = moe_experts(x, perm, p.gather(1, perm), w1, w2, activation)
    mixture = sum(p[:, e, None] * dense_mlp(x, w1[e], w2[e], activation) for e in range(E))
    assert_close(out, mixture, atol=ATOL, rtol=RTOL, what="k=E moe vs dense mixture")


@given(seeds, sizes, st.integers(1, 3), activations)
def test_dropped_slots_contribute_exactly_zero(seed, size, k, activation):
    T, d, f, E = size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1, w2 = make_weights(g, E, d, f, activation)
    idx, gates = make_routing(g, T, k, E, drop_fraction=0.4)
    dropped = idx == -1
    out = moe_experts(x, idx, gates, w1, w2, activation)  # dropped slots keep a nonzero gate
    other_idx = torch.where(dropped, torch.randint(0, E, (T, k), generator=g), idx)
    zero_gates = torch.where(dropped, torch.zeros_like(gates), gates)
    same = moe_experts(x, other_idx, zero_gates, w1, w2, activation)
    # Not bitwise: moving a slot to another expert changes that expert's batch of rows, and a
    # matmul's rounding can depend on the batch size. Tokens with every slot dropped are exactly 0.
    assert_close(out, same, atol=ATOL, rtol=RTOL, what="dropped slots vs zero gates")
    fully_dropped = dropped.all(1)
    assert torch.equal(out[fully_dropped], torch.zeros_like(out[fully_dropped]))


@given(seeds, sizes, st.integers(1, 3), activations)
def test_permuting_tokens_permutes_outputs(seed, size, k, activation):
    T, d, f, E = size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1, w2 = make_weights(g, E, d, f, activation)
    idx, gates = make_routing(g, T, k, E, drop_fraction=0.2)
    perm = torch.randperm(T, generator=g)
    out = moe_experts(x, idx, gates, w1, w2, activation)
    out_perm = moe_experts(x[perm], idx[perm], gates[perm], w1, w2, activation)
    assert_close(out_perm, out[perm], atol=ATOL, rtol=RTOL, what="permuted tokens")


@given(seeds, sizes, activations, st.data())
def test_idle_experts_and_all_tokens_on_one_expert(seed, size, activation, data):
    T, d, f, E = size
    e = data.draw(st.integers(0, E - 1), label="the busy expert")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1, w2 = make_weights(g, E, d, f, activation)
    gates = torch.rand(T, 1, generator=g, dtype=torch.float64)
    out = moe_experts(x, torch.full((T, 1), e, dtype=torch.long), gates, w1, w2, activation)  # others idle
    assert_close(out, gates * dense_mlp(x, w1[e], w2[e], activation), atol=ATOL, rtol=RTOL, what="all on one")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moe_gradcheck(activation):
    g = torch.Generator().manual_seed(0)
    T, d, f, E, k = 5, 3, 2, 3, 2
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1, w2 = make_weights(g, E, d, f, activation)
    idx, gates = make_routing(g, T, k, E, drop_fraction=0.2)
    tensors = [t.requires_grad_(True) for t in (x, gates, w1, w2)]
    assert torch.autograd.gradcheck(lambda x, gt, a, b: moe_experts(x, idx, gt, a, b, activation), tensors)


def test_dtype_is_kept():
    g = torch.Generator().manual_seed(0)
    w1, w2 = make_weights(g, 2, 4, 3, "swiglu")
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    idx, gates = make_routing(g, 6, 1, 2)
    out = moe_experts(x.bfloat16(), idx, gates.float(), w1.bfloat16(), w2.bfloat16())
    assert out.dtype == torch.bfloat16


def _args():
    g = torch.Generator().manual_seed(0)
    w1, w2 = make_weights(g, 3, 4, 2, "swiglu")
    idx, gates = make_routing(g, 5, 2, 3)
    return dict(x=torch.randn(5, 4, dtype=torch.float64), expert_idx=idx, gates=gates, w1=w1, w2=w2)


# x sets (T, d), expert_idx sets k, w2 sets (E, f); each mutation makes the named argument the odd one.
MUTATIONS = {
    "x": lambda t: t[0],  # (d,): a missing token dimension
    "expert_idx": lambda t: t[:-1],  # T - 1 rows
    "gates": lambda t: t[:, :-1],  # k - 1 slots
    "w1": lambda t: t[..., :-1],  # d - 1 inputs
    "w2": lambda t: t[:, :-1],  # d - 1 outputs
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_bad_shape_names_argument(name):
    args = _args()
    args[name] = MUTATIONS[name](args[name])
    with pytest.raises(ValueError, match=rf"^{name} "):
        moe_experts(**args)


def test_bad_activation_and_index_raise():
    args = _args()
    with pytest.raises(ValueError, match=r"^activation must be one of"):
        moe_experts(**args, activation="gelu")
    with pytest.raises(ValueError, match=r"^w1 "):
        moe_experts(**args, activation="relu")  # w1 has 2f rows, relu wants f
    with pytest.raises(ValueError, match=r"^expert_idx values"):
        moe_experts(**{**args, "expert_idx": torch.full((5, 2), 3)})
    with pytest.raises(ValueError, match=r"^expert_idx must be an integer"):
        moe_experts(**{**args, "expert_idx": args["expert_idx"].double()})
