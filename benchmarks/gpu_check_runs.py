"""The timing sections of gpu_check.py: kernel speed, train.py and sample.py on the device.

Each ``section_<name>(ctx)`` yields its plan of checks, run in its own subprocess (see gpu_check.py).
Timings are medians of CUDA-event measurements; the ratios compare against a copy and a dense
matmul measured in the same run, and against plain PyTorch doing the same work.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check import REPO, check
from gpu_check_kernels import cast, moe_case, scan_inputs

# Nominal dense bf16 peak (no sparsity) for MFU, by device-name substring; the measured matmul is reported too.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
SWEEP_S = 30.0  # the scan tile sweep's own time box: each new tile compiles two kernels (~2-4 s each)


def bench(fn, cuda, budget_s=0.5, min_reps=3, max_reps=20, cold_ok=False):
    """(median seconds of fn(), how many runs it is the median of): CUDA events on a GPU, perf_counter on CPU.

    The first call is a warm-up (Triton compiles, the allocator grows). With ``cold_ok`` (plain
    PyTorch: nothing to compile), a first call longer than budget_s is the one measurement instead:
    the reference scan's backward at the papers' sizes takes ~10 s a call (its loop over positions
    makes autograd add l full-size gradients), and three more calls would eat the section's time.
    """
    import torch

    def once():
        if not cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3

    first = once()
    if cold_ok and first > budget_s:
        return first, 1
    times, end = [], time.monotonic() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.monotonic() < end):
        times.append(once())
    return statistics.median(times), len(times)


def section_speed(ctx):
    import torch

    from minimamba_moe import fast, reference
    from minimamba_moe.fast.aot.launch_capture import SCAN_TILES
    from minimamba_moe.fast.moe_cpu import MoEExpertsCPU
    from minimamba_moe.fast.scan_triton import selective_scan_triton

    cuda, dev = ctx.cuda, ctx.device
    base = {}
    bf16 = torch.bfloat16 if cuda else torch.float32  # the dtype the model trains in; fp32 for the CPU dry run

    def copy():
        n = (1 << 30 if cuda else 1 << 24) // 2
        a = torch.empty(n, dtype=torch.bfloat16, device=dev)
        b = torch.empty_like(a)
        t = bench(lambda: b.copy_(a), cuda)[0]
        base["GBps"] = 2 * a.nbytes / t / 1e9
        return dict(MiB=a.nbytes / 2**20, ms=t * 1e3, GBps=base["GBps"])

    def matmul():
        n = 8192 if cuda else 256
        a, b = (torch.randn(n, n, device=dev, dtype=bf16) for _ in range(2))
        t = bench(lambda: a @ b, cuda)[0]
        base["TFLOPs"] = 2 * n**3 / t / 1e12
        return dict(n=n, ms=t * 1e3, TFLOPs=base["TFLOPs"])

    def timed(fns, nbytes=None, flops=None):
        """{label: fn} -> ms per label; GB/s (and % of copy) or TFLOP/s (and % of matmul) for the first."""
        m = {}
        for label, fn in fns.items():
            try:
                t, runs = bench(fn, cuda, budget_s=0.5 if label == "fast" else 1.0, cold_ok=label != "fast")
                m[f"{label}_ms"] = t * 1e3
                if runs == 1:
                    m[f"{label}_runs"] = "1 (one call took longer than the timing budget)"
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
              for k, v in cast(scan_inputs(0, b, d, 16, l, device=dev), bf16, dev).items()}
        out = fast.selective_scan(**kw, delta_softplus=True)
        g = torch.randn_like(out)
        seq = sum(kw[k].nbytes for k in ("u", "delta", "z", "B", "C"))
        nbytes = seq + out.nbytes  # the least a forward moves: read the inputs, write out
        leaves = [v for v in kw.values() if v is not None]
        if backward:
            nbytes += seq + out.nbytes + seq  # backward: read them again and g_out, write their gradients
            run = lambda op: lambda: torch.autograd.grad(op(**kw, delta_softplus=True), leaves, g)  # noqa: E731
        else:
            run = lambda op: lambda: op(**kw, delta_softplus=True)  # noqa: E731
        with torch.set_grad_enabled(backward):
            return timed({"fast": run(fast.selective_scan), "reference": run(reference.selective_scan)}, nbytes)

    def step(b, d):
        kw = scan_inputs(0, b, d, 16, 1, True, dev)
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
                return lambda: torch.autograd.grad(op(*leaves[:1], idx, *leaves[1:], act), leaves, dout)
            return lambda: op(*leaves[:1], idx, *leaves[1:], act)

        fns = {"fast": run(fast.moe_experts), "reference": run(reference.moe_experts)}
        if hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm"):
            fns["torch_grouped_mm"] = run(lambda *a: MoEExpertsCPU.apply(*a))  # sort + grouped_mm, plain PyTorch
        with torch.set_grad_enabled(backward):
            return timed(fns, flops=flops)

    sweep = {}  # the scan tile sweep's end time and the default tile's ms

    def scan_tile(b, d, l, block_l, block_d):
        """selective_scan_triton fwd+bwd with one (block_l, block_d) tile; ms and the default tile's ms / this."""
        end = sweep.setdefault("end", time.monotonic() + SWEEP_S)
        if time.monotonic() > end:
            return dict(skip=f"the scan tile sweep's time box of {SWEEP_S:.0f} s ran out before this tile")
        kw = {k: v.requires_grad_(True) if v is not None else None
              for k, v in cast(scan_inputs(0, b, d, 16, l, device=dev), bf16, dev).items()}
        leaves = [v for v in kw.values() if v is not None]
        g = torch.randn_like(kw["u"])  # dLoss/dout, (b, d, l) like u
        t = bench(lambda: torch.autograd.grad(selective_scan_triton(
            **kw, delta_softplus=True, block_l=block_l, block_d=block_d)[0], leaves, g), cuda)[0]
        sweep.setdefault("default_ms", t * 1e3)  # the first tile is the default
        return dict(ms=t * 1e3, x_vs_default=sweep["default_ms"] / (t * 1e3))  # > 1: this tile is faster

    def sinkhorn(T, E, init, stopping):
        logits = torch.randn(T, E, device=dev)
        P, n = fast.sinkhorn(logits, init, stopping)
        m = timed({"fast": lambda: fast.sinkhorn(logits, init, stopping),
                   "reference": lambda: reference.sinkhorn(logits, init, stopping)}, logits.nbytes + P.nbytes)
        return dict(m, passes=int(n))

    yield check("device-to-device copy", copy)
    yield check("dense matmul " + str(bf16)[6:], matmul)
    q = ctx.quick
    for backward in (False, True):
        what = "fwd+bwd" if backward else "fwd"
        for b, d, l in [(1, 8, 64)] if q else [(8, 2304, 2048), (4, 2944, 2048)]:
            yield check(f"scan {what} b={b} d_inner={d} l={l}", scan, b, d, l, backward)
        for label, T, d, f, E, act, drop in [("tiny", 64, 16, 32, 4, "swiglu", False)] if q else [
                ("blackmamba-1.5b", 16384, 1152, 3072, 8, "swiglu", False),
                ("blackmamba-2.8b", 8192, 1472, 3872, 8, "swiglu", False),
                ("moe-mamba-100m", 16384, 768, 2304, 42, "relu", True)]:
            yield check(f"moe {what} {label} T={T} d={d} f={f} E={E}", moe, T, d, f, E, act, backward, drop)
    for b, d in [(1, 8)] if q else [(1, 2304), (8, 2944)]:
        yield check(f"step b={b} d_inner={d}", step, b, d)
    for T, E, init, stopping in [(64, 4, "blackmamba", "absolute")] if q else [
            (16384, 8, "blackmamba", "absolute"), (16384, 8, "uniform", "marginal")]:
        yield check(f"sinkhorn T={T} E={E} {init}/{stopping}", sinkhorn, T, E, init, stopping)
    # Scan tile sweep (last; SWEEP_S): (block_l, block_d) for the forward and backward kernels alike, the
    # default first; the alternatives are fast/aot/launch_capture.py's SCAN_TILES, chosen by ptxas's registers.
    b, d, l = (1, 4, 32) if q else (4, 2944, 2048)
    for block_l, block_d in [(None, None)] + ([(16, 2), (8, 4)] if q else list(SCAN_TILES)):
        tile = "default" if block_l is None else f"block_l={block_l} block_d={block_d}"
        yield check(f"scan tile {tile} fwd+bwd b={b} d_inner={d} l={l}", scan_tile, b, d, l, block_l, block_d)


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
        return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=max(1, timeout),
                              cwd=REPO)  # sample.py prints random-weight text: any bytes, any locale
    except subprocess.TimeoutExpired as e:  # (its output so far arrives as bytes, whatever the encoding asked)
        text = [o.decode("utf-8", "replace") if isinstance(o, bytes) else (o or "") for o in (e.stdout, e.stderr)]
        raise TimeoutError(f"{script} {' '.join(args)} did not finish in {timeout:.0f} s; output so far:\n"
                           f"{text[0][-2000:]}\n{text[1][-2000:]}") from None


def checked(proc, what):
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def peak_mem(proc):
    m = re.findall(r"GPU_CHECK_PEAK_MEM_BYTES=(\d+)", proc.stdout)
    return round(int(m[-1]) / 2**30, 2) if m else "n/a"


def train_metrics(records: list[dict]) -> dict:
    """train.py's metrics.jsonl records -> steps, first and last loss, median tokens/s after 5 warm-up steps."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        raise RuntimeError(f"metrics.jsonl has no training records: {records[:3]}")
    numeric = [k for k, v in steps[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    rate_key = next((k for k in ["tokens_per_s"] + numeric if k in numeric and re.fullmatch(
        r"tok(en)?s?_(per_)?s(ec(ond)?)?", k)), None)  # tokens_per_s, or a renamed tok_s / tokens_per_sec
    warm = steps[min(5, len(steps) - 1):]  # the first steps compile kernels
    rate = statistics.median(r[rate_key] for r in warm) if rate_key else "n/a (no tokens/s field in metrics.jsonl)"
    return dict(steps=len(steps), first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"], tokens_per_s=rate)


def section_train(ctx):
    import torch

    lazy = {}  # made by the first check that needs them (nothing runs while the plan is built)

    def work():
        if "work" not in lazy:
            lazy["work"] = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
        return lazy["work"]

    def corpus():
        """One text file of this checkout's .py and .md sources (~1.5 MB): train.py's default data, the
        Python standard library's .py files, need not exist on the GPU machine; the checkout does."""
        path = work() / "corpus.txt"
        if not path.exists():
            files = sorted(f for pattern in ("*.py", "*.md") for f in REPO.rglob(pattern)
                           if not any(part.startswith(".") for part in f.relative_to(REPO).parts))
            path.write_text("\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8")
        return path

    def flags(**kw):
        """--key=value for the long-standing settings, plus the optional ones train.py --help still lists."""
        if "help" not in lazy:
            lazy["help"] = run_script("train.py", ["--help"], 60).stdout
        always = ("preset", "max_steps", "out_dir", "device", "dtype", "batch_size", "seq_len", "eval_interval",
                  "n_layer")
        return [f"--{k}={v}" for k, v in kw.items() if k in always or re.search(rf"\b{k}\b", lazy["help"])]

    def run(preset, steps, b, l, **extra):
        out = work() / preset
        args = flags(preset=preset, max_steps=steps, out_dir=out, device=ctx.device,
                     dtype="bfloat16" if ctx.cuda else "float32", batch_size=b, seq_len=l, eval_interval=steps,
                     tokenizer="bytes", data=corpus(), data_cache=work() / "data_cache", eval_batches=2, grad_accum=1,
                     progress="false", threads=0 if ctx.cuda else 2, **extra)
        proc = checked(run_script("train.py", args, ctx.deadline - time.monotonic()), "train.py " + " ".join(args))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        m = train_metrics(records)
        m["peak_mem_GiB"] = peak_mem(proc)
        m["data_MB"] = corpus().stat().st_size / 1e6  # this checkout's sources, not the stdlib's
        m.update(mfu(out, l, m["tokens_per_s"]))
        m["ok"] = all(math.isfinite(r["loss"]) for r in records if "loss" in r)
        return m

    def mfu(out, seq_len, tokens_per_s):
        try:
            from minimamba_moe.flops import flops_per_token
            from minimamba_moe.run.checkpoint import read_config
        except ImportError as e:
            return dict(mfu=f"n/a ({e})")
        fpt = flops_per_token(read_config(out)[0], seq_len, training=True)
        fpt = float(getattr(fpt, "total", fpt))  # a FlopCount (forward x 3 in training), or a number
        achieved = fpt * tokens_per_s if isinstance(tokens_per_s, (int, float)) else math.nan
        name = torch.cuda.get_device_name(torch.device(ctx.device)) if ctx.cuda else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        return dict(flops_per_token=fpt, model_TFLOPs=achieved / 1e12,
                    mfu=achieved / peak if peak else f"n/a (no nominal peak for {name})")

    q = ctx.quick
    yield check("tiny preset", run, "tiny", 4 if q else 40, 2 if q else 16, 64 if q else 256)
    if not q:
        yield check("blackmamba-1.5b --n_layer=4", run, "blackmamba-1.5b", 30, 4, 2048, n_layer=4)


def section_sample(ctx):
    import torch

    from minimamba_moe import Model, ModelConfig
    from minimamba_moe.run.checkpoint import save_model

    lazy = {}
    q = ctx.quick
    preset, overrides = ("tiny", {}) if q else ("blackmamba-1.5b", dict(n_layer=4))

    def prepare():
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = Model(ModelConfig.from_preset(preset, **overrides))
        work = Path(tempfile.mkdtemp(prefix="gpu_check_sample_"))
        save_model(model, work / "ckpt", tokenizer="bytes")
        lazy["work"] = work
        return dict(preset=preset, **overrides, params_M=model.count_params().total / 1e6)

    def decode(context):
        if "work" not in lazy:
            raise RuntimeError("no checkpoint to sample from: the random-weights check before this one failed")
        work = lazy["work"]
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

    yield check(f"random-weights {preset} checkpoint" + "".join(f" --{k}={v}" for k, v in overrides.items()), prepare)
    for context in (64, 256) if q else (1024, 8192):
        yield check(f"decode after {context} prompt tokens", decode, context)
