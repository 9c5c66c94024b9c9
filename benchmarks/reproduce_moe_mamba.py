"""MoE-Mamba vs Mamba at the same active parameters, data and token budget: the step speed-up.

    python benchmarks/reproduce_moe_mamba.py [--quick] [--out results.json] [--png curves.png]

The claim (MoE-Mamba, Pióro et al. 2024, §4.2): MoE-Mamba reaches vanilla Mamba's final
loss in 2.35x fewer training steps at ~100M active parameters (1.76x at ~25M), measured on the
training log-perplexity smoothed with an exponential moving average.

The paper's recipe (§4.1), scaled down: (Mamba, Switch-MoE) pairs vs twice as many Mamba layers,
LayerNorm pre-norm, no final norm, untied head, ReLU experts, top-1 Switch router with capacity
factor 1 and auxiliary loss 0.01, AdamW (0.9, 0.999), weight decay 0.1, grad clip 0.5, 1% warmup
then cosine to 0.1 of the peak LR. What differs, on purpose: byte-level text (the Python
standard library's sources) instead of C4 with GPT-2 BPE, a tiny width and a few hundred steps,
fewer experts, and one shared learning rate (the paper tuned each model's).

The speed-up is measured the paper's way, per seed: s = the first step at which MoE-Mamba's
smoothed training loss reaches Mamba's final smoothed loss; speed-up = steps / s. If MoE-Mamba
never reaches it, the speed-up is below 1: (steps for Mamba to reach MoE-Mamba's final) / steps.

Scale to the paper on a GPU: --d_model 512 --n_layer 16 --n_experts 42 --d_expert 1536
--batch_size 64 --seq_len 1024 --steps 150000 --lr 1e-3 --lr_moe 5e-4 --ema_alpha 0.001 (25M),
with --data pointing at C4 text.
"""

from __future__ import annotations

import statistics

import torch

from common import (add_data_args, add_model_args, add_training_args, base_parser, describe, ema,
                    equal_active_configs, machine, plot, prepare, spread, steps_to_reach, table, train,
                    write_json)


def speedup(mamba: list[float], moe: list[float]) -> tuple[float | None, int | None]:
    """(speed-up, MoE-Mamba's step reaching Mamba's final smoothed loss) for two smoothed curves."""
    steps = len(mamba)
    s = steps_to_reach(moe, mamba[-1])
    if s is not None:
        return steps / s, s
    back = steps_to_reach(mamba, moe[-1])  # MoE-Mamba ended worse: how early did Mamba get there
    return (back / steps if back else None), None


def main():
    p = base_parser(__doc__)
    add_data_args(p)
    add_model_args(p, n_experts=16, n_layer_help="layers of both models (MoE-Mamba: n_layer/2 pairs)")
    add_training_args(p, steps=300, seeds="0,1,2", lr_help="peak LR of Mamba (and of MoE-Mamba unless --lr_moe)")
    p.add_argument("--lr_moe", type=float, default=None)
    p.add_argument("--ema_alpha", type=float, default=0.05, help="smoothing of the training loss (paper: 0.001 over 150K steps)")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_experts, args.batch_size, args.seq_len = 32, 2, 4, 4, 32
        args.steps, args.seeds, args.eval_batches, args.ema_alpha = 20, "0,1", 2, 0.2
    torch.set_num_threads(args.threads)
    folder = prepare(args.data, args.data_cache)
    configs = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, args.seq_len,
                                   style="moe-mamba", families=("mamba", "mamba_moe"))
    lrs = {"mamba": args.lr, "mamba_moe": args.lr_moe or args.lr}
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"machine": machine(), "args": vars(args), "claim": {"speedup_100m": 2.35, "speedup_25m": 1.76},
               "models": {f: describe(c, args.seq_len) for f, c in configs.items()}, "runs": []}
    for seed in seeds:
        run = {"seed": seed}
        for fam, cfg in configs.items():
            r = train(cfg, folder, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=lrs[fam], seed=seed, device=args.device, eval_batches=args.eval_batches)
            r.pop("model")
            r["smoothed"] = ema(r["train_loss"], args.ema_alpha)
            run[fam] = r
        run["speedup"], run["moe_steps_to_mamba_final"] = speedup(run["mamba"]["smoothed"], run["mamba_moe"]["smoothed"])
        results["runs"].append(run)
    runs = results["runs"]
    results["summary"] = {
        "speedup": spread([r["speedup"] for r in runs]),
        "final_smoothed": {f: spread([r[f]["smoothed"][-1] for r in runs]) for f in configs},
        "final_val_loss": {f: spread([r[f]["final_val_loss"] for r in runs]) for f in configs},
        "moe_reached_mamba_final": sum(r["moe_steps_to_mamba_final"] is not None for r in runs),
    }
    print(f"\n{machine()['device']}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, seeds {seeds}")
    print(table(["model", "active params", "total params", "lr", "final smoothed train loss", "final val loss", "train s"],
                [[f, results["models"][f]["params_active"], results["models"][f]["params_total"], lrs[f],
                  results["summary"]["final_smoothed"][f]["mean"], results["summary"]["final_val_loss"][f]["mean"],
                  sum(r[f]["train_s"] for r in runs)] for f in configs]))
    print()
    print(table(["seed", "Mamba final (smoothed)", "MoE-Mamba final (smoothed)", "MoE-Mamba step reaching it", "speed-up"],
                [[r["seed"], r["mamba"]["smoothed"][-1], r["mamba_moe"]["smoothed"][-1], r["moe_steps_to_mamba_final"],
                  r["speedup"]] for r in runs]))
    s = results["summary"]["speedup"]
    print(f"\nspeed-up over {s['n']} seeds: mean {s['mean']:.3g}, std {s['std']:.3g}, min {s['min']:.3g}, "
          f"max {s['max']:.3g} (paper: 1.76x at 25M, 2.35x at 100M active)" if s["n"] else "\nno speed-up could be measured")
    write_json(args.out, results)

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = {"mamba": "tab:blue", "mamba_moe": "tab:red"}
        names = {"mamba": "Mamba", "mamba_moe": "MoE-Mamba"}
        for i, r in enumerate(runs):
            for f in configs:
                ax.plot(range(1, args.steps + 1), r[f]["smoothed"], color=colors[f], alpha=0.8, lw=1,
                        label=names[f] if i == 0 else None)
            if r["moe_steps_to_mamba_final"]:
                ax.axvline(r["moe_steps_to_mamba_final"], color="tab:red", ls=":", lw=0.8)
        ax.axhline(statistics.fmean(r["mamba"]["smoothed"][-1] for r in runs), color="tab:blue", ls="--", lw=0.8)
        lo = min(min(r[f]["smoothed"][-1] for f in configs) for r in runs)
        ax.set_ylim(lo - 0.1, lo + 1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss, EMA alpha={args.ema_alpha} (nats/byte)")
        ax.set_title("MoE-Mamba vs Mamba, equal active params (dotted: MoE-Mamba reaches Mamba's final)")
        ax.title.set_fontsize(9)
        ax.legend()
        ax.grid(alpha=0.3)
        return fig

    plot(args.png, draw)


if __name__ == "__main__":
    main()
