"""fast.moe_experts (CPU path) against reference.moe_experts, and the laws of the routing bookkeeping.

Tolerances (outputs are O(1): weights ~ N(0, 1/fan_in), gates in [0, 1)):
- float64 (the per-expert matmul fallback, grouped_mm has no float64): 1e-10 abs/rel, rounding only.
- float32 (torch grouped_mm when rows are 16-byte aligned, the fallback otherwise): 2e-5 abs, 1e-4
  rel — both sides compute the same products, summed in another order.
- bfloat16: 3e-2 abs and rel on outputs, 5e-2 on gradients (relative to the gradient's scale):
  the experts run in bf16 (8 mantissa bits, ~4e-3 per rounding) on both sides, but the backward
  rounds in other places (dgate = <dy @ w2, a> instead of <dy, y>).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe import fast, reference
from minimamba_moe.fast import moe_cpu
from minimamba_moe.fast.routing import group_by_expert
from tests.helpers import assert_close

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4)}
ROUTINGS = ("random", "one_expert", "capacity", "heavy_drop")


def make_case(seed, T, d, f, E, k, activation, routing, dtype=torch.float64, cf=1.0):
    """Inputs for moe_experts with k distinct experts per token, then the drawn dropping rule."""
    g = torch.Generator().manual_seed(seed)
    F1 = f if activation == "relu" else 2 * f
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, F1, d, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(E, d, f, generator=g, dtype=torch.float64) / f**0.5
    gates = torch.rand(T, k, generator=g, dtype=torch.float64)
    expert_idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices  # (T, k) distinct experts
    if routing == "one_expert":  # every token's first choice is expert 0: the others may get none
        expert_idx = torch.stack([(expert_idx[:, j] - expert_idx[:, 0]) % E for j in range(k)], 1)
    if routing in ("capacity", "heavy_drop"):  # Switch capacity, slot-major arrival order
        capacity = int((0.25 if routing == "heavy_drop" else cf) * T * k / E)
        onehot = torch.nn.functional.one_hot(expert_idx.t().reshape(-1), E)  # (k*T, E)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1
        keep = (position < capacity).view(k, T).t()
        expert_idx = torch.where(keep, expert_idx, torch.full_like(expert_idx, -1))
    cast = [t.to(dtype) for t in (x, gates, w1, w2)]
    return cast[0], expert_idx, cast[1], cast[2], cast[3]


def run(op, x, expert_idx, gates, w1, w2, activation, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, w1, w2)]
    out = op(leaves[0], expert_idx, leaves[1], leaves[2], leaves[3], activation)
    if not out.requires_grad:  # the reference with every slot dropped: a constant zero output
        return [out] + [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True, materialize_grads=True)
    return [out] + list(grads)  # out, dx, dgates, dw1, dw2


NAMES = ("out", "dx", "dgates", "dw1", "dw2")
cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "T": st.integers(1, 40),
    "d": st.sampled_from([4, 6, 8, 16, 12]),  # 6, 12 are not 16-byte aligned: the fallback path
    "f": st.sampled_from([4, 5, 8, 16]),
    "E": st.integers(1, 8),
    "activation": st.sampled_from(reference.checks.ACTIVATIONS),
    "routing": st.sampled_from(ROUTINGS),
    "cf": st.floats(0.1, 2.0),
}).flatmap(lambda c: st.fixed_dictionaries({**{n: st.just(v) for n, v in c.items()},
                                            "k": st.integers(1, c["E"])}))


def check_against_reference(case, dtype, atol, rtol, grad_tol=None):
    x, idx, gates, w1, w2 = make_case(**case, dtype=dtype)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = run(fast.moe_experts, x, idx, gates, w1, w2, case["activation"], dout)
    want = run(reference.moe_experts, x, idx, gates, w1, w2, case["activation"], dout)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype, name
        scale = 1.0 if name == "out" or grad_tol is None else max(1.0, b.abs().max().item())
        tol = (atol, rtol) if name == "out" or grad_tol is None else (grad_tol * scale, grad_tol)
        assert_close(a, b, atol=tol[0], rtol=tol[1], what=f"{name} {case}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=cases)
def test_fast_matches_reference_outputs_and_gradients(dtype, case):
    check_against_reference(case, dtype, *TOL[dtype])


@given(case=cases)
def test_fast_matches_reference_bf16(case):
    check_against_reference(case, torch.bfloat16, 3e-2, 3e-2, grad_tol=5e-2)


@pytest.mark.parametrize("block_bytes", [256, moe_cpu.BLOCK_BYTES])  # 256: a few rows, blocks straddle experts
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=cases)
def test_forward_without_gradients_matches_reference(block_bytes, dtype, case):
    """No gradient needed: the blocked forward (moe_experts_no_grad), held to the reference."""
    x, idx, gates, w1, w2 = make_case(**case, dtype=dtype)
    saved, moe_cpu.BLOCK_BYTES = moe_cpu.BLOCK_BYTES, block_bytes
    try:
        with torch.no_grad():
            out = fast.moe_experts(x, idx, gates, w1, w2, case["activation"])
    finally:
        moe_cpu.BLOCK_BYTES = saved
    want = reference.moe_experts(x, idx, gates, w1, w2, case["activation"])
    assert_close(out, want, atol=TOL[dtype][0], rtol=TOL[dtype][1], what=f"no-grad out {case}")


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), E=st.integers(1, 5),
       activation=st.sampled_from(reference.checks.ACTIVATIONS))
def test_k_equals_E_is_the_dense_mixture(seed, T, E, activation):
    """Every token to every expert: out[t] = Σ_e gates[t, e] * expert_e(x[t]), computed densely."""
    x, idx, gates, w1, w2 = make_case(seed, T, 8, 4, E, E, activation, "random")
    out = fast.moe_experts(x, idx, gates, w1, w2, activation)
    dense = torch.stack([reference.expert_mlp(x, w1[e], w2[e], activation) for e in range(E)], 1)  # (T, E, d)
    weight = torch.zeros(T, E, dtype=x.dtype).scatter_(1, idx, gates)  # gate of expert e for token t
    assert_close(out, (weight[:, :, None] * dense).sum(1), atol=1e-10, rtol=1e-10, what="k = E")


@given(case=cases, perm_seed=st.integers(0, 2**31 - 1))
def test_permuting_tokens_permutes_outputs(case, perm_seed):
    x, idx, gates, w1, w2 = make_case(**case)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    out = fast.moe_experts(x, idx, gates, w1, w2, case["activation"])
    out_p = fast.moe_experts(x[perm], idx[perm], gates[perm], w1, w2, case["activation"])
    assert_close(out_p, out[perm], atol=1e-12, rtol=1e-12, what="permuted")


@given(case=cases)
def test_dropped_slots_contribute_zero_whatever_their_gate(case):
    x, idx, gates, w1, w2 = make_case(**{**case, "routing": "heavy_drop"})
    dropped = idx < 0
    loud = torch.where(dropped, torch.full_like(gates, 1e6), gates)  # a huge gate on every dropped slot
    quiet = torch.where(dropped, torch.zeros_like(gates), gates)
    loud.requires_grad_(True)
    out = fast.moe_experts(x, idx, loud, w1, w2, case["activation"])
    assert_close(out, fast.moe_experts(x, idx, quiet, w1, w2, case["activation"]), atol=1e-12, rtol=1e-12,
                 what="dropped")
    (dgates,) = torch.autograd.grad(out.sum(), loud)
    assert (dgates[dropped] == 0).all(), "a dropped slot's gate must get no gradient"


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 50), E=st.integers(1, 9), k=st.integers(1, 4))
def test_routing_groups_every_kept_slot_by_expert(seed, T, E, k):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, E, (T, k), generator=g)
    r = group_by_expert(idx, E)
    flat = idx.reshape(-1)
    assert sorted(r.order.tolist()) == list(range(T * k)), "order is a permutation of the slots"
    assert torch.equal(r.counts, torch.stack([(flat == e).sum() for e in range(E)]) if E else r.counts)
    assert r.offsets[0] == 0 and torch.equal(r.offsets[1:] - r.offsets[:-1], r.counts)
    assert int(r.offsets[-1]) == int((flat >= 0).sum()), "dropped slots sort after every expert"
    for e in range(E):
        rows = r.order[r.offsets[e]:r.offsets[e + 1]]
        assert (flat[rows] == e).all() and (rows[1:] > rows[:-1]).all(), "expert e's slots, in token order"
    assert torch.equal(r.token, r.order // k)


def test_bad_arguments_raise_like_the_reference():
    x, idx, gates, w1, w2 = make_case(0, 5, 8, 4, 3, 2, "swiglu", "random")
    for bad in ([x, idx + 5, gates, w1, w2, "swiglu"], [x, idx, gates, w1, w2, "tanh"],
                [x, idx.float(), gates, w1, w2, "swiglu"], [x, idx, gates, w1, w2, "relu"],
                [x, idx - 3, gates, w1, w2, "swiglu"]):
        with pytest.raises(ValueError) as want:
            reference.moe_experts(*bad)
        with pytest.raises(ValueError) as got:
            fast.moe_experts(*bad)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_an_expert_index_equal_to_n_experts_raises_in_both_backends(requires_grad):
    """The boundary of [0, E): E itself is out of range (an off-by-one would read past the last expert)."""
    x, idx, gates, w1, w2 = make_case(0, 6, 8, 4, 3, 2, "swiglu", "random")
    E = w2.shape[0]
    x.requires_grad_(requires_grad)
    idx = idx.clone()
    idx[2, 1] = E
    with pytest.raises(ValueError) as want:
        reference.moe_experts(x, idx, gates, w1, w2, "swiglu")
    assert f"[0, {E})" in str(want.value) and f", {E}]" in str(want.value)
    with pytest.raises(ValueError) as got:
        fast.moe_experts(x, idx, gates, w1, w2, "swiglu")
    assert str(got.value) == str(want.value)
    idx[2, 1] = E - 1  # the last expert is in range
    args = (x, idx, gates, w1, w2, "swiglu")
    assert_close(fast.moe_experts(*args), reference.moe_experts(*args), atol=1e-5, rtol=1e-5, what="last expert")


def test_routing_never_reads_device_values_on_the_host():
    """On the 'meta' device tensors have shapes but no values: .item(), .tolist(), boolean-mask
    indexing and bincount all raise there, so running the bookkeeping on meta proves it has no
    host sync (what a GPU would pay once per layer), with every output's shape data-independent."""
    r = group_by_expert(torch.empty(7, 3, dtype=torch.int64, device="meta"), 5)
    assert [tuple(t.shape) for t in r] == [(21,), (21,), (21,), (5,), (6,)]
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.empty(3, device="meta").sum().item()  # the check itself has teeth
