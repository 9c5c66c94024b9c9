"""Sinkhorn routing: passes to converge and the balance they buy, per init and stopping rule; and time.

    python benchmarks/bench_sinkhorn.py [--tokens 4096] [--experts 8] [--repeats 5] [--out FILE.json]

Table 1, for router logits N(0, std^2) with std 0.1 .. 5 (sharper logits = tokens agree more):
passes run (cap 100, tol 1e-4, logit_scale 2 as released) and the expert load imbalance of the
resulting routes, max load / mean load of argmax_e P[t, e] (1.0 = perfectly balanced), for both
initialisations and both stopping rules; "none" is the plain argmax of the logits (no Sinkhorn).
The logits share a per-expert bias (also ~std) as trained routers do, so the plain argmax is
imbalanced (by the same amount at every std: scaling logits does not move an argmax) and Sinkhorn
has work to do; what std changes is how sharp exp(2 * logits) is, i.e. how hard it is to balance.
Table 2: time of reference.sinkhorn vs fast.sinkhorn (the fused Triton kernel on a GPU, the lean
CPU loop here), medians. One thread by default: these are small, latency-bound ops, and on a
shared machine waking a second intra-op thread costs a scheduler tick per op (~16 ms measured).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Transcript, write_benchmark_json  # noqa: E402
from minimamba_moe import fast, reference  # noqa: E402

STDS = (0.1, 0.3, 1.0, 2.0, 5.0)
RULES = [(init, stopping) for init in ("blackmamba", "uniform") for stopping in ("absolute", "marginal")]


def make_logits(T, E, std, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    bias = std * torch.randn(E, generator=g)  # a shared preference per expert
    return (std * torch.randn(T, E, generator=g) + bias).to(device)


def imbalance(routes, E):
    load = torch.bincount(routes, minlength=E).float()
    return (load.max() / load.mean()).item()


def timed(fn, repeats, device, clock=time.perf_counter):
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(clock() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time; cpu: CPU seconds of this process (with --threads 1, the time it "
                             "would take on an idle core, whatever else runs on a shared machine)")
    parser.add_argument("--out", default="", help="write the rows and the printed tables as JSON here")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    T, E = args.tokens, args.experts
    say, balance, timing = Transcript(), [], []


    say(f"T = {T} tokens, E = {E} experts, tol 1e-4, cap 100 passes, logit_scale 2, device {args.device}, "
        f"{args.clock} clock\n")
    say("| logit std | argmax only: imbalance | " + " | ".join(f"{i} + {s}: passes, imbalance" for i, s in RULES) + " |")
    say("|---" * (2 + len(RULES)) + "|")
    for std in STDS:
        logits = make_logits(T, E, std, args.device)
        argmax = imbalance(logits.argmax(1), E)
        cells = [f"{argmax:.2f}"]
        for init, stopping in RULES:
            P, n = fast.sinkhorn(logits, init=init, stopping=stopping, max_iters=100)
            balance.append({"std": std, "argmax_imbalance": argmax, "init": init, "stopping": stopping,
                            "passes": int(n), "imbalance": imbalance(P.argmax(1), E)})
            cells.append(f"{int(n)}, {balance[-1]['imbalance']:.2f}")
        say(f"| {std} | " + " | ".join(cells) + " |")

    say("\n| logit std | init + rule | passes | reference ms | fast ms | ratio |")
    say("|---|---|---|---|---|---|")
    for std in (0.3, 2.0):
        logits = make_logits(T, E, std, args.device)
        for init, stopping in RULES:
            kw = dict(init=init, stopping=stopping, max_iters=100)
            n = int(fast.sinkhorn(logits, **kw)[1])
            t_ref = timed(lambda: reference.sinkhorn(logits, **kw), args.repeats, args.device, clock)
            t_fast = timed(lambda: fast.sinkhorn(logits, **kw), args.repeats, args.device, clock)
            timing.append({"std": std, "init": init, "stopping": stopping, "passes": n, "reference_ms": 1e3 * t_ref,
                           "fast_ms": 1e3 * t_fast, "ratio": t_ref / t_fast})
            say(f"| {std} | {init} + {stopping} | {n} | {1e3 * t_ref:.2f} | {1e3 * t_fast:.2f} "
                f"| {t_ref / t_fast:.2f}x |")
    write_benchmark_json(args.out, "bench_sinkhorn.py", args, say, balance=balance, timing=timing)


if __name__ == "__main__":
    main()
