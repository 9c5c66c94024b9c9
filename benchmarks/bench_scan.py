"""Selective scan benchmark: reference vs fast (CPU path), forward and forward+backward, and peak memory.

    python benchmarks/bench_scan.py                       # b=2, d_inner=512, d_state=16, L in {256, 1024, 4096}
    python benchmarks/bench_scan.py --ref-bwd-max-len 4096 --ref-repeats 3   # everything (the reference takes minutes)
    python benchmarks/bench_scan.py --out benchmarks/results/bench_scan.json  # and write the table as JSON

How it measures (choices made to be honest on a shared machine):
- Every (implementation, mode, L) case runs in a fresh subprocess, so one case's allocations or
  warm caches cannot help or hurt another, and all cases run in the same invocation of this script.
- Time: median of the repeats of the whole call (forward; or forward + backward of out.sum(),
  with every input requiring grad, as in training). One untimed warm-up run first for "fast"
  (the reference is too slow for a warm-up at large L; its first run is timed).
- Peak memory: the process's peak resident set size (getrusage ru_maxrss, Linux: KiB) after the
  repeats, minus the resident size just before the first full-size run (inputs already built, and
  the op already run once on an 8-position problem so that its code pages are resident for both
  implementations); the fast path's full-size warm-up run counts. torch's CPU
  allocator returns big blocks to the OS, so this is the extra memory the op itself touched at its
  worst moment; tracemalloc cannot see torch's allocations.
- The reference forward+backward at long L takes minutes: it is only run up to --ref-bwd-max-len
  (default 1024) and with --ref-repeats repeats (default 1); skipped cells say "skipped".
- On CUDA (when present) the Triton kernels are timed as well, with CUDA events, and the achieved
  bandwidth is reported: the bytes the kernel must move at least (its inputs and outputs, once)
  divided by the time, next to a device-to-device copy's bandwidth measured in the same run.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(b, d, n, L, device="cpu", dtype=None, requires_grad=False):
    """The model's call: delta before bias, softplus on, A = -(1..n), D, z, delta_bias at init ranges."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype)

    dt = torch.exp(torch.rand(d, generator=g) * 4.6 - 6.9)  # log-uniform in [1e-3, 1e-1]
    kw = dict(u=r(b, d, L), delta=r(b, d, L, scale=0.5), A=-torch.arange(1, n + 1.0).expand(d, n).contiguous().to(device),
              B=r(b, n, L), C=r(b, n, L), D=torch.ones(d, device=device), z=r(b, d, L),
              delta_bias=(dt + torch.log(-torch.expm1(-dt))).to(device))
    if requires_grad:
        for v in kw.values():
            v.requires_grad_()
    return kw


def current_rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_case(impl, mode, L, b, d, n, repeats, threads, clock="wall"):
    """In this (fresh) process: time ``repeats`` calls, return times and the peak RSS increase."""
    import torch

    torch.set_num_threads(threads)
    if impl == "reference":
        from minimamba_moe.reference.selective_scan import selective_scan
    else:
        from minimamba_moe.fast.selective_scan import selective_scan
    kw = make_inputs(b, d, n, L, requires_grad=(mode == "fwd+bwd"))

    def once():
        if mode == "fwd":
            with torch.no_grad():
                selective_scan(**kw, delta_softplus=True)
        else:
            selective_scan(**kw, delta_softplus=True).sum().backward()
            for v in kw.values():
                v.grad = None

    # Page in the op's code (libraries, kernels) on a tiny problem first, for both implementations:
    # first-touch code pages are resident memory too, but not memory the op needs per call.
    tiny = make_inputs(b, d, n, 8, requires_grad=(mode == "fwd+bwd"))
    out = selective_scan(**tiny, delta_softplus=True)
    if mode == "fwd+bwd":
        out.sum().backward()
    del tiny, out
    rss0 = current_rss_kib()  # before any full-size run: the fast path's warm-up counts towards its peak
    if impl == "fast":
        once()
    times = []
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(repeats):
        t = now()
        once()
        times.append(now() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"times": times, "peak_mib": max(0, peak - rss0) / 1024}


def cuda_section(b, d, n, lengths, repeats, print=print):
    """Triton forward / forward+backward on the GPU: time and achieved bandwidth."""
    import torch

    from minimamba_moe.fast.scan_triton import selective_scan_triton

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        return statistics.median(ts)

    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    copy_s = timed(lambda: big.clone())
    copy_gbs = 2 * big.numel() / copy_s / 1e9
    print(f"\nCUDA {torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    print("| dtype | L | triton fwd ms | fwd GB/s | triton fwd+bwd ms | fwd+bwd GB/s | fast CPU-path algo on GPU fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|")
    from minimamba_moe.fast.scan_cpu import selective_scan_cpu

    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        for L in lengths:
            kw = make_inputs(b, d, n, L, device="cuda", dtype=dtype, requires_grad=True)
            for k in ("A", "D", "delta_bias"):
                kw[k] = kw[k].float().detach().requires_grad_()
            fwd_bytes = es * (4 * b * d * L + 2 * b * n * L) + 4 * b * d * n * (2 + -(-L // 32))
            bwd_bytes = fwd_bytes + es * (b * d * L + 2 * b * n * L + b * d * L) + 4 * (3 * b * d * L)
            t_f = timed(lambda: selective_scan_triton(**kw, delta_softplus=True))
            t_fb = timed(lambda: selective_scan_triton(**kw, delta_softplus=True)[0].sum().backward())
            t_torch = timed(lambda: selective_scan_cpu(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                                                      kw["z"], kw["delta_bias"], True, None, torch.float32)[0]
                            .sum().backward())
            print(f"| {str(dtype)[6:]} | {L} | {t_f * 1e3:.3f} | {fwd_bytes / t_f / 1e9:.0f} | {t_fb * 1e3:.3f} | "
                  f"{bwd_bytes / t_fb / 1e9:.0f} | {t_torch * 1e3:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-inner", type=int, default=512)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=5, help="repeats of the fast path (median reported)")
    p.add_argument("--ref-repeats", type=int, default=1, help="repeats of the reference")
    p.add_argument("--ref-bwd-max-len", type=int, default=1024, help="longest L for the reference fwd+bwd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: CPU seconds of this process (with --threads 1, the time it "
                        "would take on an idle core, whatever else runs on a shared machine)")
    p.add_argument("--out", default="", help="write the rows and the printed table as JSON here")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    a = p.parse_args()
    b, d, n = a.batch, a.d_inner, a.d_state

    if a.case:
        impl, mode, L, repeats = a.case.split(",")
        print(json.dumps(run_case(impl, mode, int(L), b, d, n, int(repeats), a.threads, a.clock)))
        return

    def sub(impl, mode, L, repeats):
        cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{impl},{mode},{L},{repeats}",
               "--batch", str(b), "--d-inner", str(d), "--d-state", str(n), "--threads", str(a.threads),
               "--clock", a.clock]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import Transcript, write_benchmark_json

    say, rows = Transcript(), []


    say(f"selective scan, b={b}, d_inner={d}, d_state={n}, fp32, delta_softplus, D, z, delta_bias; "
          f"{a.threads} threads, {a.clock} clock; fast: median of {a.repeats}, reference: median of {a.ref_repeats}")
    say("| L | mode | reference s | fast s | speed-up | reference peak MiB | fast peak MiB | memory ratio |")
    say("|---|---|---|---|---|---|---|---|")
    for L in a.lengths:
        for mode in ("fwd", "fwd+bwd"):
            fast = sub("fast", mode, L, a.repeats)
            t_fast = statistics.median(fast["times"])
            if mode == "fwd+bwd" and L > a.ref_bwd_max_len:
                rows.append({"L": L, "mode": mode, "fast_s": t_fast, "fast_peak_mib": fast["peak_mib"]})
                say(f"| {L} | {mode} | skipped (--ref-bwd-max-len {a.ref_bwd_max_len}) | {t_fast:.3f} | - | - | "
                      f"{fast['peak_mib']:.0f} | - |")
                continue
            ref = sub("reference", mode, L, a.ref_repeats)
            t_ref = statistics.median(ref["times"])
            rows.append({"L": L, "mode": mode, "reference_s": t_ref, "fast_s": t_fast, "speedup": t_ref / t_fast,
                         "reference_peak_mib": ref["peak_mib"], "fast_peak_mib": fast["peak_mib"]})
            say(f"| {L} | {mode} | {t_ref:.3f} | {t_fast:.3f} | {t_ref / t_fast:.0f}x | {ref['peak_mib']:.0f} | "
                f"{fast['peak_mib']:.0f} | {fast['peak_mib'] / max(ref['peak_mib'], 1e-9):.3f} |")

    try:
        import torch

        if torch.cuda.is_available():
            cuda_section(b, d, n, a.lengths, a.repeats, print=say)
        else:
            say("\nNo CUDA device: Triton kernels not timed.")
    except ImportError as e:
        say(f"\nTriton section skipped: {e}")
    if a.out:
        torch.set_num_threads(a.threads)  # what machine() reports: the threads every case ran with
        write_benchmark_json(a.out, "bench_scan.py", a, say, drop=("case", "out"), rows=rows)


if __name__ == "__main__":
    main()
