"""Training throughput (tokens/s) of the four models at equal active parameters, fast vs reference kernels.

    python benchmarks/bench_train.py [--quick] [--out results.json] [--png throughput.png]

One training step = forward, cross-entropy (+ the MoE auxiliary loss), backward, gradient clip,
AdamW update, on random windows of the embedded corpus. For each model the "fast" and
"reference" kernel backends run the same weights and alternate step by step, so that a busy
shared machine slows both alike (on CPU the clock is this process's CPU time, one thread, see
--clock); the table gives the median step time, tokens/s, the achieved
model FLOP/s (minimamba_moe/flops.py, training = 3 x forward) and the fast / reference speed-up.
Attention uses PyTorch's scaled_dot_product_attention under both backends.

Scale to the papers on a GPU: --d_model 768 --n_layer 32 --n_experts 42 --d_expert 2304
--batch_size 8 --seq_len 1024 (MoE-Mamba 100M's shape; add --backends fast to skip the slow
reference).
"""

from __future__ import annotations

import statistics

import torch

from common import (FAMILIES, LABELS, Trainer, add_data_args, add_model_args, base_parser, describe,
                    equal_active_configs, machine, plot, prepare, table, timer, write_json)

from minimamba_moe.flops import flops_per_token
from minimamba_moe.run.data import Batches


def main():
    p = base_parser(__doc__)
    add_data_args(p)
    add_model_args(p, d_model=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per model and backend (after one warm-up)")
    p.add_argument("--backends", default="fast,reference")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_experts = 64, 2, 4
        args.batch_size, args.seq_len, args.repeats = 2, 32, 2
    torch.set_num_threads(args.threads)
    clock = timer(args)
    backends = args.backends.split(",")
    folder = prepare(args.data, args.data_cache)
    data = Batches(folder, "train", args.seq_len, seed=0)
    configs = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, args.seq_len)
    tokens = args.batch_size * args.seq_len
    results = {"machine": machine(), "args": vars(args), "tokens_per_step": tokens, "models": {}}
    rows = []
    for fam in FAMILIES:
        cfg = configs[fam]
        trainer = Trainer(cfg, lr=1e-3, seed=0, device=args.device)
        times = {b: [] for b in backends}
        for i in range(args.repeats + 1):
            x, y = data.get(i, args.batch_size)
            for b in backends:  # the same weights on each backend, alternating
                trainer.model.set_backend(b)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = clock()
                trainer.step(x, y, 1e-3)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i:
                    times[b].append(clock() - t0)
        flops = flops_per_token(cfg, args.seq_len, training=True).total
        info = describe(cfg, args.seq_len)
        info["backends"] = {}
        for b in backends:
            step_s = statistics.median(times[b])
            info["backends"][b] = {"step_s": step_s, "tokens_per_s": tokens / step_s,
                                   "model_flops_per_s": flops * tokens / step_s, "steps_timed": len(times[b])}
        if "fast" in backends and "reference" in backends:
            info["fast_speedup"] = info["backends"]["fast"]["tokens_per_s"] / info["backends"]["reference"]["tokens_per_s"]
        results["models"][fam] = info
        for b in backends:
            r = info["backends"][b]
            rows.append([LABELS[fam], b, info["params_active"], r["step_s"] * 1e3, r["tokens_per_s"],
                         r["model_flops_per_s"] / 1e9, info.get("fast_speedup") if b == "fast" else None])
        print(f"{LABELS[fam]} done")
    print(f"\n{machine()['device']}, {torch.get_num_threads()} threads, {args.clock} clock, batch {args.batch_size} x {args.seq_len} "
          f"tokens, median of {args.repeats} steps")
    print(table(["model", "backend", "active params", "step ms", "tokens/s", "model GFLOP/s", "fast / reference"], rows))
    write_json(args.out, results)

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(backends)
        for j, b in enumerate(backends):
            ax.bar([i + j * width for i in range(len(FAMILIES))],
                   [results["models"][f]["backends"][b]["tokens_per_s"] for f in FAMILIES], width, label=b)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(FAMILIES))],
                      [LABELS[f] for f in FAMILIES])
        ax.set_ylabel("training tokens / s")
        ax.set_title("training throughput at equal active parameters")
        ax.legend()
        return fig

    plot(args.png, draw)


if __name__ == "__main__":
    main()
