"""Record what the fast ops' Triton launchers launch, on meta tensors: no GPU, no data, no time.

fast/aot/check.py compiles what this records, so the ahead-of-time check sees the launches the GPU will
see instead of hand-written signatures that can drift from them. ``capture()`` runs every Triton op
of fast/ (scan forward and backward, decode step, MoE forward and backward, Sinkhorn) on tensors
of the ``meta`` device at the shapes of benchmarks/gpu_check_kernels.py and gpu_check_runs.py (small
ones and the papers' sizes) and as the model calls them, while ``kernel[grid](...)`` is swapped
for a recorder (``recording()``: the launch is recorded, nothing runs). A launch records:

    kernel     the JIT function
    args       each argument as Triton specialises it (Arg below): its type ("*bf16", "i32",
               "fp32", "constexpr"), whether it is compiled in as a constant (constexprs, and
               integers equal to 1), whether it is 16-byte aligned / divisible by 16
    options    the launch options (num_warps, num_stages, ...)
    grid       (x, y, z)
    numel      element count of each tensor argument (for the 32-bit offset check)

Rules mirrored from Triton's JIT (runtime/jit.py): ints are i32 in [-2^31, 2^31), u64 from 2^63,
i64 otherwise; an int equal to 1 becomes the constant 1; ints divisible by 16 and tensors whose
address is (the caching allocator's blocks are 512-byte aligned: a tensor is aligned when its
storage offset in bytes is) get the divisibility hint; floats are fp32; bools and floats are not
specialised. tests/test_aot_compile.py holds these rules to the installed Triton's own.
Dropped slots and routing change values, never launches, so none are modelled here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from triton.runtime.jit import mangle_type  # present from Triton 3.2 to 3.9

from ..moe_triton import moe_experts_triton
from ..scan_triton import selective_scan_triton
from ..sinkhorn_triton import sinkhorn_triton
from ..state_update_triton import selective_state_update_triton


class Arg(NamedTuple):
    name: str
    type: str  # Triton type: "*bf16", "i32", "fp32", ...; "constexpr" for a tl.constexpr parameter
    const: bool  # compiled in as a constant (a constexpr, None, or an int equal to 1)
    value: Any  # the constant when const, else None
    aligned: bool  # the divisibility-by-16 hint


@dataclass
class Launch:
    kernel: Any
    args: tuple[Arg, ...]
    options: dict
    grid: tuple[int, int, int]
    numel: dict = field(default_factory=dict)  # tensor argument name -> element count
    op: str = ""  # the capture case that launched it

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self):
        """What decides the compiled binary: same key, same compile."""
        return (self.kernel.fn.__module__, self.name, self.args, tuple(sorted(self.options.items())))


def specialize(kernel, args, kwargs) -> tuple[dict, tuple[Arg, ...], dict]:
    """Bind a launch's arguments like Triton's JIT: -> (bound values, Args, launch options)."""
    sig = inspect.signature(kernel.fn)
    params = sig.parameters
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in params}
    no_spec = set(getattr(kernel, "do_not_specialize", None) or ())
    no_align = set(getattr(kernel, "do_not_specialize_on_alignment", None) or ())
    out = []
    for i, (name, value) in enumerate(bound.arguments.items()):
        spec, align = not ({i, name} & no_spec), not ({i, name} & no_align)
        if "constexpr" in str(params[name].annotation):
            out.append(Arg(name, "constexpr", True, value, False))
        elif value is None:
            out.append(Arg(name, "none", True, None, False))
        elif isinstance(value, (bool, float)):
            out.append(Arg(name, mangle_type(value), False, None, False))
        elif isinstance(value, int):
            one = spec and value == 1
            out.append(Arg(name, mangle_type(value), one, 1 if one else None, spec and align and value % 16 == 0))
        elif isinstance(value, torch.Tensor):
            aligned = spec and align and value.storage_offset() * value.element_size() % 16 == 0
            out.append(Arg(name, mangle_type(value), False, None, aligned))
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot specialise argument {name} of type {type(value).__name__}")
    return bound.arguments, tuple(out), options


def kernels() -> dict[str, Any]:
    """Every Triton kernel of fast/ (JIT functions no other JIT function calls), by name."""
    jit = {}
    fast = os.path.dirname(os.path.dirname(__file__))  # the kernels' folder, one above this one
    package = __package__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules([fast]):
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if hasattr(obj, "fn") and hasattr(obj, "arg_names") and type(obj).__module__.startswith("triton"):
                jit[obj.fn.__name__] = obj
    sources = {name: inspect.getsource(obj.fn) for name, obj in jit.items()}
    called = {name for name in jit for other, src in sources.items()
              if other != name and re.search(rf"\b{name}\b", src)}
    return {name: obj for name, obj in jit.items() if name not in called}


@contextlib.contextmanager
def recording(label=lambda: ""):
    """Within the block, ``kernel[grid](...)`` records a Launch into the yielded list and runs nothing."""
    launches: list[Launch] = []

    def getitem(kernel, grid):
        def record(*args, **kwargs):
            bound, spec, options = specialize(kernel, args, kwargs)
            g = tuple(grid(bound) if callable(grid) else grid)
            numel = {k: v.numel() for k, v in bound.items() if isinstance(v, torch.Tensor)}
            launches.append(Launch(kernel, spec, options, tuple(int(x) for x in g) + (1,) * (3 - len(g)), numel,
                                   label()))
        return record

    classes = {type(k) for k in kernels().values()}
    saved = {cls: cls.__dict__.get("__getitem__") for cls in classes}
    try:
        for cls in classes:
            cls.__getitem__ = getitem
        yield launches
    finally:
        for cls, old in saved.items():
            if old is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = old


# --- the ops, at the shapes gpu_check runs them and the model calls them ---------------------------
META = "meta"
DTYPES = (torch.float32, torch.bfloat16)  # fp32: tests, fp32 training; bf16: autocast, gpu_check


def _leaf(*shape, dtype=torch.float32, grad=True):
    return torch.empty(*shape, dtype=dtype, device=META, requires_grad=grad)


def _grad(outputs, inputs):
    outs = [o for o in outputs if o is not None]
    torch.autograd.grad(outs, [t for t in inputs if t is not None], [torch.empty_like(o) for o in outs])


def scan_case(b, d, l, dtype, h0, g_last, block=None, n=16):
    """selective_scan_triton forward + backward as Mamba calls it (D, z, bias, softplus); h0: prefill
    from a state; g_last: the last state's gradient (gpu_check's loss uses it, training does not)."""
    u, delta, z = (_leaf(b, d, l, dtype=dtype) for _ in range(3))
    B, C = (_leaf(b, n, l, dtype=dtype) for _ in range(2))
    A, D, bias = _leaf(d, n), _leaf(d), _leaf(d)
    state = _leaf(b, d, n) if h0 else None
    out, last = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, state, *(block or (None, None)))
    _grad([out, last if g_last else None], [u, delta, A, B, C, D, z, bias, state])


def step_case(b, d, dtype, n=16):
    """selective_state_update_triton as Model.step calls it (no gradient)."""
    x, dt, z = (_leaf(b, d, dtype=dtype, grad=False) for _ in range(3))
    B, C = (_leaf(b, n, dtype=dtype, grad=False) for _ in range(2))
    A, D, bias = (_leaf(*s, grad=False) for s in ((d, n), (d,), (d,)))
    selective_state_update_triton(_leaf(b, d, n, grad=False), x, dt, A, B, C, D, z, bias, True)


def moe_case(T, d, f, E, k, act, dtype, grad=True):
    """moe_experts_triton forward (+ backward) as the MoE layer calls it."""
    x, gates = _leaf(T, d, dtype=dtype, grad=grad), _leaf(T, k, dtype=dtype, grad=grad)
    w1, w2 = _leaf(E, f if act == "relu" else 2 * f, d, dtype=dtype, grad=grad), _leaf(E, d, f, dtype=dtype, grad=grad)
    out = moe_experts_triton(x, torch.empty(T, k, dtype=torch.int64, device=META), gates, w1, w2, act)
    if grad:
        _grad([out], [x, gates, w1, w2])


def sinkhorn_case(T, E, dtype, init, stopping):
    sinkhorn_triton(_leaf(T, E, dtype=dtype, grad=False), init, stopping, 1e-4, 100)  # the config's defaults


# (b, d_inner, l, block): gpu_check_kernels.section_scan (small, with tiny tiles; paper sizes),
# gpu_check_runs (b 8 / 4 at the papers' sizes); h0 and g_last both ways: prefill, training, gpu_check
SCANS = [(2, 5, 37, (4, 2)), (1, 3, 40, None), (3, 64, 100, None), (1, 2304, 2048, None), (1, 2944, 2048, None),
         (8, 2304, 2048, None), (4, 2944, 2048, None)]
# (block_l, block_d) tiles gpu_check's speed section times against the default (32, 16) at b=4,
# d_inner=2944, l=2048, bf16 (forward and backward alike). ptxas -v (Triton 3.9, sm_90; python -m
# minimamba_moe.fast.aot) for the backward at (32, 16): 255 registers, 1.7 KB spill stores a thread;
# these spill 0 B (regs bwd/fwd): (32, 8) 255/168, (8, 16) 222/94, (16, 8) 178/95; (16, 16) 255/128
# spills 132 B. Larger tiles spill more ((64, 8) ~1.7 KB, (16, 32) ~2.1 KB).
SCAN_TILES = [(32, 8), (16, 16), (16, 8), (8, 16)]
STEPS = [(2, 40), (1, 2304), (8, 2944)]  # (b, d_inner): section_step, sample.py's decoding
# (T, d, f, E, k, activation, backward): gpu_check's small cases and presets (blackmamba-1.5b/2.8b,
# moe-mamba-25m/100m), gpu_check_runs' T = 16384 / 8192, top-2, geglu, and decoding (T = batch, no backward)
MOES = [(40, 33, 70, 6, 2, "swiglu", True), (40, 33, 70, 6, 2, "relu", True), (40, 33, 70, 6, 2, "geglu", True),
        (2048, 1152, 3072, 8, 1, "swiglu", True), (2048, 1472, 3872, 8, 1, "swiglu", True),
        (2048, 512, 1536, 42, 1, "relu", True), (2048, 768, 2304, 42, 1, "relu", True),
        (16384, 1152, 3072, 8, 1, "swiglu", True), (8192, 1472, 3872, 8, 1, "swiglu", True),
        (16384, 768, 2304, 42, 1, "relu", True), (16384, 1152, 3072, 8, 2, "swiglu", True),
        (1, 1152, 3072, 8, 1, "swiglu", False), (8, 1472, 3872, 8, 1, "swiglu", False),
        (8, 768, 2304, 42, 1, "relu", False)]
SINKHORNS = [(80, 5), (300, 8), (4096, 42), (16384, 8), (16384, 42)]  # (T, E), every init x stopping rule


def cases():
    """(label, function, args) for every capture case."""
    out = []
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        for b, d, l, block in SCANS:
            for h0 in (False, True):
                for g_last in (False, True):
                    out.append((f"scan {name} b={b} d={d} l={l} h0={h0} g_last={g_last}", scan_case,
                                (b, d, l, dt, h0, g_last, block)))
        if dt == torch.bfloat16:  # as gpu_check's speed section runs the sweep: no h0, no last-state gradient
            out += [(f"scan {name} b=4 d=2944 l=2048 tile={tile}", scan_case, (4, 2944, 2048, dt, False, False, tile))
                    for tile in SCAN_TILES]
        out += [(f"step {name} b={b} d={d}", step_case, (b, d, dt)) for b, d in STEPS]
        out += [(f"moe {name} T={T} d={d} f={f} E={E} top-{k} {act}" + ("" if g else " fwd"), moe_case,
                 (T, d, f, E, k, act, dt, g)) for T, d, f, E, k, act, g in MOES]
        out += [(f"sinkhorn {name} T={T} E={E} {init}/{stop}", sinkhorn_case, (T, E, dt, init, stop))
                for T, E in SINKHORNS for init in ("blackmamba", "uniform") for stop in ("absolute", "marginal")]
    return out


def capture(selected=None) -> list[Launch]:
    """Every launch of every case (or of ``selected`` cases). A case that reads a result back to the
    host (impossible on meta) stops there; what it launched before is kept, and the test that every
    kernel was captured catches a kernel it never reached."""
    current = [""]
    with recording(lambda: current[0]) as launches:
        for label, fn, args in selected if selected is not None else cases():
            current[0] = label
            try:
                fn(*args)
            except (NotImplementedError, RuntimeError) as e:
                if "meta" not in str(e).lower():
                    raise
    return launches
