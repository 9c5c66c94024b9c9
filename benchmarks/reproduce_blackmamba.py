"""BlackMamba's comparison: four models at equal active parameters and equal training FLOPs, and
its expert-balance figure.

    python benchmarks/reproduce_blackmamba.py [--quick] [--out results.json] [--png loss.png]

The claims (BlackMamba, Anthony et al. 2024, §4: its evaluation, training-FLOPs and expert-balance figures): at equal active parameters and
equal training FLOPs, Mamba+MoE (BlackMamba) reaches a lower loss than a dense Transformer, a
Transformer-MoE and a dense Mamba; and its Sinkhorn router keeps the experts balanced, except
in the last layers.

Here: the four models share width, depth and active parameter count (benchmarks/common.py).
The FLOP budget is that of ``--steps`` steps of the Mamba+MoE model (minimamba_moe/flops.py,
training = 3 x forward, attention at the training context); each model gets as many steps of the
same batch as that budget buys. Validation loss (nats per byte) is measured on the same held-out
windows, for each seed. The expert load per layer is measured on the trained Mamba+MoE model
(seed of the first run): in training mode (the Sinkhorn choice, summed over the last 20% of
steps) and at inference (argmax of the router, on the validation windows).

What differs from the paper, on purpose: bytes of Python source instead of 300B tokens of a web
mix, a tiny model and a few hundred steps; the last layers of a 4-MoE-layer model are not the
last layers of a 15-MoE-layer one.

Scale to the paper on a GPU: --d_model 1152 --n_layer 30 --n_experts 8 --d_expert 3072
--seq_len 2048 --batch_size 32 (BlackMamba-1.5B's shape) with --data pointing at real text.
"""

from __future__ import annotations

import math

import torch

from common import (FAMILIES, LABELS, add_data_args, add_model_args, add_training_args, base_parser, describe,
                    equal_active_configs, imbalance, machine, plot, prepare, spread, table, train, write_json)

from minimamba_moe.flops import flops_per_token
from minimamba_moe.run.data import Batches


@torch.no_grad()
def inference_load(model, folder, seq_len: int, batches: int, batch_size: int, device: str) -> list[list[int]]:
    """Tokens per expert per MoE layer at inference (model.eval(): the router's argmax), on validation windows."""
    model.eval()
    val = Batches(folder, "val", seq_len, seed=10_000)
    load = None
    for i in range(batches):
        x, _ = val.get(i, batch_size)
        stats = model(x.to(device)).router_stats
        counts = torch.stack([s.tokens_per_expert.cpu() for s in stats])
        load = counts if load is None else load + counts
    return load.tolist()


def main():
    p = base_parser(__doc__)
    add_data_args(p)
    add_model_args(p)
    add_training_args(p, steps=250, seeds="0,1,2", steps_help="steps of the Mamba+MoE model; sets the FLOP budget")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_experts, args.batch_size, args.seq_len = 32, 4, 4, 4, 32
        args.steps, args.seeds, args.eval_batches = 12, "0,1", 2
    torch.set_num_threads(args.threads)
    folder = prepare(args.data, args.data_cache)
    configs = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    budget = flops_per_token(configs["mamba_moe"], args.seq_len).total * tokens_per_step * args.steps
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"machine": machine(), "args": vars(args), "flop_budget": budget, "models": {}, "runs": []}
    for fam, cfg in configs.items():
        info = describe(cfg, args.seq_len)
        info["flops_per_token_train"] = flops_per_token(cfg, args.seq_len).total
        info["steps"] = max(1, math.floor(budget / (info["flops_per_token_train"] * tokens_per_step)))
        info["train_flops"] = info["steps"] * tokens_per_step * info["flops_per_token_train"]
        results["models"][fam] = info
    for seed in seeds:
        run = {"seed": seed}
        for fam, cfg in configs.items():
            r = train(cfg, folder, steps=results["models"][fam]["steps"], batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, seed=seed, device=args.device,
                      eval_batches=args.eval_batches, eval_every=max(3, args.steps // 8))
            model = r.pop("model")
            if fam == "mamba_moe" and seed == seeds[0]:
                results["expert_load"] = {
                    "training": r["load"],
                    "inference": inference_load(model, folder, args.seq_len, args.eval_batches, args.batch_size, args.device),
                }
            run[fam] = r
        results["runs"].append(run)
    runs = results["runs"]
    summary = {f: spread([r[f]["final_val_loss"] for r in runs]) for f in configs}
    results["summary"] = {"final_val_loss": summary,
                          "mamba_moe_lowest": all(summary["mamba_moe"]["mean"] < summary[f]["mean"]
                                                  for f in configs if f != "mamba_moe"),
                          "wins_by_seed": {f: sum(r["mamba_moe"]["final_val_loss"] < r[f]["final_val_loss"] for r in runs)
                                           for f in configs if f != "mamba_moe"}}
    load = results["expert_load"]
    results["expert_imbalance"] = {k: [imbalance(layer) for layer in v] for k, v in load.items()}
    print(f"\n{machine()['device']}, FLOP budget {budget:.3g} (= {args.steps} Mamba+MoE steps of "
          f"{args.batch_size} x {args.seq_len} tokens), seeds {seeds}")
    print(table(["model", "active params", "total params", "train GFLOP/token", "steps", "val loss mean", "std",
                 "min", "max"],
                [[LABELS[f], results["models"][f]["params_active"], results["models"][f]["params_total"],
                  results["models"][f]["flops_per_token_train"] / 1e9, results["models"][f]["steps"],
                  summary[f]["mean"], summary[f]["std"], summary[f]["min"], summary[f]["max"]] for f in configs]))
    print()
    print(table(["MoE layer", "imbalance (max/mean), training", "imbalance, inference"],
                [[i, a, b] for i, (a, b) in enumerate(zip(results["expert_imbalance"]["training"],
                                                          results["expert_imbalance"]["inference"]))]))
    write_json(args.out, results)

    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for f in FAMILIES:
            for i, r in enumerate(runs):
                xs, ys = zip(*r[f]["val_curve"])
                flops = [x * tokens_per_step * results["models"][f]["flops_per_token_train"] for x in xs]
                a.plot(flops, ys, marker=".", color=f"C{FAMILIES.index(f)}", alpha=0.8,
                       label=LABELS[f] if i == 0 else None)
        a.set_xlabel("training FLOPs")
        a.set_ylabel("validation loss (nats/byte)")
        a.set_title("equal active parameters, equal FLOP budget")
        a.grid(alpha=0.3)
        a.legend()
        inf = load["inference"]
        E = len(inf[0])
        width = 0.8 / E
        for e in range(E):
            b.bar([i + e * width for i in range(len(inf))], [layer[e] / sum(layer) for layer in inf], width,
                  label=f"expert {e}")
        b.axhline(1 / E, color="k", ls="--", lw=0.8)
        b.set_xticks([i + 0.4 - width / 2 for i in range(len(inf))], [f"MoE layer {i}" for i in range(len(inf))])
        b.set_ylabel("fraction of tokens (inference)")
        b.set_title("expert load per layer, trained Mamba+MoE")
        b.legend(fontsize=7, ncol=2)
        return fig

    plot(args.png, draw)


if __name__ == "__main__":
    main()
