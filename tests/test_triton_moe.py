"""The Triton MoE kernels (fast/moe_triton*.py) against reference.moe_experts, run by the Triton
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).

The interpreter runs fp32 only and slowly, so the shapes are small — but chosen to cross every
boundary the kernels mask: T * k around the 16- and 64-row blocks (blocks straddling experts),
f and d around the 64-column and 32-deep tiles, experts with no rows, all rows on one expert,
dropped slots. Tolerance: 2e-5 abs / 1e-4 rel (fp32, tl.dot with input_precision="ieee"; the
only differences are summation order and fp32 atomics adding a token's k slots in any order).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe import reference
from tests.helpers import assert_close
from tests.test_fast_moe import NAMES, ROUTINGS, make_case, run

pytest.importorskip("triton")
from minimamba_moe.fast.moe_triton import moe_experts_triton  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4

cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "T": st.sampled_from([1, 3, 9, 17, 40]),
    "d": st.sampled_from([8, 33]),  # 33: a partial 32-deep K tile and a partial 64-wide output tile
    "f": st.sampled_from([5, 70]),  # 70: two hidden-unit blocks, the second partial
    "E": st.integers(1, 6),
    "activation": st.sampled_from(reference.checks.ACTIVATIONS),
    "routing": st.sampled_from(ROUTINGS),
    "cf": st.floats(0.1, 2.0),
}).flatmap(lambda c: st.fixed_dictionaries({**{n: st.just(v) for n, v in c.items()},
                                            "k": st.integers(1, min(c["E"], 3))}))


@given(case=cases)
def test_triton_matches_reference_outputs_and_gradients(case):
    x, idx, gates, w1, w2 = make_case(**case, dtype=torch.float32)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got = run(moe_experts_triton, x, idx, gates, w1, w2, case["activation"], dout)
    want = run(reference.moe_experts, x, idx, gates, w1, w2, case["activation"], dout)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, atol=ATOL, rtol=RTOL, what=f"{name} {case}")


@given(seed=st.integers(0, 2**31 - 1), T=st.sampled_from([2, 5]), E=st.integers(1, 4))
def test_triton_k_equals_E_is_the_dense_mixture(seed, T, E):
    x, idx, gates, w1, w2 = make_case(seed, T, 8, 5, E, E, "geglu", "random", dtype=torch.float32)
    out = moe_experts_triton(x, idx, gates, w1, w2, "geglu")
    dense = torch.stack([reference.expert_mlp(x, w1[e], w2[e], "geglu") for e in range(E)], 1)  # (T, E, d)
    weight = torch.zeros(T, E).scatter_(1, idx, gates)
    assert_close(out, (weight[:, :, None] * dense).sum(1), atol=ATOL, rtol=RTOL, what="k = E")


@given(seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 2**31 - 1))
def test_triton_permuting_tokens_permutes_outputs(seed, perm_seed):
    x, idx, gates, w1, w2 = make_case(seed, 19, 8, 5, 4, 2, "swiglu", "capacity", dtype=torch.float32)
    perm = torch.randperm(19, generator=torch.Generator().manual_seed(perm_seed))
    out = moe_experts_triton(x, idx, gates, w1, w2, "swiglu")
    out_p = moe_experts_triton(x[perm], idx[perm], gates[perm], w1, w2, "swiglu")
    assert_close(out_p, out[perm], atol=ATOL, rtol=RTOL, what="permuted")


def test_triton_dropped_slots_contribute_zero_and_get_no_gradient():
    x, idx, gates, w1, w2 = make_case(3, 17, 8, 5, 3, 2, "relu", "heavy_drop", dtype=torch.float32)
    dropped = idx < 0
    assert dropped.any() and (~dropped).any()
    loud = torch.where(dropped, torch.full_like(gates, 1e6), gates).requires_grad_(True)
    out = moe_experts_triton(x, idx, loud, w1, w2, "relu")
    quiet = torch.where(dropped, torch.zeros_like(gates), gates)
    assert_close(out, moe_experts_triton(x, idx, quiet, w1, w2, "relu"), atol=0, rtol=0, what="dropped")
    (dgates,) = torch.autograd.grad(out.sum(), loud)
    assert (dgates[dropped] == 0).all()


def test_triton_every_slot_dropped_gives_zeros():
    x, idx, gates, w1, w2 = make_case(0, 4, 8, 5, 3, 1, "swiglu", "random", dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, w1, w2)]
    out = moe_experts_triton(leaves[0], torch.full_like(idx, -1), leaves[1], leaves[2], leaves[3], "swiglu")
    assert (out == 0).all()
    for grad in torch.autograd.grad(out, leaves, torch.ones_like(out)):
        assert (grad == 0).all()
