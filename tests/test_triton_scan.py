"""The Triton selective scan (forward, backward) and decode step, held to reference/.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on
CPU tensors, in float32, with small shapes and small tiles (chunks of 4 positions, blocks of 2
channels) so that chunk and channel-block boundaries are crossed on tiny problems; one test uses
the launcher's real tile sizes. fast/aot/check.py (tests/test_aot_compile.py) compiles the same kernels
for sm_80 / sm_90 with the real sizes.

Tolerance: float32 kernels against the reference run in float64 on the same values: 1e-4 of the
expected tensor's max magnitude (absolute) and 1e-3 relative, as for the CPU path.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")

from minimamba_moe import reference  # noqa: E402
from minimamba_moe.fast.scan_triton import selective_scan_triton  # noqa: E402
from minimamba_moe.fast.state_update_triton import selective_state_update_triton  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.test_fast_scan import F32_ATOL, F32_RTOL, OPTIONAL, cast, flags, make_inputs, run_with_grads, seeds  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
else:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
    DEVICE = "cpu"


def triton_scan(block_l, block_d):
    def fn(**kw):
        kw.pop("return_last_state")
        return selective_scan_triton(**kw, block_l=block_l, block_d=block_d)

    return fn


def to_device(kw):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def assert_triton_matches(seed, kw32, block_l, block_d):
    out, last, grads = run_with_grads(triton_scan(block_l, block_d), to_device(kw32), seed)
    out_r, last_r, grads_r = run_with_grads(reference.selective_scan, cast(kw32, torch.float64), seed)
    assert set(grads) == set(grads_r)
    for name, a, e in [("out", out, out_r), ("last_state", last, last_r)] + [
        (f"grad {k}", grads[k], grads_r[k]) for k in grads_r
    ]:
        a = a.cpu()
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert_close(a, e, atol=F32_ATOL * max(1.0, e.abs().max().item()), rtol=F32_RTOL, what=name)


small = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 11))  # b, d, n, l


@given(seed=seeds, shape=small, flags=flags)
def test_triton_scan_matches_reference(seed, shape, flags):
    kw32 = cast(make_inputs(seed, *shape, flags), torch.float32)
    assert_triton_matches(seed, kw32, block_l=4, block_d=2)


@pytest.mark.parametrize("l", [1, 4, 5])
def test_triton_scan_d_state_16_around_the_chunk(l):
    kw32 = cast(make_inputs(l, 1, 3, 16, l, {k: True for k in (*OPTIONAL, "delta_softplus")}), torch.float32)
    assert_triton_matches(l, kw32, block_l=4, block_d=2)


def test_triton_scan_with_the_launchers_tile_sizes():
    """The real BLOCK_L = 32 and channel block, across two chunks, at the model's init ranges."""
    kw32 = cast(make_inputs(5, 1, 2, 16, 40, {k: True for k in (*OPTIONAL, "delta_softplus")}, realistic=True),
                torch.float32)
    assert_triton_matches(5, kw32, block_l=None, block_d=None)


def test_triton_scan_unused_last_state():
    """Only out used (as in training): the backward gets no last-state gradient and must still match."""
    kw32 = cast(make_inputs(2, 2, 3, 4, 7, {k: True for k in (*OPTIONAL, "delta_softplus")}), torch.float32)
    ref_kw = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in cast(kw32, torch.float64).items()}
    tri_kw = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in to_device(kw32).items()}
    w = torch.randn(2, 3, 7, dtype=torch.float64)
    (reference.selective_scan(**ref_kw) * w).sum().backward()
    out, _ = selective_scan_triton(**tri_kw, block_l=4, block_d=2)
    (out.cpu().double() * w).sum().backward()
    for k, v in ref_kw.items():
        if isinstance(v, torch.Tensor):
            assert_close(tri_kw[k].grad.cpu(), v.grad, atol=F32_ATOL * max(1.0, v.grad.abs().max().item()),
                         rtol=F32_RTOL, what=f"grad {k}")


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 16)), flags=flags)
def test_triton_state_update_matches_reference(seed, shape, flags):
    b, d, n = shape
    kw = cast(make_inputs(seed, b, d, n, 1, flags), torch.float32)
    state = kw["initial_state"] if kw["initial_state"] is not None else torch.zeros(b, d, n)
    args = dict(x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"], B=kw["B"][..., 0], C=kw["C"][..., 0], D=kw["D"],
                z=None if kw["z"] is None else kw["z"][..., 0], dt_bias=kw["delta_bias"],
                dt_softplus=flags["delta_softplus"])
    s_tri, s_ref = state.clone().to(DEVICE), state.double()
    out = selective_state_update_triton(s_tri, **to_device(args))
    out_r = reference.selective_state_update(s_ref, **cast(args, torch.float64))
    assert out.dtype == torch.float32
    assert_close(out.cpu(), out_r, atol=1e-5, rtol=1e-4, what="step out")
    assert_close(s_tri.cpu(), s_ref, atol=1e-5, rtol=1e-4, what="step state (in place)")


def test_triton_state_update_on_a_non_contiguous_state_writes_back():
    b, d, n = 2, 3, 4
    kw = cast(make_inputs(1, b, d, n, 1, {k: True for k in (*OPTIONAL, "delta_softplus")}), torch.float32)
    big = torch.randn(b, d, 2 * n).to(DEVICE)
    state = big[..., ::2]  # a strided view: the kernel works on a copy, which must be copied back
    expected = state.clone().double().cpu()
    args = dict(x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"], B=kw["B"][..., 0], C=kw["C"][..., 0], D=kw["D"],
                z=kw["z"][..., 0], dt_bias=kw["delta_bias"], dt_softplus=True)
    selective_state_update_triton(state, **to_device(args))
    reference.selective_state_update(expected, **cast(args, torch.float64))
    assert_close(big[..., ::2].cpu(), expected, atol=1e-5, rtol=1e-4, what="strided state")
