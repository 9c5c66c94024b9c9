"""Passes the released Sinkhorn stopping rule runs, against the batch size and a shift of the logits.

    python benchmarks/sinkhorn_passes.py --out benchmarks/results/sinkhorn_passes.json

The released rule stops when mean |d1 - d1_old| < 1e-4: an *absolute* change of d1, while d1
itself is about 1 / (E x T x mean exp(2 logit)). So the pass count depends on the scale of d1,
not only on how far from balanced the routes are. This measures it on synthetic router logits,
N(0, 1) per token and expert, plus a constant shift (0, -4, -6: a router whose logits drifted
negative has small exp(2 logit) and a large d1), for T from 128 to 16,384 tokens per batch,
E = 8 experts, with `minimamba_moe.reference.sinkhorn` as released (init blackmamba, stopping
absolute, tol 1e-4, logit_scale 2, cap 100 passes), one draw of the logits per seed.

Prints one row per (shift, T): the passes of every seed. Seconds on a CPU.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Transcript, machine, write_json  # noqa: E402

from minimamba_moe import reference  # noqa: E402

SHIFTS = (0.0, -4.0, -6.0)
TOKENS = (128, 1024, 4096, 16384)


def passes(T: int, E: int, shift: float, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + shift
    return int(reference.sinkhorn(logits, init="blackmamba", stopping="absolute", tol=1e-4, max_iters=100)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    say, rows = Transcript(), []


    say(f"E = {args.experts} experts, logits N(0, 1) + shift, released rule (blackmamba init, absolute stop, "
        f"tol 1e-4, logit_scale 2), seeds {args.seeds}")
    say("| shift | T | passes per seed | min | max |")
    say("|---|---|---|---|---|")
    for shift in SHIFTS:
        for T in TOKENS:
            n = [passes(T, args.experts, shift, s) for s in seeds]
            rows.append({"shift": shift, "tokens": T, "passes": n, "min": min(n), "max": max(n)})
            say(f"| {shift:g} | {T} | {', '.join(map(str, n))} | {min(n)} | {max(n)} |")
    command = "python benchmarks/sinkhorn_passes.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out, {"command": command.rstrip(), "machine": machine(), "experts": args.experts, "seeds": seeds,
                          "rows": rows, "by": {f"{r['shift']:g},{r['tokens']}": r for r in rows},
                          "output": say.text})


if __name__ == "__main__":
    main()
