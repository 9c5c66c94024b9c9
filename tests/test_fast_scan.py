"""fast/ selective scan (CPU path), decode step and causal conv held to reference/.

Laws: for drawn shapes and flags, fast equals reference on the output, the last state and the
gradient of every input (including the gradient flowing back through the returned last state).

Tolerances:
- float64 inputs: the same math in another order, so 1e-10 relative to the tensor's scale.
- float32 inputs, compared with the reference run in float64 on the same values: 1e-4 of the
  expected tensor's max magnitude (absolute) and 1e-3 relative. Gradients sum over up to ~200
  positions, hence the scale-relative absolute tolerance.
- bfloat16 inputs (u, delta, B, C, z; A, D, delta_bias fp32 as in the model), compared with the
  float64 reference on the bf16 values: the output and the gradients are rounded to bf16
  (2^-8 relative), so 2e-2 of the scale absolute and 2e-2 relative. The loss weights are
  bf16-representable, so both sides receive the same gradient at the output.
"""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minimamba_moe.fast.scan_cpu as scan_cpu
from minimamba_moe import reference
from minimamba_moe.fast.causal_conv1d import causal_conv1d, causal_conv1d_update
from minimamba_moe.fast.selective_scan import selective_scan, selective_state_update
from tests.helpers import assert_close

# --8<-- [start:strategies]
F64_TOL = 1e-10
F32_ATOL, F32_RTOL = 1e-4, 1e-3
BF16_ATOL, BF16_RTOL = 2e-2, 2e-2

OPTIONAL = ("D", "z", "delta_bias", "initial_state")
TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

seeds = st.integers(0, 2**31 - 1)
flags = st.fixed_dictionaries({k: st.booleans() for k in (*OPTIONAL, "delta_softplus")})
# --8<-- [end:strategies]


# --8<-- [start:make_inputs]
def make_inputs(seed, b, d, n, l, flags, realistic=False):
    """float64 scan arguments (optional ones per ``flags``); ``realistic``: the model's init ranges."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if realistic:  # Mamba's init (docs/paper-facts.md#initialization): A = -(1..n), softplus(bias) = dt in [1e-3, 1e-1]
        A = -torch.arange(1, n + 1, dtype=torch.float64).expand(d, n).clone()
        dt = torch.exp(torch.rand(d, generator=g, dtype=torch.float64) * (torch.log(torch.tensor(100.0))) - 6.9)
        bias = dt + torch.log(-torch.expm1(-dt))
        delta = 0.5 * randn(b, d, l)
    else:
        A = -torch.exp(0.5 * randn(d, n))
        if flags["delta_softplus"]:
            bias, delta = 0.5 * randn(d), randn(b, d, l)
        else:  # the step size is used as given: keep delta + bias > 0, so exp(delta A) < 1 (a decaying
            # scan; a negative step makes the state grow like exp(|delta A| l), past float32's range)
            bias = 0.2 * torch.rand(d, generator=g, dtype=torch.float64)
            delta = 0.1 + 0.9 * torch.rand(b, d, l, generator=g, dtype=torch.float64)
    return dict(
        u=randn(b, d, l), delta=delta, A=A, B=randn(b, n, l), C=randn(b, n, l),
        D=randn(d) if flags["D"] else None,
        z=randn(b, d, l) if flags["z"] else None,
        delta_bias=bias if flags["delta_bias"] else None,
        delta_softplus=flags["delta_softplus"],
        initial_state=randn(b, d, n) if flags["initial_state"] else None,
    )
# --8<-- [end:make_inputs]


def cast(kw, dtype, fp32_params=False):
    """Copy of the arguments in ``dtype`` (A, D, delta_bias, initial_state kept fp32 if fp32_params)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            keep = fp32_params and k in ("A", "D", "delta_bias", "initial_state")
            v = v.to(torch.float32 if keep else dtype)
        out[k] = v
    return out


# --8<-- [start:compare]
def run_with_grads(fn, kw, seed):
    """Output, last state and the gradient of every tensor input for a random linear loss on both outputs."""
    kw = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out, last = fn(**kw, return_last_state=True)
    g = torch.Generator().manual_seed(seed + 1)
    # bf16-representable weights: the gradient reaching a bf16 output is then w_out exactly, as it is
    # for the float64 reference (otherwise its rounding, summed over l into grad A, is what differs)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(torch.bfloat16).double()
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    names = [k for k in TENSOR_ARGS if kw.get(k) is not None]
    grads = torch.autograd.grad(loss, [kw[k] for k in names])
    return out, last, dict(zip(names, grads))


def assert_scan_matches(seed, actual_kw, expected_kw, atol, rtol, fn=selective_scan):
    out, last, grads = run_with_grads(fn, actual_kw, seed)
    out_r, last_r, grads_r = run_with_grads(reference.selective_scan, expected_kw, seed)
    assert out.dtype == actual_kw["u"].dtype
    for name, a, e in [("out", out, out_r), ("last_state", last, last_r)] + [
        (f"grad {k}", grads[k], grads_r[k]) for k in grads_r
    ]:
        assert torch.isfinite(a).all(), f"{name}: not finite"
        scale = max(1.0, e.abs().max().item())
        assert_close(a, e, atol=atol * scale, rtol=rtol, what=name)
# --8<-- [end:compare]


@contextlib.contextmanager
def chunk_size(chunk):
    """Run the CPU path with another chunk length (3: many chunk boundaries on short sequences)."""
    saved, scan_cpu.CHUNK = scan_cpu.CHUNK, chunk
    try:
        yield
    finally:
        scan_cpu.CHUNK = saved


# --8<-- [start:float32_test]
chunks = pytest.mark.parametrize("chunk", [3, scan_cpu.CHUNK])


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 16), st.integers(1, 70))  # b, d, n, l


@chunks
@given(seed=seeds, shape=shapes, flags=flags)
def test_float64_equals_reference(chunk, seed, shape, flags):
    kw = make_inputs(seed, *shape, flags)
    with chunk_size(chunk):
        assert_scan_matches(seed, kw, kw, F64_TOL, F64_TOL)


@chunks
@given(seed=seeds, shape=shapes, flags=flags)
def test_float32_matches_float64_reference(chunk, seed, shape, flags):
    kw = make_inputs(seed, *shape, flags)
    kw32 = cast(kw, torch.float32)
    with chunk_size(chunk):
        assert_scan_matches(seed, kw32, cast(kw32, torch.float64), F32_ATOL, F32_RTOL)
# --8<-- [end:float32_test]


@given(seed=seeds, shape=shapes, flags=flags)
def test_bfloat16_inputs_match_float64_reference(seed, shape, flags):
    kw = make_inputs(seed, *shape, flags)
    kw16 = cast(kw, torch.bfloat16, fp32_params=True)
    assert_scan_matches(seed, kw16, cast(kw16, torch.float64), BF16_ATOL, BF16_RTOL)


@pytest.mark.parametrize("l", [1, 63, 64, 65, 129])
def test_lengths_around_the_chunk(l):
    all_on = {k: True for k in (*OPTIONAL, "delta_softplus")}
    kw = make_inputs(l, 2, 3, 4, l, all_on)
    assert_scan_matches(l, kw, kw, F64_TOL, F64_TOL)


def long_inputs():
    """L = 4096 at the model's init: the state decays by up to exp(-16 * 0.1) per step, so the
    cumulative decay underflows long before the end (a division by it would overflow)."""
    all_on = {k: True for k in (*OPTIONAL, "delta_softplus")}
    return cast(make_inputs(7, 1, 4, 16, 4096, all_on, realistic=True), torch.float32)


def test_long_sequence_realistic_decays_is_finite_and_matches():
    kw32 = long_inputs()
    with torch.no_grad():  # the reference's autograd over 4096 steps takes minutes: see the slow test
        out_r, last_r = reference.selective_scan(**cast(kw32, torch.float64), return_last_state=True)
    out, last, grads = run_with_grads(selective_scan, kw32, 7)
    for name, a, e in [("out", out, out_r), ("last_state", last, last_r)]:
        assert_close(a, e, atol=F32_ATOL * max(1.0, e.abs().max().item()), rtol=F32_RTOL, what=name)
    for k, g in grads.items():
        assert torch.isfinite(g).all(), f"grad {k} not finite at L=4096"


@pytest.mark.slow
def test_long_sequence_gradients_match_reference():
    kw32 = long_inputs()
    assert_scan_matches(7, kw32, cast(kw32, torch.float64), F32_ATOL, F32_RTOL)


def test_split_sequence_with_carried_state_equals_whole():
    kw = make_inputs(3, 2, 3, 5, 40, {k: True for k in (*OPTIONAL, "delta_softplus")})
    whole, last = selective_scan(**kw, return_last_state=True)

    def part(sl, h):
        p = {k: (v[..., sl] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        return selective_scan(**{**p, "initial_state": h}, return_last_state=True)

    first, h = part(slice(0, 17), kw["initial_state"])
    second, h2 = part(slice(17, 40), h)
    assert_close(torch.cat([first, second], -1), whole, atol=F64_TOL, rtol=F64_TOL, what="split out")
    assert_close(h2, last, atol=F64_TOL, rtol=F64_TOL, what="split last state")


@pytest.mark.parametrize("bad", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_bad_shapes_raise_the_reference_error(bad):
    kw = make_inputs(0, 2, 3, 4, 5, {k: True for k in (*OPTIONAL, "delta_softplus")})
    kw[bad] = kw[bad][..., :-1] if kw[bad].shape[-1] > 1 else kw[bad][..., :0]
    with pytest.raises(ValueError) as ref_err:
        reference.selective_scan(**kw)
    with pytest.raises(ValueError) as fast_err:
        selective_scan(**kw)
    assert str(fast_err.value) == str(ref_err.value)


# --- the decode step ---


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 16)), flags=flags,
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_state_update_equals_reference(seed, shape, flags, dtype):
    b, d, n = shape
    kw = make_inputs(seed, b, d, n, 1, flags)
    state = kw["initial_state"] if kw["initial_state"] is not None else torch.zeros(b, d, n, dtype=torch.float64)
    args = dict(x=kw["u"][..., 0].to(dtype), dt=kw["delta"][..., 0].to(dtype), A=kw["A"].to(dtype),
                B=kw["B"][..., 0].to(dtype), C=kw["C"][..., 0].to(dtype),
                D=None if kw["D"] is None else kw["D"].to(dtype), z=None if kw["z"] is None else kw["z"][..., 0].to(dtype),
                dt_bias=None if kw["delta_bias"] is None else kw["delta_bias"].to(dtype), dt_softplus=flags["delta_softplus"])
    s_fast, s_ref = state.to(dtype).clone(), state.to(dtype).clone()
    out = selective_state_update(s_fast, **args)
    out_r = reference.selective_state_update(s_ref, **args)
    tol = F64_TOL if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype
    assert_close(out, out_r, atol=tol, rtol=tol, what="step out")
    assert_close(s_fast, s_ref, atol=tol, rtol=tol, what="step state (in place)")


# --- the causal conv ---


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 20), st.integers(1, 5)),
       has_bias=st.booleans(), has_state=st.booleans(), activation=st.sampled_from([None, "silu"]))
def test_causal_conv_equals_reference_with_grads(seed, shape, has_bias, has_state, activation):
    b, d, l, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, l, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, k, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True) if has_bias else None
    state = torch.randn(b, d, k, generator=g, dtype=torch.float64) if has_state else None
    args = (x, w, bias, state, activation)
    out, out_r = causal_conv1d(*args), reference.causal_conv1d(*args)
    assert_close(out, out_r, atol=F64_TOL, rtol=F64_TOL, what="conv out")
    gw = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, w, bias) if t is not None]
    for a, e in zip(torch.autograd.grad((out * gw).sum(), inputs), torch.autograd.grad((out_r * gw).sum(), inputs)):
        assert_close(a, e, atol=F64_TOL, rtol=F64_TOL, what="conv grad")


@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
       has_bias=st.booleans(), activation=st.sampled_from([None, "silu"]))
def test_causal_conv_update_equals_reference(seed, shape, has_bias, activation):
    b, d, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    w = torch.randn(d, k, generator=g)
    bias = torch.randn(d, generator=g) if has_bias else None
    state = torch.randn(b, d, k, generator=g)
    s_fast, s_ref = state.clone(), state.clone()
    out = causal_conv1d_update(x, s_fast, w, bias, activation)
    out_r = reference.causal_conv1d_update(x, s_ref, w, bias, activation)
    assert_close(out, out_r, atol=1e-5, rtol=1e-5, what="conv step out")
    assert torch.equal(s_fast, s_ref), "conv state not updated like the reference's"


def test_causal_conv_is_float32_under_autocast_like_the_reference():
    """Both docstrings say float32: autocast would run the fast path's F.conv1d in bf16 (~1e-2 off)."""
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 64, 100, generator=g), torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_r = causal_conv1d(x, w, bias, None, "silu"), reference.causal_conv1d(x, w, bias, None, "silu")
        state = torch.randn(2, 64, 4, generator=g)
        step, step_r = (f(x[..., 0], state.clone(), w, bias, "silu") for f in (causal_conv1d_update,
                                                                               reference.causal_conv1d_update))
    assert out.dtype == out_r.dtype == step.dtype == torch.float32
    assert_close(out, out_r, atol=1e-5, rtol=1e-5, what="conv out under autocast")
    assert_close(step, step_r, atol=1e-5, rtol=1e-5, what="conv step under autocast")


def test_conv_errors_match_reference():
    x, w = torch.randn(2, 3, 5), torch.randn(3, 4)
    for args in [(x, w[:2]), (x, w, torch.randn(2)), (x, w, None, torch.randn(2, 3, 3))]:
        with pytest.raises(ValueError) as e_ref:
            reference.causal_conv1d(*args)
        with pytest.raises(ValueError) as e_fast:
            causal_conv1d(*args)
        assert str(e_fast.value) == str(e_ref.value)
    with pytest.raises(ValueError):
        causal_conv1d(x, w, activation="relu")


@pytest.mark.parametrize("softplus", [True, False])
def test_inputs_are_left_unchanged(softplus):
    """The CPU path works in place on its own buffers: the caller's tensors must not change."""
    flags_on = {**{k: True for k in OPTIONAL}, "delta_softplus": softplus}
    kw = cast(make_inputs(4, 2, 3, 4, 9, flags_on), torch.float32)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    run_with_grads(selective_scan, kw, 4)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{k} was modified"
