"""Reference vs fast moe_experts on this machine's device (the CPU path without a GPU).

    python benchmarks/bench_moe.py [--repeats 5] [--threads 2] [--dtype float32] [--out FILE.json]

Times forward, and forward + backward (gradients of x, gates, w1, w2), at the SHAPES below
(tokens T, width d, expert width ffn, experts E, top-k), and prints medians and the reference /
fast ratio. Reference and fast calls alternate, so a busy shared machine slows both alike. Random
top-k routing (distinct experts per token), SwiGLU experts. Both ops get identical inputs; one
warm-up call each is not timed.
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

SHAPES = [  # (T, d, ffn, E, k)
    (4096, 512, 1024, 8, 1),
    (4096, 512, 1024, 8, 2),
    (1024, 256, 256, 64, 8),
]


def make_inputs(T, d, f, E, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device, dtype)
    w1 = (torch.randn(E, 2 * f, d, generator=g) / d**0.5).to(device, dtype)
    w2 = (torch.randn(E, d, f, generator=g) / f**0.5).to(device, dtype)
    expert_idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(device)  # k distinct experts
    gates = torch.rand(T, k, generator=g).to(device, dtype)
    return x, expert_idx, gates, w1, w2


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # main() sets time.process_time for --clock cpu


def call(op, inputs, backward):
    """One timed call of op on fresh leaves (forward, and backward when asked)."""
    x, expert_idx, gates, w1, w2 = inputs
    leaves = [t.detach().requires_grad_(backward) for t in (x, gates, w1, w2)]
    start = CLOCK()
    out = op(leaves[0], expert_idx, leaves[1], leaves[2], leaves[3], "swiglu")
    if backward:
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    sync(str(out.device))
    return CLOCK() - start


def time_pair(inputs, backward, repeats):
    """Medians for reference and fast, calls interleaved so that both see the same machine load."""
    times = {"reference": [], "fast": []}
    for i in range(repeats + 1):
        for name, op in (("reference", reference.moe_experts), ("fast", fast.moe_experts)):
            t = call(op, inputs, backward)
            if i:  # the first round warms up
                times[name].append(t)
    return statistics.median(times["reference"]), statistics.median(times["fast"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time; cpu: CPU seconds of this process (with --threads 1, the time it "
                             "would take on an idle core, whatever else runs on a shared machine)")
    parser.add_argument("--out", default="", help="write the rows and the printed table as JSON here")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    say, rows = Transcript(), []


    say(f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats}, "
        f"{args.clock} clock")
    say("| T | d | ffn | E | k | pass | reference ms | fast ms | ratio |")
    say("|---|---|---|---|---|---|---|---|---|")
    for T, d, f, E, k in SHAPES:
        inputs = make_inputs(T, d, f, E, k, dtype, args.device)
        for backward in (False, True):
            t_ref, t_fast = time_pair(inputs, backward, args.repeats)
            name = "fwd+bwd" if backward else "fwd"
            rows.append({"T": T, "d": d, "ffn": f, "E": E, "k": k, "pass": name, "reference_ms": 1e3 * t_ref,
                         "fast_ms": 1e3 * t_fast, "ratio": t_ref / t_fast})
            say(f"| {T} | {d} | {f} | {E} | {k} | {name} | {1e3 * t_ref:.1f} | {1e3 * t_fast:.1f} "
                f"| {t_ref / t_fast:.2f}x |")
    write_benchmark_json(args.out, "bench_moe.py", args, say, rows=rows)


if __name__ == "__main__":
    main()
