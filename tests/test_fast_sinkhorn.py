"""fast.sinkhorn (CPU path) and the fused Triton kernel (interpreter, CPU tensors) against the reference.

- The CPU path evaluates the reference's expressions in the reference's order: P and the iteration
  count must be *identical*, for every init and stopping rule.
- The Triton kernel sums in blocks (another order), in fp32: P within 2e-5 relative to P's largest
  entry (a pass loses ~1e-7 relative; the drawn cases run <= MAX_ITERS passes), the same routes
  wherever the reference's top-2 entries of a row differ by more than 1e-3 relative, and the same
  iteration count wherever the reference's count is not on a knife edge (unchanged with tol moved
  by ±1%: rounding moves the error by far less than that).
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from minimamba_moe import fast, reference
from minimamba_moe.reference.checks import SINKHORN_INITS, SINKHORN_STOPPINGS
from tests.helpers import assert_close

MAX_ITERS = 40
P_RTOL = 2e-5
ROUTE_GAP = 1e-3
TOL_WIGGLE = 1e-2

inits = st.sampled_from(SINKHORN_INITS)
rules = st.sampled_from(SINKHORN_STOPPINGS)


def random_logits(seed, T, E, sigma, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (sigma * torch.randn(T, E, generator=g, dtype=torch.float64)).to(dtype)


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 300), E=st.integers(1, 64), sigma=st.floats(0.1, 5.0),
       init=inits, stopping=rules, dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from([1.0, 2.0]))
def test_cpu_path_is_the_reference_exactly(seed, T, E, sigma, init, stopping, dtype, scale):
    logits = random_logits(seed, T, E, sigma, dtype)
    P, n = fast.sinkhorn(logits, init, stopping, 1e-4, 200, 1e-8, scale)
    P_ref, n_ref = reference.sinkhorn(logits, init, stopping, 1e-4, 200, 1e-8, scale)
    assert P.dtype == P_ref.dtype and n.dtype == n_ref.dtype == torch.int64 and n.shape == ()
    assert int(n) == int(n_ref)
    assert torch.equal(P, P_ref)


def knife_edge(logits, init, stopping, tol, max_iters):
    """True when moving tol by ±TOL_WIGGLE changes the reference's iteration count."""
    counts = {int(reference.sinkhorn(logits, init, stopping, tol * f, max_iters)[1]) for f in
              (1 - TOL_WIGGLE, 1 + TOL_WIGGLE)}
    return len(counts) > 1


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 80), E=st.integers(1, 64), sigma=st.floats(0.1, 3.0),
       init=inits, stopping=rules, tol=st.sampled_from([1e-4, 1e-3]))
def test_triton_kernel_matches_reference(seed, T, E, sigma, init, stopping, tol):
    pytest.importorskip("triton")
    from minimamba_moe.fast.sinkhorn_triton import sinkhorn_triton

    logits = random_logits(seed, T, E, sigma)
    assume(not knife_edge(logits, init, stopping, tol, MAX_ITERS))
    P, n = sinkhorn_triton(logits, init, stopping, tol, MAX_ITERS)
    P_ref, n_ref = reference.sinkhorn(logits, init, stopping, tol, MAX_ITERS)
    assert int(n) == int(n_ref), f"passes: fused {int(n)}, reference {int(n_ref)}"
    assert_close(P, P_ref, atol=P_RTOL * P_ref.max().item(), rtol=0.0, what="P")
    top2 = P_ref.topk(min(2, E), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > ROUTE_GAP * top2[:, 0]) | (E == 1)
    assert torch.equal(P.argmax(1)[clear], P_ref.argmax(1)[clear]), "routes differ"


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(64, 200), E=st.sampled_from([8, 16, 64]),
       sigma=st.floats(0.1, 5.0))
def test_triton_released_rule_counts_passes_like_the_reference(seed, T, E, sigma):
    """The released rule (blackmamba init, absolute tol 1e-4) stops after as many passes as the
    reference's: one for real batch sizes (test_released_rule_stops_after_one_pass), and at these
    small T (kept small for the interpreter) sometimes two or three."""
    pytest.importorskip("triton")
    from minimamba_moe.fast.sinkhorn_triton import sinkhorn_triton

    logits = random_logits(seed, T, E, sigma)
    _, n = sinkhorn_triton(logits, "blackmamba", "absolute", 1e-4, MAX_ITERS)
    assert int(n) == int(reference.sinkhorn(logits)[1])


@given(seed=st.integers(0, 2**31 - 1), cap=st.integers(1, 4), stopping=rules)
def test_triton_respects_the_iteration_cap_and_bf16_logits(seed, cap, stopping):
    pytest.importorskip("triton")
    from minimamba_moe.fast.sinkhorn_triton import sinkhorn_triton

    logits = random_logits(seed, 33, 5, 3.0, torch.bfloat16)  # sharp: far from converged after `cap` passes
    P, n = sinkhorn_triton(logits, "uniform", stopping, 1e-7, cap)
    P_ref, n_ref = reference.sinkhorn(logits, "uniform", stopping, 1e-7, cap)
    assert int(n) == int(n_ref) == cap
    assert_close(P, P_ref, atol=P_RTOL * P_ref.max().item(), rtol=0.0, what="P after the cap")
    assert_close(P.sum(0), torch.full((5,), 1 / 5), atol=1e-5, rtol=0.0, what="columns sum to 1/E")


@pytest.mark.parametrize("kwargs", [dict(init="ones"), dict(stopping="relative"), dict(max_iters=0)])
def test_bad_arguments_raise_like_the_reference(kwargs):
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError) as want:
        reference.sinkhorn(logits, **kwargs)
    with pytest.raises(ValueError) as got:
        fast.sinkhorn(logits, **kwargs)
    assert str(got.value) == str(want.value)
