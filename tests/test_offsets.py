"""The Triton kernels index with 32-bit offsets: a problem with an operand of 2**31 elements or more
takes the PyTorch path instead (fast/selective_scan.py, fast/moe.py), which is correct at any size.

Two laws: each launcher module's ``largest_operand`` formula equals the largest tensor its kernels
are actually launched with (captured on meta tensors by fast/aot/launch_capture.py, forward and
backward), and the dispatch sends a problem to Triton exactly when that formula is below 2**31.
"""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from minimamba_moe.fast.aot import launch_capture  # noqa: E402
from minimamba_moe.fast.moe_triton import largest_operand as moe_largest  # noqa: E402
from minimamba_moe.fast.scan_triton import largest_operand as scan_largest  # noqa: E402

selective_scan = importlib.import_module("minimamba_moe.fast.selective_scan")  # the module (fast/__init__ exports
moe = importlib.import_module("minimamba_moe.fast.moe")  # functions of the same names)


def largest_launched(case, *args):
    launches = launch_capture.capture([("case", case, args)])
    assert launches, "the case launched no kernel"
    return max(n for launch in launches for n in launch.numel.values())


@pytest.mark.parametrize("b,d,l", [(2, 5, 37), (1, 2944, 2048), (3, 100, 1000), (8, 16, 1)])
def test_scan_formula_is_the_largest_tensor_launched(b, d, l):
    launched = largest_launched(launch_capture.scan_case, b, d, l, torch.bfloat16, True, True)
    assert scan_largest(b, d, l, 16) == launched, f"formula {scan_largest(b, d, l, 16)} != launched {launched}"


@pytest.mark.parametrize("T,d,f,E,k,act", [(40, 33, 70, 6, 2, "swiglu"), (2048, 1152, 3072, 8, 1, "swiglu"),
                                          (16384, 768, 2304, 42, 1, "relu"), (3, 4000, 8, 64, 2, "geglu")])
def test_moe_formula_is_the_largest_tensor_launched(T, d, f, E, k, act):
    launched = largest_launched(launch_capture.moe_case, T, d, f, E, k, act, torch.bfloat16)
    F1 = f if act == "relu" else 2 * f
    assert moe_largest(T, k, d, F1, f, E) == launched, f"formula {moe_largest(T, k, d, F1, f, E)} != {launched}"


class Taken(Exception):
    """Raised by a stand-in kernel path to say which path the dispatch took."""


def take(name):
    def path(*args, **kwargs):
        raise Taken(name)
    return path


def dispatched_scan(monkeypatch, b, d, l, n=16):
    """Which path selective_scan takes for these sizes, were the tensors on CUDA (meta tensors: no memory)."""
    monkeypatch.setattr(selective_scan, "_use_triton", lambda *tensors: True)
    monkeypatch.setattr(selective_scan, "selective_scan_triton", take("triton"))
    monkeypatch.setattr(selective_scan, "selective_scan_cpu", take("pytorch"))
    m = dict(device="meta")
    with pytest.raises(Taken) as taken:
        selective_scan.selective_scan(torch.empty(b, d, l, **m), torch.empty(b, d, l, **m), torch.empty(d, n, **m),
                                      torch.empty(b, n, l, **m), torch.empty(b, n, l, **m))
    return str(taken.value)


def test_scan_too_big_for_32_bit_offsets_takes_the_pytorch_path(monkeypatch):
    assert dispatched_scan(monkeypatch, 8, 2944, 2048) == "triton"  # the papers' sizes: 4.8e7 elements
    assert scan_largest(512, 2944, 2048, 16) >= 2**31
    assert dispatched_scan(monkeypatch, 512, 2944, 2048) == "pytorch"
    l = 2**31 // (2 * 65)  # u (2, 65, l) is below the limit; the gB/gC partials (5 channel blocks, 2, 16, l) are not
    assert 2 * 65 * l < 2**31 <= scan_largest(2, 65, l, 16)
    assert dispatched_scan(monkeypatch, 2, 65, l) == "pytorch"


def dispatched_moe(monkeypatch, T, d, f, E, k):
    monkeypatch.setattr(moe, "_on_gpu", lambda x: True)
    monkeypatch.setattr(moe, "_triton_under_autocast", take("triton"))
    monkeypatch.setattr(moe, "check_expert_range", take("pytorch"))
    m = dict(device="meta")
    with pytest.raises(Taken) as taken:
        moe.moe_experts(torch.empty(T, d, **m), torch.empty(T, k, dtype=torch.int64, **m), torch.empty(T, k, **m),
                        torch.empty(E, 2 * f, d, **m), torch.empty(E, d, f, **m))
    return str(taken.value)


def test_moe_too_big_for_32_bit_offsets_takes_the_pytorch_path(monkeypatch):
    assert dispatched_moe(monkeypatch, 16384, 1472, 3872, 8, 1) == "triton"
    T = 2**31 // (2 * 3872) + 1  # h (T k, 2f) reaches 2**31 elements
    assert dispatched_moe(monkeypatch, T, 1472, 3872, 8, 1) == "pytorch"
    assert dispatched_moe(monkeypatch, T - 1, 1472, 3872, 8, 1) == "triton"
