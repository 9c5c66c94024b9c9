"""Router ablation: four ways to choose the expert, same model, data and budget.

    python benchmarks/ablate_routers.py [--quick] [--out results.json] [--png load.png]

Beyond the papers. A BlackMamba-style Mamba+MoE model (RMSNorm, SwiGLU experts, top-1) is
trained with each router:

    sinkhorn-released   BlackMamba's rule as released: cost exp(2 logits), d1 = 1/(E colsum) init,
                        stop when mean |d1 - d1_old| < 1e-4, which holds after exactly one pass
    sinkhorn-converged  the same Sinkhorn, stopped on the marginal error (max relative row error
                        < --converged_tol) or --converged_max_iters passes
    sigmoid             no balancing at all: the argmax of the router logits, sigmoid gate
    switch              Switch Transformer (MoE-Mamba's router): softmax gate, capacity factor 1
                        (overflow dropped), auxiliary load-balancing loss 0.01

Each router trains at its own peak learning rate, the best of a sweep (common.sweep_lrs over
--lr_grid at half the steps; --lr fixes one for all). It reports, per router: validation loss (inference routing), expert load imbalance per MoE
layer (max / mean tokens per expert; 1 = balanced) in training (the last 20% of steps) and at
inference, the fraction of token-slots dropped, and the mean Sinkhorn passes per layer call.

Scale up on a GPU: --d_model 1152 --n_layer 30 --n_experts 8 --d_expert 3072 --seq_len 2048.
"""

from __future__ import annotations

import torch

from common import (Runner, add_data_args, add_model_args, add_training_args, base_parser, describe,
                    equal_active_configs, imbalance, lr_grid, machine, plot, prepare, settle_scale, spread, sweep_with,
                    table, task, train, train_kw, write_json)
from reproduce_blackmamba import inference_load


def router_variants(args) -> dict[str, dict]:
    return {
        "sinkhorn-released": dict(router="sinkhorn", sinkhorn_init="blackmamba", sinkhorn_stopping="absolute"),
        "sinkhorn-converged": dict(router="sinkhorn", sinkhorn_init="blackmamba", sinkhorn_stopping="marginal",
                                   sinkhorn_tol=args.converged_tol, sinkhorn_max_iters=args.converged_max_iters),
        "sigmoid": dict(router="sigmoid"),
        "switch": dict(router="switch", capacity_factor=1.0, aux_loss_coef=0.01),
    }


def main():
    p = base_parser(__doc__)
    add_data_args(p)
    add_model_args(p)
    add_training_args(p, steps=250, seeds="0")
    p.add_argument("--converged_tol", type=float, default=1e-3)
    p.add_argument("--converged_max_iters", type=int, default=300)
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_experts, args.batch_size, args.seq_len = 32, 4, 4, 4, 32
        args.steps, args.eval_batches = 12, 2
    if args.quick:
        args.lr_grid = "2e-3,4e-3,8e-3,1.6e-2"
    configs = {}
    for name, overrides in router_variants(args).items():
        configs[name] = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, args.seq_len,
                                             families=("mamba_moe",), **overrides)["mamba_moe"]
        configs[name].name = name
    setting = settle_scale(args, "ablate_routers", describe(configs["sinkhorn-released"], args.seq_len)["params_active"])
    torch.set_num_threads(args.threads)
    folder = prepare(args.data, args.data_cache, setting["val_every"])
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.lr is None:
        runner = Runner(args.cache, args.jobs, args.report_only)
        sweep = sweep_with(runner, lambda n, lr: task(configs[n], folder, threads=args.threads,
                                                      **train_kw(args, setting, seeds[0], lr, sweep=True)),
                           list(configs), lr_grid(args.lr_grid), args.max_extra)
        runner.close()
        lrs = {n: s["best_lr"] for n, s in sweep.items()}
    else:
        sweep, lrs = None, {n: args.lr for n in configs}
    results = {"machine": machine(), "args": vars(args), "setting": setting, "sweep": sweep, "lrs": lrs, "routers": {}}
    for name, cfg in configs.items():
        info = dict(describe(cfg, args.seq_len), runs=[], lr=lrs[name])
        for seed in seeds:
            r = train(cfg, folder, **train_kw(args, setting, seed, lrs[name]), log=print)
            model = r.pop("model")
            r["inference_load"] = inference_load(model, folder, args.seq_len, args.eval_batches, args.batch_size,
                                                 args.device)
            r["imbalance_training"] = [imbalance(layer) for layer in r["load"]]
            r["imbalance_inference"] = [imbalance(layer) for layer in r["inference_load"]]
            r.pop("train_loss")
            info["runs"].append(r)
        runs = info["runs"]
        info["summary"] = {
            "final_val_loss": spread([r["final_val_loss"] for r in runs]),
            "max_imbalance_training": spread([max(r["imbalance_training"]) for r in runs]),
            "max_imbalance_inference": spread([max(r["imbalance_inference"]) for r in runs]),
            "dropped_frac": spread([r["dropped_frac"] for r in runs]),
            "sinkhorn_iters_mean": spread([r["sinkhorn_iters_mean"] for r in runs]),
        }
        results["routers"][name] = info
    print(f"\n{machine()['device']}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
          f"{args.n_experts} experts top-1, seeds {seeds}")
    rows = []
    for name, info in results["routers"].items():
        s = info["summary"]
        r0 = info["runs"][0]
        rows.append([name, info["lr"], s["final_val_loss"]["mean"], s["final_val_loss"]["std"],
                     " ".join(f"{v:.2f}" for v in r0["imbalance_training"]),
                     " ".join(f"{v:.2f}" for v in r0["imbalance_inference"]),
                     s["dropped_frac"]["mean"], s["sinkhorn_iters_mean"]["mean"]])
    print(table(["router", "lr", "val loss", "std", "imbalance per layer, training", "imbalance per layer, inference",
                 "dropped", "Sinkhorn passes"], rows))
    write_json(args.out, results)

    def draw(plt):
        names = list(results["routers"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, key, title in ((axes[0], "imbalance_training", "training (router as trained)"),
                               (axes[1], "imbalance_inference", "inference (argmax of the router)")):
            n_layers = len(results["routers"][names[0]]["runs"][0][key])
            width = 0.8 / len(names)
            for j, name in enumerate(names):
                ax.bar([i + j * width for i in range(n_layers)], results["routers"][name]["runs"][0][key], width,
                       label=name)
            ax.axhline(1, color="k", lw=0.8, ls="--")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(n_layers)], [f"MoE layer {i}" for i in range(n_layers)])
            ax.set_title(f"load imbalance (max/mean), {title}")
            ax.title.set_fontsize(9)
        axes[0].set_ylabel("max / mean tokens per expert")
        axes[0].legend(fontsize=8)
        return fig

    plot(args.png, draw)


if __name__ == "__main__":
    main()
