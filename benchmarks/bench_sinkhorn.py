"""Sinkhorn routing: passes to converge and the balance they buy, per init and stopping rule; and time.

    python benchmarks/bench_sinkhorn.py [--tokens 4096] [--experts 8] [--repeats 5]

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


def timed(fn, repeats, device):
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    T, E = args.tokens, args.experts
    print(f"T = {T} tokens, E = {E} experts, tol 1e-4, cap 100 passes, logit_scale 2, device {args.device}\n")
    print("| logit std | argmax only: imbalance | " + " | ".join(f"{i} + {s}: passes, imbalance" for i, s in RULES) + " |")
    print("|---" * (2 + len(RULES)) + "|")
    for std in STDS:
        logits = make_logits(T, E, std, args.device)
        cells = [f"{imbalance(logits.argmax(1), E):.2f}"]
        for init, stopping in RULES:
            P, n = fast.sinkhorn(logits, init=init, stopping=stopping, max_iters=100)
            cells.append(f"{int(n)}, {imbalance(P.argmax(1), E):.2f}")
        print(f"| {std} | " + " | ".join(cells) + " |", flush=True)

    print(f"\n| logit std | init + rule | passes | reference ms | fast ms | ratio |")
    print("|---|---|---|---|---|---|")
    for std in (0.3, 2.0):
        logits = make_logits(T, E, std, args.device)
        for init, stopping in RULES:
            kw = dict(init=init, stopping=stopping, max_iters=100)
            n = int(fast.sinkhorn(logits, **kw)[1])
            t_ref = timed(lambda: reference.sinkhorn(logits, **kw), args.repeats, args.device)
            t_fast = timed(lambda: fast.sinkhorn(logits, **kw), args.repeats, args.device)
            print(f"| {std} | {init} + {stopping} | {n} | {1e3 * t_ref:.2f} | {1e3 * t_fast:.2f} "
                  f"| {t_ref / t_fast:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
