"""Property tests for reference.selective_scan / selective_state_update / causal_conv1d(_update).

Laws checked (float64 where the law is exact, tiny sizes so a Python closed form stays cheap):
the scan equals the closed form of its recurrence; it is causal; it can be split with the state
carried; the one-step update reproduces it; the conv equals F.conv1d, splits, and steps; gradients
match finite differences; bad shapes raise ValueError naming the argument.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minimamba_moe.reference import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from tests.helpers import assert_close

F64_ATOL = 1e-12  # float64, same math in a different order: only rounding differs
F64_RTOL = 1e-10
CLOSED_FORM_ATOL = 1e-10  # float64, products of up to l factors summed in another order
CLOSED_FORM_RTOL = 1e-9
F32_ATOL = 1e-5  # float32 input vs the float64 result
F32_RTOL = 1e-4

seeds = st.integers(0, 2**31 - 1)
sizes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6))  # b, d, n, l
flags = st.fixed_dictionaries(
    {k: st.booleans() for k in ("D", "z", "delta_bias", "delta_softplus", "initial_state")}
)
ALL_FLAGS = dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True)


def make_scan_inputs(seed, b, d, n, l, flags, dtype=torch.float64):
    """Random scan arguments; the optional ones present according to ``flags``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if flags["delta_softplus"]:
        delta = randn(b, d, l)  # softplus makes it positive
    else:
        delta = (0.1 + 0.9 * torch.rand(b, d, l, generator=g, dtype=torch.float64)).to(dtype)
    return dict(
        u=randn(b, d, l),
        delta=delta,
        A=-torch.exp(0.5 * randn(d, n)),  # negative, as in Mamba
        B=randn(b, n, l),
        C=randn(b, n, l),
        D=randn(d) if flags["D"] else None,
        z=randn(b, d, l) if flags["z"] else None,
        delta_bias=0.5 * randn(d) if flags["delta_bias"] else None,
        delta_softplus=flags["delta_softplus"],
        initial_state=randn(b, d, n) if flags["initial_state"] else None,
    )


def closed_form(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """out[b, c, l] from h_l = Σ_{s<=l} (Π_{s<r<=l} dA_r) dBu_s + (Π_{r<=l} dA_r) h_init, in Python floats."""
    b, d, L = u.shape
    n = A.shape[1]
    out = torch.zeros(b, d, L, dtype=torch.float64)
    for bi in range(b):
        for c in range(d):
            dt = [delta[bi, c, t].item() + (delta_bias[c].item() if delta_bias is not None else 0.0) for t in range(L)]
            if delta_softplus:
                dt = [math.log1p(math.exp(v)) for v in dt]
            for t in range(L):
                y = 0.0
                for k in range(n):
                    dA = [math.exp(dt[r] * A[c, k].item()) for r in range(L)]
                    h = 0.0
                    for s in range(t + 1):  # the sum over inputs s <= t ...
                        decay = 1.0
                        for r in range(s + 1, t + 1):  # ... each decayed by the dA after it
                            decay *= dA[r]
                        h += decay * dt[s] * B[bi, k, s].item() * u[bi, c, s].item()
                    if initial_state is not None:
                        h += math.prod(dA[: t + 1]) * initial_state[bi, c, k].item()
                    y += h * C[bi, k, t].item()
                if D is not None:
                    y += D[c].item() * u[bi, c, t].item()
                if z is not None:
                    zz = z[bi, c, t].item()
                    y *= zz / (1.0 + math.exp(-zz))
                out[bi, c, t] = y
    return out


@given(seeds, sizes, flags)
def test_scan_equals_closed_form(seed, size, flags):
    args = make_scan_inputs(seed, *size, flags)
    out = selective_scan(**args)
    assert_close(out, closed_form(**args), atol=CLOSED_FORM_ATOL, rtol=CLOSED_FORM_RTOL, what="scan vs closed form")


@given(seeds, sizes, flags, st.data())
def test_scan_is_causal(seed, size, flags, data):
    args = make_scan_inputs(seed, *size, flags)
    l = size[3]
    t = data.draw(st.integers(0, l - 1), label="t")
    out = selective_scan(**args)
    g = torch.Generator().manual_seed(seed + 1)
    changed = dict(args)
    for name in ("u", "delta", "B", "C", "z"):  # all per-position inputs, at position t only
        if args[name] is not None:
            changed[name] = args[name].clone()
            changed[name][..., t] = torch.randn(changed[name][..., t].shape, generator=g, dtype=torch.float64)
    out2 = selective_scan(**changed)
    assert torch.equal(out[..., :t], out2[..., :t]), "changing position t changed an earlier output"


@given(seeds, sizes.filter(lambda s: s[3] >= 2), flags, st.data())
def test_scan_split_with_carried_state(seed, size, flags, data):
    args = make_scan_inputs(seed, *size, flags)
    s = data.draw(st.integers(1, size[3] - 1), label="split")
    whole, last = selective_scan(**args, return_last_state=True)

    def piece(sl):
        return {k: (v[..., sl] if k in ("u", "delta", "B", "C", "z") and v is not None else v) for k, v in args.items()}

    first, state = selective_scan(**piece(slice(0, s)), return_last_state=True)
    second_args = piece(slice(s, None))
    second_args["initial_state"] = state
    second, last2 = selective_scan(**second_args, return_last_state=True)
    assert_close(torch.cat([first, second], -1), whole, atol=F64_ATOL, rtol=F64_RTOL, what="split out")
    assert_close(last2, last, atol=F64_ATOL, rtol=F64_RTOL, what="split last state")


@given(seeds, sizes, flags)
def test_state_update_steps_equal_scan(seed, size, flags):
    args = make_scan_inputs(seed, *size, flags)
    b, d, n, l = size
    whole, last = selective_scan(**args, return_last_state=True)
    init = args["initial_state"]
    state = torch.zeros(b, d, n, dtype=torch.float64) if init is None else init.clone()
    z = args["z"]
    outs = []
    for t in range(l):
        outs.append(
            selective_state_update(
                state, args["u"][..., t], args["delta"][..., t], args["A"], args["B"][..., t], args["C"][..., t],
                D=args["D"], z=None if z is None else z[..., t], dt_bias=args["delta_bias"],
                dt_softplus=args["delta_softplus"],
            )
        )
    assert_close(torch.stack(outs, -1), whole, atol=F64_ATOL, rtol=F64_RTOL, what="steps vs scan")
    assert_close(state, last, atol=F64_ATOL, rtol=F64_RTOL, what="state after steps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_dtypes(dtype):
    args = make_scan_inputs(0, 2, 3, 4, 5, ALL_FLAGS)
    exact, _ = selective_scan(**args, return_last_state=True)
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, last = selective_scan(**low, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    if dtype == torch.float32:
        assert_close(out, exact, atol=F32_ATOL, rtol=F32_RTOL, what="float32 scan")


# ---------------------------------------------------------------- causal conv

conv_sizes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 8), st.integers(1, 4))  # b, d, l, k
activations = st.sampled_from([None, "silu"])


def make_conv_inputs(seed, b, d, l, k):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, l, generator=g, dtype=torch.float64), torch.randn(d, k, generator=g, dtype=torch.float64),
            torch.randn(d, generator=g, dtype=torch.float64))


@given(seeds, conv_sizes, activations, st.booleans())
def test_conv_equals_conv1d(seed, size, activation, with_bias):
    x, w, bias = make_conv_inputs(seed, *size)
    b, d, l, k = size
    bias = bias if with_bias else None
    expected = F.conv1d(x, w[:, None, :], bias, padding=k - 1, groups=d)[..., :l]
    if activation == "silu":
        expected = F.silu(expected)
    assert_close(causal_conv1d(x, w, bias, activation=activation), expected, atol=F64_ATOL, rtol=F64_RTOL, what="conv")


@given(seeds, conv_sizes.filter(lambda s: s[2] >= 2), activations, st.data())
def test_conv_split_with_carried_state(seed, size, activation, data):
    x, w, bias = make_conv_inputs(seed, *size)
    b, d, l, k = size
    s = data.draw(st.integers(1, l - 1), label="split")
    whole = causal_conv1d(x, w, bias, activation=activation)
    first = causal_conv1d(x[..., :s], w, bias, activation=activation)
    state = torch.cat([torch.zeros(b, d, k, dtype=x.dtype), x[..., :s]], -1)[..., -k:]  # last k inputs seen
    second = causal_conv1d(x[..., s:], w, bias, conv_state=state, activation=activation)
    assert_close(torch.cat([first, second], -1), whole, atol=F64_ATOL, rtol=F64_RTOL, what="split conv")


@given(seeds, conv_sizes, activations)
def test_conv_update_steps_equal_conv(seed, size, activation):
    x, w, bias = make_conv_inputs(seed, *size)
    b, d, l, k = size
    state = torch.zeros(b, d, k, dtype=x.dtype)
    outs = [causal_conv1d_update(x[..., t], state, w, bias, activation=activation) for t in range(l)]
    whole = causal_conv1d(x, w, bias, activation=activation)
    assert_close(torch.stack(outs, -1), whole, atol=F64_ATOL, rtol=F64_RTOL, what="conv steps")
    expected_state = torch.cat([torch.zeros(b, d, k, dtype=x.dtype), x], -1)[..., -k:]
    assert torch.equal(state, expected_state), "conv_state after the steps is not the last k inputs"


# ---------------------------------------------------------------- gradients


def test_scan_gradcheck():
    args = make_scan_inputs(0, 1, 2, 2, 3, ALL_FLAGS)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    tensors = [args[k].clone().requires_grad_(True) for k in names]

    def f(*ts):
        out, last = selective_scan(**{**args, **dict(zip(names, ts))}, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_gradcheck(activation):
    x, w, bias = make_conv_inputs(0, 1, 2, 4, 3)
    state = torch.randn(1, 2, 3, dtype=torch.float64)
    tensors = [t.requires_grad_(True) for t in (x, w, bias, state)]
    assert torch.autograd.gradcheck(lambda *t: causal_conv1d(*t, activation=activation), tensors)


# ---------------------------------------------------------------- argument checks


def _scan_args():
    return make_scan_inputs(0, 2, 3, 4, 5, ALL_FLAGS)


@pytest.mark.parametrize("name", ["delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_scan_bad_shape_names_argument(name):
    args = _scan_args()
    args[name] = args[name][:-1]  # one too few along the first dimension (A's n sets the state size)
    with pytest.raises(ValueError, match=rf"^{name} "):
        selective_scan(**args)


def test_scan_bad_u_rank_names_argument():
    args = _scan_args()
    args["u"] = args["u"][0]
    with pytest.raises(ValueError, match=r"^u "):
        selective_scan(**args)


@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"])
def test_state_update_bad_shape_names_argument(name):
    a = _scan_args()
    args = dict(state=a["initial_state"], x=a["u"][..., 0], dt=a["delta"][..., 0], A=a["A"], B=a["B"][..., 0],
                C=a["C"][..., 0], D=a["D"], z=a["z"][..., 0], dt_bias=a["delta_bias"])
    args[name] = args[name][:-1]
    with pytest.raises(ValueError, match=rf"^{name} "):
        selective_state_update(**args)


@pytest.mark.parametrize("name", ["weight", "bias", "conv_state"])
def test_conv_bad_shape_names_argument(name):
    x, w, bias = make_conv_inputs(0, 2, 3, 5, 4)
    args = dict(x=x, weight=w, bias=bias, conv_state=torch.zeros(2, 3, 4, dtype=x.dtype))
    args[name] = args[name][:-1]  # one too few along the first dimension (weight's k sets the width)
    with pytest.raises(ValueError, match=rf"^{name} "):
        causal_conv1d(**args)
    with pytest.raises(ValueError, match=r"^activation "):
        causal_conv1d(x, w, activation="gelu")


@pytest.mark.parametrize("name", ["x", "weight", "bias"])
def test_conv_update_bad_shape_names_argument(name):
    x, w, bias = make_conv_inputs(0, 2, 3, 5, 4)
    args = dict(x=x[..., 0], conv_state=torch.zeros(2, 3, 4, dtype=x.dtype), weight=w, bias=bias)
    args[name] = args[name][:-1]  # one too few along the first dimension (weight's k sets the width)
    with pytest.raises(ValueError, match=rf"^{name} "):
        causal_conv1d_update(**args)
