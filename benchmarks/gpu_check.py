"""One prepared check of the kernels, train.py and sample.py on a CUDA GPU, with timings.

    python benchmarks/gpu_check.py --out $OUT/gpu_check                  # on a GPU: about 4-7 minutes
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --quick    # dry run without a GPU

On the device tool, in one call: ``run(command="python benchmarks/gpu_check.py --out $OUT/gpu_check",
timeout_s=600)``. Expected wall time on one H100: 4-7 minutes; the whole run stops at --budget
(default 450 s) and each section at its own cap, so it ends inside the 10-minute call either way.
It writes DIR/summary.json and DIR/summary.md and prints one line; exit status 0 when every check
passed (or when there is no GPU: it says so and writes a summary stating the skip), 1 when one failed,
2 on bad arguments. It needs nothing but this checkout and torch + triton: no network, no pip
install (the checkout's own package is imported, mapped the way pyproject.toml's package-dir maps
it), no `datasets`, no hypothesis.

Sections (each in its own subprocess, so a crash, a hang or a poisoned CUDA context costs one
section, never the run; every failure is caught with its traceback into the summary):

    env        torch / triton / CUDA versions, the device, where the package was imported from
    scan       Triton selective scan forward + backward vs reference/ (run in float64 on the same
               values), fp32 and bf16, small shapes and the papers' d_inner 2304 / 2944 at l = 2048
    step       Triton decode step vs reference, fp32 and bf16 inputs
    moe        Triton MoE forward + backward vs reference, fp32 and bf16: small shapes, BlackMamba's
               8 experts of 3072 / 3872 (top-1), MoE-Mamba's 42 experts (ReLU, capacity drops)
    sinkhorn   the fused Triton Sinkhorn vs reference: P, routes, iteration counts
    model      whole model, fast vs reference backend: logits, every parameter's gradient, bf16
               autocast, and step decoding == forward
    speed      medians of CUDA-event timings: copy GB/s and dense bf16 matmul TFLOP/s measured here,
               then each kernel's time, GB/s (scan, step, Sinkhorn) or TFLOP/s (MoE) against them,
               and plain PyTorch doing the same work (reference/, torch grouped_mm via fast/moe_cpu.py)
    train      train.py in bf16 for a few dozen steps (tiny; blackmamba-1.5b with 4 layers):
               tokens/s, MFU (minimamba_moe/flops.py), peak memory
    sample     sample.py decode ms/token after a 1k and an 8k-token prompt (random weights)

Tolerances are the test suite's (tests/test_fast_scan.py, test_triton_moe.py, test_fast_moe.py,
test_fast_sinkhorn.py, test_model.py); each check reports the worst ratio of error to allowed error
(<= 1 passes). ``--device cpu --quick`` runs the same code on small shapes with Triton's
interpreter (fp32 only: the bf16 kernel checks are skipped), so every code path runs before the
one GPU run. ``--sections scan,moe`` runs a subset.

Supported versions (pyproject.toml: torch >= 2.6, triton >= 3.2): the interpreter tests of the Triton
kernels pass under the oldest claimed Triton with
    python3 -m venv .venv-old && . .venv-old/bin/activate && pip install torch "triton==3.2.0" numpy \
      pytest hypothesis tqdm tiktoken safetensors && pip install --no-deps -e . \
      && python -m pytest -q tests/test_triton_scan.py tests/test_triton_moe.py tests/test_fast_sinkhorn.py
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"minimamba_moe": "minimamba_moe", "minimamba_moe.reference": "reference",
                "minimamba_moe.fast": "fast"}  # pyproject.toml [tool.setuptools.package-dir]
SECTIONS = ("env", "scan", "step", "moe", "sinkhorn", "model", "speed", "train", "sample")
CAPS = dict(env=60, scan=100, step=40, moe=100, sinkhorn=40, model=80, speed=100, train=170, sample=90)  # s
STATUSES = ("pass", "fail", "error", "skip")
# The oldest versions supported: pyproject.toml states the same (tests/test_gpu_check.py holds them equal).
# torch 2.6: torch.distributed.fsdp.fully_shard (train.py --fsdp), nn.RMSNorm; triton 3.2: the oldest whose
# interpreter runs the kernel tests (3.0 fails them).
MIN_VERSIONS = {"torch": "2.6", "triton": "3.2"}
# Nominal dense bf16 peak (no sparsity) for MFU, by device-name substring; the measured matmul is reported too.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Import minimamba_moe, .reference and .fast from this checkout, mapped as pyproject.toml maps them."""

    def find_spec(self, name, path=None, target=None):
        if name not in PACKAGE_DIRS:
            return None  # submodules are found through the package's __path__
        folder = REPO / PACKAGE_DIRS[name]
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '3.6.0rc1' -> (3, 6, 0)."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split("+")[0].split(".")[:3])


def below_minimum(package: str, version: str) -> bool:
    return version_tuple(version) < version_tuple(MIN_VERSIONS[package])


def use_checkout() -> None:
    """Make `import minimamba_moe` (and .reference, .fast) load this checkout, installed or not."""
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------
# results: one row per check or measurement


def row(section, name, status, seconds=0.0, error=None, **metrics) -> dict:
    assert status in STATUSES, status
    return dict(section=section, name=name, status=status, seconds=round(seconds, 3), metrics=metrics, error=error)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def write_summary(out_dir: Path, rows: list[dict], info: dict) -> dict:
    """summary.json and summary.md in out_dir, each written to a temporary file then renamed; returns counts."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    data = dict(info, counts=counts, rows=rows)
    lines = [f"# gpu_check: {info.get('device', '?')}", "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped "
             f"in {info.get('wall_s', 0):.0f} s" + (f". {info['note']}" if info.get("note") else "."), ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"## {section}", "", "| check | status | s | measured |", "|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            measured = ", ".join(f"{k} {fmt(v)}" for k, v in r["metrics"].items())
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in (r["name"], r["status"], measured)]
            lines.append(f"| {cells[0]} | {cells[1]} | {r['seconds']:.1f} | {cells[2]} |")
        lines.append("")
    failures = [r for r in rows if r["status"] in ("fail", "error") and r["error"]]
    if failures:
        lines += ["## failures", ""]
        for r in failures:
            lines += [f"### {r['section']}: {r['name']} ({r['status']})", "", "```", r["error"].rstrip(), "```", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps(data, indent=1) + "\n"), ("summary.md", "\n".join(lines))):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out_dir / name)
    return counts


# ---------------------------------------------------------------------------------------------------
# helpers used inside the section subprocesses


class Ctx:
    """What a section needs: the device, quick mode, its deadline, and where its rows go (one JSON line each)."""

    def __init__(self, section, device, quick, deadline, results_path):
        self.section, self.device, self.quick, self.deadline = section, device, quick, deadline
        self.results_path = results_path
        self.cuda = device.startswith("cuda")

    def emit(self, r):
        with open(self.results_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    def check(self, name, fn, *args, **kwargs):
        """Run fn -> dict of metrics (with 'ok' for checks); one row, whatever happens."""
        import torch

        if time.monotonic() > self.deadline:
            return self.emit(row(self.section, name, "skip", error=None, reason="section time box reached"))
        t0 = time.monotonic()
        # If the section is killed during this check, this row stands (the parent keeps a name's last row).
        self.emit(row(self.section, name, "error", error="did not finish: the section was killed at its time box"))
        try:
            metrics = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            status = "pass" if metrics.pop("ok", True) else "fail"
            self.emit(row(self.section, name, status, time.monotonic() - t0, **metrics))
        except Exception:  # noqa: BLE001 - every failure goes into the summary, the run goes on
            self.emit(row(self.section, name, "error", time.monotonic() - t0, error=traceback.format_exc()))
        finally:
            if self.cuda:
                torch.cuda.empty_cache()


def tol_ratio(actual, expected, atol, rtol):
    """max |a - e| / (atol + rtol |e|) over the elements (<= 1: allclose), and the max abs error."""
    import torch

    a, e = actual.detach().double(), expected.detach().to(actual.device).double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    err = (a - e).abs()
    return (err / (atol + rtol * e.abs())).max().item(), err.max().item()


def compare(pairs, atol, rtol, scaled=("d", "grad")):
    """pairs: [(name, actual, expected)] -> metrics of the worst one; ok when every ratio <= 1.

    Tensors whose names start with one of ``scaled`` (by default the gradients) get an absolute
    tolerance of atol * max(1, max|expected|), as the test suite does for sums over many positions.
    """
    worst, worst_name, worst_abs = -1.0, "", 0.0
    for name, a, e in pairs:
        scale = max(1.0, e.detach().abs().max().item()) if name.startswith(scaled) else 1.0
        r, abs_err = tol_ratio(a, e, atol * scale, rtol)
        if r > worst:
            worst, worst_name, worst_abs = r, name, abs_err
    return dict(ok=worst <= 1.0, worst=worst_name, tol_ratio=worst, max_abs_err=worst_abs, atol=atol, rtol=rtol)


def scan_inputs(seed, b, d, n, l, h0=False):
    """float64 CPU scan arguments at the model's init ranges (A = -(1..n), softplus(bias) in [1e-3, 0.1])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dt = torch.exp(torch.rand(d, generator=g, dtype=torch.float64) * math.log(100.0) - 6.9)
    return dict(u=randn(b, d, l), delta=0.5 * randn(b, d, l), A=-torch.arange(1, n + 1.0, dtype=torch.float64).repeat(d, 1),
                B=randn(b, n, l), C=randn(b, n, l), D=randn(d), z=randn(b, d, l),
                delta_bias=dt + torch.log(-torch.expm1(-dt)), initial_state=randn(b, d, n) if h0 else None)


PARAMS = ("A", "D", "delta_bias", "initial_state")


def cast(kw, dtype, device):
    """Sequence tensors in dtype, parameters and the state in fp32 (as in the model); float64 keeps all."""
    import torch

    keep = lambda k: torch.float64 if dtype == torch.float64 else torch.float32  # noqa: E731
    return {k: None if v is None else v.to(device=device, dtype=keep(k) if k in PARAMS else dtype) for k, v in kw.items()}


def grads_of(fn, kw, seed):
    """Outputs and every tensor argument's gradient for a fixed random linear loss on (out, last)."""
    import torch

    kw = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in kw.items()}
    out, last = fn(kw)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(torch.bfloat16).double().to(out.device)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(out.device)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    names = [k for k, v in kw.items() if v is not None]
    return [("out", out), ("last_state", last)] + list(zip(
        [f"grad {k}" for k in names], torch.autograd.grad(loss, [kw[k] for k in names])))


def bench(fn, cuda, budget_s=1.5, min_reps=3, max_reps=50):
    """Median seconds of fn() after one warm-up call: CUDA events on a GPU, perf_counter on CPU."""
    import torch

    fn()
    if cuda:
        torch.cuda.synchronize()
    times, end = [], time.monotonic() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.monotonic() < end):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# sections: correctness


def section_env(ctx):
    import torch

    def env():
        m = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda or "none")
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError as e:
            m["triton"] = f"missing ({e})"
        import minimamba_moe
        import minimamba_moe.fast
        import minimamba_moe.reference

        m["package"] = os.path.dirname(minimamba_moe.__file__)
        m["from_checkout"] = all(str(REPO) in os.path.abspath(mod.__file__) for mod in
                                 (minimamba_moe, minimamba_moe.fast, minimamba_moe.reference))
        if ctx.cuda:
            p = torch.cuda.get_device_properties(0)
            m.update(device=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
        m["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
        m["grouped_mm"] = hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm")
        old = [f"{p} {v} < {MIN_VERSIONS[p]}" for p, v in (("torch", torch.__version__), ("triton", m["triton"]))
               if not v.startswith("missing") and below_minimum(p, v)]
        m["below_minimum"] = ", ".join(old) or "none"
        m["ok"] = m["from_checkout"] and not old
        return m

    ctx.check("versions and device", env)


def section_scan(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.scan_triton import selective_scan_triton

    def run(b, d, l, dtype, h0, seed=0, block=None):
        kw = scan_inputs(seed, b, d, 16, l, h0)
        low = cast(kw, dtype, ctx.device)  # what the kernel gets
        exact = cast(low, torch.float64, ctx.device)  # the same values, float64
        tri = grads_of(lambda k: selective_scan_triton(**k, delta_softplus=True, block_l=block and block[0],
                                                       block_d=block and block[1]), low, seed)
        ref = grads_of(lambda k: reference.selective_scan(**k, delta_softplus=True, return_last_state=True),
                       exact, seed)
        # tests/test_fast_scan.py: fp32 1e-4 x scale abs and 1e-3 rel; bf16 2e-2 and 2e-2
        tol = (1e-4, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
        return compare([(n, a, e) for (n, a), (_, e) in zip(tri, ref)], *tol, scaled=("",))  # all scaled, as the tests

    shapes = [(2, 5, 37, True, (4, 2)), (1, 3, 40, True, None)]  # tiny tiles; the launcher's (across 2 chunks)
    shapes += [] if ctx.quick else [(3, 64, 100, True, None)]
    if not ctx.quick:
        shapes += [(1, 2304, 2048, False, None), (1, 2944, 2048, False, None)]
    for dtype in (torch.float32, torch.bfloat16):
        for b, d, l, h0, block in shapes:
            name = f"fwd+bwd {str(dtype)[6:]} b={b} d_inner={d} l={l}" + (" h0" if h0 else "")
            if dtype == torch.bfloat16 and not ctx.cuda:
                ctx.emit(row("scan", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)"))
                continue
            ctx.check(name, run, b, d, l, dtype, h0, block=block)


def section_step(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.state_update_triton import selective_state_update_triton

    def run(b, d, dtype):
        kw = scan_inputs(1, b, d, 16, 1, h0=True)
        args = dict(x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"], B=kw["B"][..., 0], C=kw["C"][..., 0],
                    D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"])
        low = {k: v.to(ctx.device, torch.float32 if k in ("A", "D", "dt_bias") else dtype) for k, v in args.items()}
        s_tri = kw["initial_state"].to(ctx.device, torch.float32)
        s_ref = s_tri.double()
        out = selective_state_update_triton(s_tri, **low, dt_softplus=True)
        out_r = reference.selective_state_update(s_ref, **{k: v.double() for k, v in low.items()}, dt_softplus=True)
        tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)  # tests/test_triton_scan.py; bf16 as the scan
        return compare([("out", out, out_r), ("state", s_tri, s_ref)], *tol)

    for dtype in (torch.float32, torch.bfloat16):
        for b, d in [(2, 40)] + ([] if ctx.quick else [(1, 2304), (8, 2944)]):
            name = f"step {str(dtype)[6:]} b={b} d_inner={d}"
            if dtype == torch.bfloat16 and not ctx.cuda:
                ctx.emit(row("step", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)"))
                continue
            ctx.check(name, run, b, d, dtype)


def moe_case(seed, T, d, f, E, k, activation, device, dtype, drop=False):
    """Random MoE inputs: k distinct experts per token, weights ~ N(0, 1/fan_in); drop: Switch capacity 1.0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    F1 = f if activation == "relu" else 2 * f
    x = torch.randn(T, d, generator=g)
    w1 = torch.randn(E, F1, d, generator=g) / d**0.5
    w2 = torch.randn(E, d, f, generator=g) / f**0.5
    gates = torch.rand(T, k, generator=g)
    idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    if drop:  # slot-major arrival, at most T * k / E token-slots per expert
        onehot = torch.nn.functional.one_hot(idx.t().reshape(-1), E)
        keep = ((onehot.cumsum(0) * onehot).sum(-1) - 1 < int(T * k / E)).view(k, T).t()
        idx = torch.where(keep, idx, torch.full_like(idx, -1))
    return (x.to(device, dtype), idx.to(device), gates.to(device, dtype), w1.to(device, dtype), w2.to(device, dtype))


def moe_grads(op, x, idx, gates, w1, w2, activation, dout):
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, w1, w2)]
    out = op(leaves[0], idx, leaves[1], leaves[2], leaves[3], activation)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return [("out", out)] + [(n, torch.zeros_like(t) if gr is None else gr)
                             for n, t, gr in zip(("dx", "dgates", "dw1", "dw2"), leaves, grads)]


def section_moe(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.moe_triton import moe_experts_triton

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in true fp32

    def run(T, d, f, E, k, act, dtype, drop):
        x, idx, gates, w1, w2 = moe_case(0, T, d, f, E, k, act, ctx.device, dtype, drop)
        dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, dtype)
        got = moe_grads(moe_experts_triton, x, idx, gates, w1, w2, act, dout)
        want = moe_grads(reference.moe_experts, x, idx, gates, w1, w2, act, dout)
        pairs = [(n, a, e) for (n, a), (_, e) in zip(got, want)]
        if dtype == torch.float32:  # tests/test_triton_moe.py
            return compare(pairs, 2e-5, 1e-4)
        out = compare(pairs[:1], 3e-2, 3e-2)  # tests/test_fast_moe.py bf16: 3e-2 outputs, 5e-2 x scale grads
        grads = compare(pairs[1:], 5e-2, 5e-2)
        return grads if grads["tol_ratio"] > out["tol_ratio"] else out

    cases = [("small", 40, 33, 70, 6, 2, "swiglu", False), ("small drops", 40, 33, 70, 6, 2, "relu", True)]
    if not ctx.quick:
        cases += [("blackmamba-1.5b", 2048, 1152, 3072, 8, 1, "swiglu", False),
                  ("blackmamba-2.8b", 2048, 1472, 3872, 8, 1, "swiglu", False),
                  ("moe-mamba-25m", 2048, 512, 1536, 42, 1, "relu", True),
                  ("moe-mamba-100m", 2048, 768, 2304, 42, 1, "relu", True)]
    for dtype in (torch.float32, torch.bfloat16):
        for label, T, d, f, E, k, act, drop in cases:
            name = f"fwd+bwd {str(dtype)[6:]} {label}: T={T} d={d} f={f} E={E} top-{k} {act}"
            if dtype == torch.bfloat16 and not ctx.cuda:
                ctx.emit(row("moe", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)"))
                continue
            ctx.check(name, run, T, d, f, E, k, act, dtype, drop)


def section_sinkhorn(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.sinkhorn_triton import sinkhorn_triton

    def run(T, E, sigma, init, stopping, dtype, max_iters=100, tol=1e-4):
        g = torch.Generator().manual_seed(T + E)
        logits = (sigma * torch.randn(T, E, generator=g)).to(ctx.device, dtype)
        P, n = sinkhorn_triton(logits, init, stopping, tol, max_iters)
        P_ref, n_ref = reference.sinkhorn(logits, init, stopping, tol, max_iters)
        # tests/test_fast_sinkhorn.py: P within 2e-5 of max P; counts equal unless tol +-1% changes the
        # reference's count; routes equal where the reference's top-2 differ by > 1e-3 relative
        edge = len({int(reference.sinkhorn(logits, init, stopping, tol * s, max_iters)[1]) for s in (0.99, 1.01)}) > 1
        r, abs_err = tol_ratio(P, P_ref, 2e-5 * P_ref.max().item(), 0.0)
        top2 = P_ref.topk(min(2, E), dim=1).values
        clear = (top2[:, 0] - top2[:, -1] > 1e-3 * top2[:, 0]) | (E == 1)
        routes = torch.equal(P.argmax(1)[clear], P_ref.argmax(1)[clear])
        return dict(ok=r <= 1 and routes and (edge or int(n) == int(n_ref)), tol_ratio=r, max_abs_err=abs_err,
                    passes=int(n), passes_ref=int(n_ref), knife_edge=edge, routes_equal=routes)

    cases = [(80, 5, 1.0, "uniform", "marginal"), (300, 8, 2.0, "blackmamba", "absolute")]
    if not ctx.quick:
        cases += [(16384, 8, 1.0, "blackmamba", "absolute"), (16384, 8, 1.0, "uniform", "marginal"),
                  (4096, 42, 1.0, "uniform", "marginal")]
    for dtype in (torch.float32, torch.bfloat16):
        for T, E, sigma, init, stopping in cases:
            name = f"{str(dtype)[6:]} logits T={T} E={E} {init}/{stopping}"
            if dtype == torch.bfloat16 and not ctx.cuda:
                ctx.emit(row("sinkhorn", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)"))
                continue
            ctx.check(name, run, T, E, sigma, init, stopping, dtype)


SMALL = dict(vocab_size=50, pad_vocab_size_multiple=16, d_model=32, n_layer=4, d_expert=24, max_seq_len=64)
FAMILIES = {  # tests/test_model.py: one small config per preset family
    "blackmamba": ("tiny", {}), "moe-mamba": ("moe-mamba-25m", dict(n_experts=5)), "mamba": ("mamba-25m", {}),
    "transformer-moe": ("transformer-moe-25m", dict(n_head=2, n_experts=3)),
}


def section_model(ctx):
    import torch

    from minimamba_moe import Model, ModelConfig

    torch.backends.cuda.matmul.allow_tf32 = False

    def build(preset, overrides, seed=0):
        torch.manual_seed(seed)
        model = Model(ModelConfig.from_preset(preset, **overrides, backend="reference")).to(ctx.device).eval()
        with torch.no_grad():  # random, not freshly initialised, weights (as tests/test_model.py)
            for p in model.parameters():
                if p.dim() >= 2:
                    p.add_(0.05 * torch.randn_like(p))
        return model

    def fwd_bwd(model, ids, backend, bf16=False):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return [("logits", logits.detach().float())] + [(f"grad {n}", p.grad.detach().clone())
                                                         for n, p in model.named_parameters() if p.grad is not None]

    def backends(preset, overrides, b, l, bf16=False):
        model = build(preset, overrides)  # eval mode: routing depends on the token alone (no Sinkhorn batch)
        ids = torch.randint(0, model.config.vocab_size, (b, l), generator=torch.Generator().manual_seed(1)).to(ctx.device)
        got, want = fwd_bwd(model, ids, "fast", bf16), fwd_bwd(model, ids, "reference", bf16)
        # test_model.py holds fast to reference at 1e-4 on logits; gradients 1e-3 x scale; bf16 autocast 5e-2
        tol = (5e-2, 5e-2) if bf16 else (1e-4, 1e-3)
        return compare([(n, a, e) for (n, a), (_, e) in zip(got, want)], *tol)

    def step_equals_forward(preset, overrides, l):
        model = build(preset, overrides)
        model.set_backend("fast")
        ids = torch.randint(0, model.config.vocab_size, (2, l), generator=torch.Generator().manual_seed(2)).to(ctx.device)
        with torch.no_grad():
            full = model(ids).logits
            state = model.init_state(2)
            half = l // 2
            pre = model(ids[:, :half], state=state).logits
            rest = torch.stack([model.step(ids[:, t], state) for t in range(half, l)], dim=1)
        return compare([("prefill+step logits", torch.cat([pre, rest], 1), full)], 1e-4, 1e-4)  # test_model.py STEP_*

    for family, (preset, extra) in FAMILIES.items():
        ctx.check(f"{family} small fp32: fast vs reference, logits + grads", backends, preset, {**SMALL, **extra}, 2, 10)
        ctx.check(f"{family} small: prefill + step == forward (fast)", step_equals_forward, preset, {**SMALL, **extra}, 9)
    if ctx.cuda:
        ctx.check("blackmamba small bf16 autocast: fast vs reference", backends, "tiny", SMALL, 2, 10, True)
    if not ctx.quick:
        big = dict(n_layer=2, vocab_size=4096)
        ctx.check("blackmamba-1.5b 2 layers fp32 b=1 l=512: fast vs reference", backends, "blackmamba-1.5b", big, 1, 512)
        ctx.check("blackmamba-1.5b 2 layers: prefill + step == forward", step_equals_forward, "blackmamba-1.5b", big, 32)
        ctx.check("moe-mamba-100m 2 layers fp32 b=1 l=512: fast vs reference", backends, "moe-mamba-100m", big, 1, 512)


# ---------------------------------------------------------------------------------------------------
# sections: speed


def section_speed(ctx):
    import torch

    from minimamba_moe import fast, reference
    from minimamba_moe.fast.moe_cpu import MoEExpertsCPU

    cuda, dev = ctx.cuda, ctx.device
    base = {}
    bf16 = torch.bfloat16 if cuda else torch.float32  # the dtype the model trains in; fp32 for the CPU dry run

    def copy():
        n = (1 << 30 if cuda else 1 << 24) // 2
        a = torch.empty(n, dtype=torch.bfloat16, device=dev)
        b = torch.empty_like(a)
        t = bench(lambda: b.copy_(a), cuda)
        base["GBps"] = 2 * a.nbytes / t / 1e9
        return dict(MiB=a.nbytes / 2**20, ms=t * 1e3, GBps=base["GBps"])

    def matmul():
        n = 8192 if cuda else 256
        a, b = (torch.randn(n, n, device=dev, dtype=bf16) for _ in range(2))
        t = bench(lambda: a @ b, cuda)
        base["TFLOPs"] = 2 * n**3 / t / 1e12
        return dict(n=n, ms=t * 1e3, TFLOPs=base["TFLOPs"])

    def timed(fns, nbytes=None, flops=None):
        """{label: fn} -> ms per label; GB/s (and % of copy) or TFLOP/s (and % of matmul) for the first."""
        m = {}
        for label, fn in fns.items():
            try:
                m[f"{label}_ms"] = bench(fn, cuda, budget_s=1.0 if label == "fast" else 3.0) * 1e3
            except Exception as e:  # noqa: BLE001 - a comparison that cannot run is reported, the kernel's time kept
                if label == "fast":
                    raise
                m[f"{label}_ms"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        t = m["fast_ms"] / 1e3
        if nbytes:
            m["GBps"] = nbytes / t / 1e9
            m["of_copy"] = m["GBps"] / base["GBps"] if base.get("GBps") else "n/a"
        if flops:
            m["TFLOPs"] = flops / t / 1e12
            m["of_matmul"] = m["TFLOPs"] / base["TFLOPs"] if base.get("TFLOPs") else "n/a"
        for label in fns:
            if label != "fast" and isinstance(m[f"{label}_ms"], float):
                m[f"x_vs_{label}"] = m[f"{label}_ms"] / m["fast_ms"]  # > 1: fast is faster
        return m

    def scan(b, d, l, backward):
        kw = {k: v.requires_grad_(backward) if v is not None else None
              for k, v in cast(scan_inputs(0, b, d, 16, l), bf16, dev).items()}
        out = fast.selective_scan(**kw, delta_softplus=True)
        g = torch.randn_like(out)
        seq = sum(kw[k].nbytes for k in ("u", "delta", "z", "B", "C"))
        nbytes = seq + out.nbytes  # the least a forward moves: read the inputs, write out
        if backward:
            nbytes += seq + out.nbytes + seq  # backward: read them again and g_out, write their gradients
            run = lambda op: lambda: op(**kw, delta_softplus=True).backward(g)  # noqa: E731
        else:
            run = lambda op: lambda: op(**kw, delta_softplus=True)  # noqa: E731
        with torch.set_grad_enabled(backward):
            return timed({"fast": run(fast.selective_scan), "reference": run(reference.selective_scan)}, nbytes)

    def step(b, d):
        kw = scan_inputs(0, b, d, 16, 1, h0=True)
        args = dict(x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"], B=kw["B"][..., 0], C=kw["C"][..., 0],
                    D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"])
        args = {k: v.to(dev, torch.float32 if k in ("A", "D", "dt_bias") else bf16) for k, v in args.items()}
        state = kw["initial_state"].to(dev, torch.float32)
        nbytes = 2 * state.nbytes + sum(v.nbytes for v in args.values()) + args["x"].nbytes
        return timed({f: (lambda op: lambda: op(state, **args, dt_softplus=True))(getattr(mod, "selective_state_update"))
                      for f, mod in (("fast", fast), ("reference", reference))}, nbytes)

    def moe(T, d, f, E, act, backward, drop):
        x, idx, gates, w1, w2 = moe_case(0, T, d, f, E, 1, act, dev, bf16, drop)
        leaves = [t.requires_grad_(backward) for t in (x, gates, w1, w2)]
        rows = int((idx >= 0).sum())
        flops = 2 * rows * d * (w1.shape[1] + f) * (3 if backward else 1)
        dout = torch.randn_like(x)

        def run(op):
            if backward:
                return lambda: op(*leaves[:1], idx, *leaves[1:], act).backward(dout)
            return lambda: op(*leaves[:1], idx, *leaves[1:], act)

        fns = {"fast": run(fast.moe_experts), "reference": run(reference.moe_experts)}
        if hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm"):
            fns["torch_grouped_mm"] = run(lambda *a: MoEExpertsCPU.apply(*a))  # sort + grouped_mm, plain PyTorch
        with torch.set_grad_enabled(backward):
            return timed(fns, flops=flops)

    def sinkhorn(T, E, init, stopping):
        logits = torch.randn(T, E, device=dev)
        P, n = fast.sinkhorn(logits, init, stopping)
        m = timed({"fast": lambda: fast.sinkhorn(logits, init, stopping),
                   "reference": lambda: reference.sinkhorn(logits, init, stopping)}, logits.nbytes + P.nbytes)
        return dict(m, passes=int(n))

    ctx.check("device-to-device copy", copy)
    ctx.check("dense matmul " + str(bf16)[6:], matmul)
    q = ctx.quick
    for backward in (False, True):
        what = "fwd+bwd" if backward else "fwd"
        for b, d, l in [(1, 8, 64)] if q else [(8, 2304, 2048), (4, 2944, 2048)]:
            ctx.check(f"scan {what} b={b} d_inner={d} l={l}", scan, b, d, l, backward)
        for label, T, d, f, E, act, drop in [("tiny", 64, 16, 32, 4, "swiglu", False)] if q else [
                ("blackmamba-1.5b", 16384, 1152, 3072, 8, "swiglu", False),
                ("blackmamba-2.8b", 8192, 1472, 3872, 8, "swiglu", False),
                ("moe-mamba-100m", 16384, 768, 2304, 42, "relu", True)]:
            ctx.check(f"moe {what} {label} T={T} d={d} f={f} E={E}", moe, T, d, f, E, act, backward, drop)
    for b, d in [(1, 8)] if q else [(1, 2304), (8, 2944)]:
        ctx.check(f"step b={b} d_inner={d}", step, b, d)
    for T, E, init, stopping in [(64, 4, "blackmamba", "absolute")] if q else [
            (16384, 8, "blackmamba", "absolute"), (16384, 8, "uniform", "marginal")]:
        ctx.check(f"sinkhorn T={T} E={E} {init}/{stopping}", sinkhorn, T, E, init, stopping)


# ---------------------------------------------------------------------------------------------------
# sections: train.py and sample.py in subprocesses


SHIM = ("import sys, runpy; sys.path.insert(0, {bench!r}); import gpu_check; gpu_check.use_checkout(); "
        "script, sys.argv = sys.argv[1], sys.argv[1:]\n"
        "try:\n    runpy.run_path(script, run_name='__main__')\n"
        "finally:\n    import torch\n    if torch.cuda.is_available():\n"
        "        print('GPU_CHECK_PEAK_MEM_BYTES=%d' % torch.cuda.max_memory_allocated(), flush=True)\n")


def run_script(script, args, timeout):
    """python SCRIPT ARGS with this checkout's package (installed or not); -> CompletedProcess (text)."""
    cmd = [sys.executable, "-c", SHIM.format(bench=str(REPO / "benchmarks")), str(REPO / script), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(1, timeout), cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"{script} {' '.join(args)} did not finish in {timeout:.0f} s; output so far:\n"
                           f"{(e.stdout or b'')[-2000:]!s}\n{(e.stderr or b'')[-2000:]!s}") from None


def checked(proc, what):
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def peak_mem(proc):
    m = re.findall(r"GPU_CHECK_PEAK_MEM_BYTES=(\d+)", proc.stdout)
    return round(int(m[-1]) / 2**30, 2) if m else "n/a"


def section_train(ctx):
    import torch

    work = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    help_text = run_script("train.py", ["--help"], 60).stdout

    def flags(**kw):
        """--key=value for the long-standing settings, plus the optional ones train.py --help still lists."""
        always = ("preset", "max_steps", "out_dir", "device", "dtype", "batch_size", "seq_len", "eval_interval",
                  "n_layer")
        return [f"--{k}={v}" for k, v in kw.items() if k in always or re.search(rf"\b{k}\b", help_text)]

    def run(preset, steps, b, l, **extra):
        out = work / preset
        args = flags(preset=preset, max_steps=steps, out_dir=out, device=ctx.device,
                     dtype="bfloat16" if ctx.cuda else "float32", batch_size=b, seq_len=l, eval_interval=steps,
                     tokenizer="bytes", data_cache=work / "data_cache", eval_batches=2, grad_accum=1,
                     progress="false", threads=0 if ctx.cuda else 2, **extra)
        proc = checked(run_script("train.py", args, ctx.deadline - time.monotonic()), "train.py " + " ".join(args))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps_ = [r for r in records if "loss" in r]
        if not steps_:
            raise RuntimeError(f"metrics.jsonl has no training records: {records[:3]}")
        rate_key = next((k for k in steps_[-1] if "tok" in k and ("_s" in k or "per" in k)), None)
        warm = steps_[min(5, len(steps_) - 1):]  # the first steps compile kernels
        m = dict(steps=len(steps_), first_loss=steps_[0]["loss"], last_loss=steps_[-1]["loss"])
        m["tokens_per_s"] = statistics.median(r[rate_key] for r in warm) if rate_key else "n/a (no tokens/s field)"
        m["peak_mem_GiB"] = peak_mem(proc)
        m.update(mfu(out, l, m["tokens_per_s"]))
        m["ok"] = all(math.isfinite(r["loss"]) for r in steps_)
        return m

    def mfu(out, seq_len, tokens_per_s):
        try:
            from minimamba_moe.checkpoint import read_config
            from minimamba_moe.flops import flops_per_token
        except ImportError as e:
            return dict(mfu=f"n/a ({e})")
        config = read_config(out)[0]
        try:
            fpt = flops_per_token(config, seq_len, training=True)
        except TypeError:
            fpt = flops_per_token(config, seq_len)
        achieved = fpt * tokens_per_s if isinstance(tokens_per_s, (int, float)) else math.nan
        name = torch.cuda.get_device_name(0) if ctx.cuda else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        return dict(flops_per_token=float(fpt), model_TFLOPs=achieved / 1e12,
                    mfu=achieved / peak if peak else f"n/a (no nominal peak for {name})")

    q = ctx.quick
    ctx.check("tiny preset", run, "tiny", 4 if q else 40, 2 if q else 16, 64 if q else 256)
    if not q:
        ctx.check("blackmamba-1.5b --n_layer=4", run, "blackmamba-1.5b", 30, 4, 2048, n_layer=4)


def section_sample(ctx):
    import torch

    from minimamba_moe import Model, ModelConfig
    from minimamba_moe.checkpoint import save_model

    work = Path(tempfile.mkdtemp(prefix="gpu_check_sample_"))
    q = ctx.quick
    preset, overrides = ("tiny", {}) if q else ("blackmamba-1.5b", dict(n_layer=4))

    def prepare():
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = Model(ModelConfig.from_preset(preset, **overrides))
        save_model(model, work / "ckpt", tokenizer="bytes")
        return dict(preset=preset, **overrides, params_M=model.count_params().total / 1e6)

    def decode(context):
        prompt = work / f"prompt_{context}.txt"
        prompt.write_text(("the quick brown fox jumps over the lazy dog " * (context // 44 + 1))[:context])
        args = [str(work / "ckpt"), "--prompt_file", str(prompt), "--max_new_tokens", "16" if q else "128",
                "--device", ctx.device, "--seed", "0"]
        proc = checked(run_script("sample.py", args, ctx.deadline - time.monotonic()), "sample.py " + " ".join(args))
        ms = re.findall(r"([\d.]+) ms/token", proc.stderr)
        prefill = re.findall(r"prefill: \d+ tokens in [\d.]+ s \(([\d.]+) tokens/s\)", proc.stderr)
        if not ms:
            raise RuntimeError(f"sample.py printed no ms/token: {proc.stderr[-1000:]}")
        return dict(context=context, decode_ms_per_token=float(ms[-1]),
                    prefill_tokens_per_s=float(prefill[-1]) if prefill else "n/a", peak_mem_GiB=peak_mem(proc))

    ctx.check(f"random-weights {preset} checkpoint" + "".join(f" --{k}={v}" for k, v in overrides.items()), prepare)
    if (work / "ckpt").exists():
        for context in (64, 256) if q else (1024, 8192):
            ctx.check(f"decode after {context} prompt tokens", decode, context)


# ---------------------------------------------------------------------------------------------------
# the driver


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"gpu_check.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for summary.json and summary.md (created)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu: a dry run through Triton's interpreter")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    ap.add_argument("--section-child", help=argparse.SUPPRESS)  # internal: run one section in this process
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]!r}: choose from {', '.join(SECTIONS)}")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device {args.device}: use cuda, cuda:N or cpu")
    if not args.budget > 0:
        ap.error("--budget must be a positive number of seconds")
    args.sections = sections
    return args


def check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".gpu_check_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(f"gpu_check.py: error: cannot write to --out {out} ({e.strerror or e}): give a folder you can write to",
              file=sys.stderr)
        sys.exit(2)


def child_env(device):
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the kernels on CPU tensors; must be set before triton is imported
    return env


def read_rows(path: Path) -> list[dict]:
    """A section's rows (JSON lines), keeping each check's last row: its result, or "did not finish"."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return list({r["name"]: r for r in rows}.values())


def run_section(section, args, deadline, tmp) -> list[dict]:
    results = Path(tmp) / f"{section}.jsonl"
    timeout = min(CAPS[section], deadline - time.monotonic())
    if timeout < 5:
        return [row(section, "section", "skip", reason=f"the run's --budget of {args.budget:.0f} s is spent")]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--device", args.device,
           "--section-child", section, "--results", str(results), "--deadline-s", str(timeout - 3)]
    cmd += ["--quick"] if args.quick else []
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(args.device))
        problem = None if proc.returncode == 0 else f"section process exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    except subprocess.TimeoutExpired as e:
        problem = f"section killed after its time box of {timeout:.0f} s:\n{(e.stderr or b'')[-4000:]!s}"
    rows = read_rows(results)
    if problem:
        rows.append(row(section, "section process", "error", time.monotonic() - t0, error=problem))
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.section_child:  # inside a section's subprocess
        use_checkout()
        import torch

        torch.manual_seed(0)
        ctx = Ctx(args.section_child, args.device, args.quick, time.monotonic() + args.deadline_s, args.results)
        if args.device == "cpu":
            torch.set_num_threads(min(2, torch.get_num_threads()))
        globals()[f"section_{args.section_child}"](ctx)
        return 0

    out = Path(args.out)
    check_out(out)
    t0 = time.monotonic()
    import torch

    info = dict(command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), torch=torch.__version__,
                python=sys.version.split()[0], quick=args.quick)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        reason = "no CUDA GPU here (torch.cuda.is_available() is False)"
        rows = [row(s, "section", "skip", reason=reason) for s in args.sections]
        write_summary(out, rows, dict(info, device="none", wall_s=time.monotonic() - t0,
                                      note=f"Nothing checked: {reason}. Run it on a GPU, or --device cpu --quick"))
        print(f"gpu_check: skipped, {reason}; summary in {out}/summary.md (a dry run: --device cpu --quick)")
        return 0
    info["device"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (Triton interpreter)"

    rows = []
    deadline = t0 + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for section in args.sections:
            rows += run_section(section, args, deadline, tmp)
            write_summary(out, rows, dict(info, wall_s=time.monotonic() - t0, note="running"))  # partial results survive
    # MFU against the matmul measured in this run, beside the nominal peak
    matmul = next((r["metrics"].get("TFLOPs") for r in rows if r["name"].startswith("dense matmul")), None)
    for r in rows:
        if r["section"] == "train" and matmul and isinstance(r["metrics"].get("model_TFLOPs"), float):
            r["metrics"]["of_measured_matmul"] = r["metrics"]["model_TFLOPs"] / matmul
    counts = write_summary(out, rows, dict(info, wall_s=time.monotonic() - t0))
    print(f"gpu_check: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['skip']} skipped in {time.monotonic() - t0:.0f} s on {info['device']}; {out}/summary.md")
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
