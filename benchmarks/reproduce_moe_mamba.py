"""MoE-Mamba's claims at one active parameter count: the step speed-up over Mamba, the number of
experts, and the parallel design; each model at its own best learning rate.

    python benchmarks/reproduce_moe_mamba.py [--quick] [--scale long] [--out results.json] [--png curves.png]

The claims (MoE-Mamba, Pióro et al. 2024, §4.2 and its ablations; docs/paper-facts.md#results):
1. MoE-Mamba reaches vanilla Mamba's final loss in 2.35x fewer training steps at ~100M active
   parameters (1.76x at ~25M), on the EMA-smoothed training log-perplexity; and ends lower.
2. More experts help at equal active parameters (1: 3.75, 8: 3.70, 16: 3.67, 32: 3.67; vanilla
   Mamba 3.72). One expert is the dense control: Mamba layers interleaved with a dense MLP.
3. The parallel design (one block, Mamba and MoE on the same normalised input, outputs summed:
   layer kind "parallel") is worse than the sequential one.

The paper's recipe (§4.1), scaled down: (Mamba, Switch-MoE) pairs vs twice as many Mamba layers,
LayerNorm pre-norm, no final norm, untied head, ReLU experts, top-1 Switch router with capacity
factor 1 and auxiliary loss 0.01, AdamW (0.9, 0.999), weight decay 0.1, grad clip 0.5, warmup
then cosine to 0.1 of the peak LR. Byte-level text (the Python standard library's sources)
instead of C4 with GPT-2 BPE, and a tiny width.

Learning rates: every model gets its own, the best of a sweep (common.sweep_lrs: the grid
--lr_grid, shorter runs on the same data, best final validation loss, one more grid step while
the best is at an edge). --lr fixes one rate for all (and --lr_moe another for the MoE models).

Scales: ``default`` (300 steps of 8 x 128 bytes, 3 seeds for the main pair, 1 for the rest:
a quick look, about 16 min on one core of a quiet CPU, sweeps included) and ``long``
(common.long_setting: >= 50 training tokens per active parameter, batch 32 x 128, warmup
max(30, 1%), 64 validation batches spread over a held-out tenth of the documents, EMA window
2% of the run, 2 runs side by side on 2 cores, each finished run cached in
out/cache/reproduce_moe_mamba-long so that a job cut off resumes; about an hour on a quiet
2-core CPU; --plan prints its numbers and a time estimate). Every comparison is reported per seed as a
paired difference (MoE variant minus its counterpart, both scored on the same validation
batches) with its validation standard error, and a verdict (common.verdict).

The speed-up is measured the paper's way, per seed: s = the first step at which MoE-Mamba's
smoothed training loss reaches Mamba's final smoothed loss; speed-up = steps / s. If MoE-Mamba
never reaches it, the speed-up is below 1: (steps for Mamba to reach MoE-Mamba's final) / steps.

Scale to the paper on a GPU (25M): --d_model 512 --n_layer 16 --n_experts 42 --d_expert 1536
--batch_size 64 --seq_len 1024 --steps 150000 --lr 1e-3 --lr_moe 5e-4 --ema_alpha 0.001
--experts 42 --no_ablations, with --data pointing at C4 text. Time, from ``python train.py
--preset=moe-mamba-25m --plan --max_steps=150000 --batch_size=64 --seq_len=1024``: 0.32 GFLOP
per training token, 0.05 s per step of 65,536 tokens at 40% MFU of one H100 (989 TFLOP/s bf16),
so 9.8B tokens take about 2.2 hours per model (mamba-25m: the same); a sweep of 4 rates at 20%
of the steps adds 0.8 of a run per model.
"""

from __future__ import annotations

import os

import torch

from common import (PAIRED_HEADERS, Runner, add_data_args, add_model_args, add_training_args, base_parser, describe,
                    draw_specialisation, ema, equal_active_configs, lr_grid, machine, paired, paired_table, plot,
                    prepare, run_plan, settle_scale, specialisation_depth_rows, specialisation_rows, spread,
                    steps_to_reach, sweep_rows, sweep_with, table, task, train_kw, verdict, write_json)

from minimamba_moe.config import ModelConfig

LABELS = {"mamba": "Mamba", "mamba_moe": "MoE-Mamba", "parallel": "MoE-Mamba, parallel"}


def speedup(mamba: list[float], moe: list[float]) -> tuple[float | None, int | None]:
    """(speed-up, MoE-Mamba's step reaching Mamba's final smoothed loss) for two smoothed curves."""
    steps = len(mamba)
    s = steps_to_reach(moe, mamba[-1])
    if s is not None:
        return steps / s, s
    back = steps_to_reach(mamba, moe[-1])  # MoE-Mamba ended worse: how early did Mamba get there
    return (back / steps if back else None), None


def label(name: str) -> str:
    return LABELS.get(name) or f"MoE-Mamba, {name.split('_')[1]} expert(s)"


def model_configs(args) -> dict[str, ModelConfig]:
    """mamba, mamba_moe (--n_experts), experts_E for the other --experts, parallel: equal active params."""
    base = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, args.seq_len,
                                style="moe-mamba", families=("mamba", "mamba_moe"))
    configs = dict(base)
    if args.no_ablations:
        return configs
    d_expert = base["mamba_moe"].d_expert
    for e in sorted({int(v) for v in args.experts.split(",")} - {args.n_experts}):
        cfg = equal_active_configs(args.d_model, args.n_layer, e, d_expert, args.seq_len, style="moe-mamba",
                                   families=("mamba_moe",))["mamba_moe"]
        cfg.name = f"experts_{e}"
        configs[cfg.name] = cfg
    par = ModelConfig.from_dict({**base["mamba_moe"].to_dict(), "layer_pattern": ["parallel"],
                                 "n_layer": args.n_layer // 2, "name": "parallel"})
    configs["parallel"] = par
    return configs


def experts_of(name: str, args) -> int | None:
    if name == "mamba_moe":
        return args.n_experts
    return int(name.split("_")[1]) if name.startswith("experts_") else None


def main():
    p = base_parser(__doc__)
    add_data_args(p)
    add_model_args(p, n_experts=16, n_layer_help="layers of the dense Mamba (MoE-Mamba: n_layer/2 pairs)")
    add_training_args(p, steps=300, seeds="0,1,2", lr_help="one peak LR for Mamba (and MoE-Mamba unless --lr_moe); "
                      "default: each model's best from the sweep")
    p.add_argument("--lr_moe", type=float, default=None)
    p.add_argument("--ema_alpha", type=float, default=None,
                   help="smoothing of the training loss (default 0.05; long: 1 / (2%% of the steps); paper: 0.001 "
                        "over 150K steps)")
    p.add_argument("--experts", default="1,4,8,16,32", help="expert counts of the ablation (1 = the dense control)")
    p.add_argument("--ablation_seeds", default="0", help="seeds of the expert-count and parallel rows")
    p.add_argument("--no_ablations", action="store_true", help="only Mamba against MoE-Mamba")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_experts, args.batch_size, args.seq_len = 32, 2, 4, 4, 32
        args.steps, args.eval_batches, args.experts = 20, 2, "1,2,4"
        args.seeds = "0,1" if args.scale == "default" else "0,1,2"
        args.lr_grid, args.tokens_per_active = "2e-3,4e-3,8e-3,1.6e-2", 0.05
        args.ema_alpha = args.ema_alpha or 0.2
    elif args.scale == "long":
        args.d_model = 48 if args.d_model == 64 else args.d_model
    configs = model_configs(args)
    setting = settle_scale(args, "reproduce_moe_mamba", describe(configs["mamba_moe"], args.seq_len)["params_active"])
    if args.ema_alpha is None:
        args.ema_alpha = setting.get("ema_alpha", 0.05)
    torch.set_num_threads(args.threads)
    folder = prepare(args.data, args.data_cache, setting["val_every"])
    seeds = [int(s) for s in args.seeds.split(",")]
    ab_seeds = [int(s) for s in args.ablation_seeds.split(",")]
    results = {"machine": machine(), "args": vars(args), "setting": setting,
               "claim": {"speedup_100m": 2.35, "speedup_25m": 1.76,
                         "experts_log_perplexity": {"1": 3.75, "8": 3.70, "16": 3.67, "32": 3.67, "mamba": 3.72},
                         "parallel": "worse than sequential"},
               "models": {f: describe(c, args.seq_len) for f, c in configs.items()}}
    main_names = ["mamba", "mamba_moe"]
    if args.plan:
        grid_n = len(lr_grid(args.lr_grid))
        runs = [(n, setting["sweep_steps"]) for n in configs for _ in range(grid_n)] if args.lr is None else []
        runs += [(n, setting["steps"]) for n in main_names for _ in seeds]
        runs += [(n, setting["steps"]) for n in configs if n not in main_names for _ in ab_seeds]
        models = results["models"]
        results["plan"] = run_plan(configs, folder, args, runs, args.batch_size * args.seq_len, setting,
                                   ["model", "active params", "total params"],
                                   lambda n: [label(n), models[n]["params_active"], models[n]["params_total"]])
        write_json(args.out, results)
        return

    runner = Runner(args.cache, args.jobs, args.report_only)
    main_analyses = {"mamba_moe": ("specialisation",)}

    def make(name, seed, lr, sweep=False):
        ana = main_analyses.get(name, ()) if (seed == seeds[0] and not sweep) else ()
        return task(configs[name], folder, analyses=ana, threads=args.threads,
                    **train_kw(args, setting, seed, lr, sweep=sweep))

    if args.lr is None:
        print(f"learning-rate sweep: {len(configs)} models, grid {args.lr_grid}, {setting['sweep_steps']} steps each")
        sweep = sweep_with(runner, lambda n, lr: make(n, seeds[0], lr, sweep=True), list(configs),
                           lr_grid(args.lr_grid), args.max_extra)
        lrs = {n: s["best_lr"] for n, s in sweep.items()}
    else:
        sweep = None
        lrs = {n: (args.lr_moe or args.lr) if n != "mamba" else args.lr for n in configs}
    results["sweep"], results["lrs"] = sweep, lrs
    tasks = {}  # seed by seed, so that a job cut off leaves whole paired comparisons behind
    for seed in sorted(set(seeds) | set(ab_seeds), key=lambda v: (v not in seeds, seeds.index(v) if v in seeds else v)):
        for n in configs:
            if lrs[n] is not None and seed in (seeds if n in main_names else ab_seeds):  # None: sweep unfinished
                tasks[f"{n}/seed={seed}"] = make(n, seed, lrs[n])
    print(f"main runs: {len(tasks)}, {setting['steps']} steps of {args.batch_size} x {args.seq_len} "
          f"({setting['tokens_per_active']:.1f} tokens per active parameter)")
    done = runner.run(tasks)
    runner.close()
    runs = {n: {} for n in configs}
    for key, r in done.items():
        n, seed = key.split("/seed=")
        if not r.get("missing"):
            if "train_loss" in r:
                r["smoothed"] = ema(r["train_loss"], args.ema_alpha)
            runs[n][seed] = r
    results["missing"] = sorted(k for k, r in done.items() if r.get("missing")) + \
        sorted(n for n in configs if lrs[n] is None)
    results["missing"] += [f"sweep/{n}/lr={lr:g}" for n, sw in (sweep or {}).items() for lr in sw["missing"]]
    results["complete"] = not results["missing"]

    # 1. Mamba vs MoE-Mamba: per seed
    per_seed = []
    for seed in seeds:
        a, b = runs["mamba"].get(str(seed)), runs["mamba_moe"].get(str(seed))
        if not (a and b) or a.get("diverged") or b.get("diverged"):
            continue
        s, step = speedup(a["smoothed"], b["smoothed"])
        per_seed.append({"seed": seed, "mamba": a, "mamba_moe": b, "speedup": s, "moe_steps_to_mamba_final": step})
    results["runs"] = per_seed  # Mamba and MoE-Mamba, whole; every run by model, without its loss curve:
    results["runs_by_model"] = {n: {seed: {k: v for k, v in r.items() if k not in ("train_loss", "smoothed")}
                                    for seed, r in rs.items()} for n, rs in runs.items()}
    comparisons = {"mamba_moe - mamba": (paired(runs["mamba_moe"], runs["mamba"]), -1)}
    control = "experts_1" if "experts_1" in runs else None
    for n in configs:
        e = experts_of(n, args)
        if control and e and e != 1:
            comparisons[f"{n} - experts_1"] = (paired(runs[n], runs[control]), -1)
        if n.startswith("experts_"):
            comparisons[f"{n} - mamba"] = (paired(runs[n], runs["mamba"]), -1)
    if "parallel" in runs:
        comparisons["parallel - mamba_moe"] = (paired(runs["parallel"], runs["mamba_moe"]), +1)
    results["paired"] = {k: dict(p, claim_sign=sign, verdict=verdict(p, sign)) for k, (p, sign) in comparisons.items()}
    results["summary"] = {
        "speedup": spread([r["speedup"] for r in per_seed]),
        "final_smoothed": {f: spread([r[f]["smoothed"][-1] for r in per_seed]) for f in main_names},
        "final_val_loss": {n: spread([r["final_val_loss"] for r in runs[n].values() if not r.get("diverged")])
                           for n in configs},
        "moe_reached_mamba_final": sum(r["moe_steps_to_mamba_final"] is not None for r in per_seed),
        "tokens_per_s": {n: spread([r.get("tokens_per_s") for r in runs[n].values()]) for n in configs},
    }
    spec = {n: runs[n][str(seeds[0])]["specialisation"] for n in main_analyses
            if str(seeds[0]) in runs[n] and "specialisation" in runs[n][str(seeds[0])]}
    results["specialisation"] = spec

    print(f"\n{machine()['device']}, scale {args.scale}: {setting['steps']} steps x {args.batch_size} x {args.seq_len} "
          f"tokens ({setting['tokens_per_active']:.1f} per active parameter), warmup {setting['warmup']}, "
          f"EMA alpha {args.ema_alpha:.3g}, {setting['eval_batches']} validation batches, seeds {seeds} "
          f"(ablations: {ab_seeds}){'' if results['complete'] else ', PARTIAL: ' + str(len(results['missing'])) + ' runs missing'}")
    if sweep:
        print(table(["model", "peak lr", "sweep val loss", "best"], sweep_rows(sweep, label)))
        print()
    print(table(["model", "active params", "total params", "lr", "final val loss (mean)", "std over seeds", "seeds",
                 "tokens/s"],
                [[label(n), results["models"][n]["params_active"], results["models"][n]["params_total"], lrs[n],
                  results["summary"]["final_val_loss"][n]["mean"], results["summary"]["final_val_loss"][n]["std"],
                  results["summary"]["final_val_loss"][n]["n"], results["summary"]["tokens_per_s"][n]["mean"]]
                 for n in configs]))
    print()
    print(table(["seed", "Mamba final (smoothed)", "MoE-Mamba final (smoothed)", "MoE-Mamba step reaching it", "speed-up"],
                [[r["seed"], r["mamba"]["smoothed"][-1], r["mamba_moe"]["smoothed"][-1], r["moe_steps_to_mamba_final"],
                  r["speedup"]] for r in per_seed]))
    print()
    rows = [row for k, v in results["paired"].items() for row in paired_table(v, k)]
    print(table(PAIRED_HEADERS, rows))
    print()
    print(table(["comparison", "mean diff", "std over seeds", "seeds", "verdict"],
                [[k, v["mean"], v["std"], v["n"], v["verdict"]] for k, v in results["paired"].items()]))
    s = results["summary"]["speedup"]
    print(f"\nspeed-up over {s['n']} seeds: mean {s['mean']:.3g}, std {s['std']:.3g}, min {s['min']:.3g}, "
          f"max {s['max']:.3g} (paper: 1.76x at 25M, 2.35x at 100M active)" if s["n"] else "\nno speed-up could be measured")
    for n, sp in spec.items():
        print()
        print(table(["model", "MoE layer", "expert", "share of tokens", *sp["classes"], "top bytes by lift"],
                    specialisation_rows(sp, label(n))))
        print()
        print(table(["model", "MoE layer", "MI(expert; class) bits", "MI(expert; byte) bits", "H(expert) bits"],
                    specialisation_depth_rows(sp, label(n))))
    write_json(args.out, results)

    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        ax = axes[0]
        colors = {"mamba": "tab:blue", "mamba_moe": "tab:red"}
        for i, r in enumerate(per_seed):
            for f in main_names:
                ax.plot(range(1, len(r[f]["smoothed"]) + 1), r[f]["smoothed"], color=colors[f], alpha=0.8, lw=1,
                        label=label(f) if i == 0 else None)
            if r["moe_steps_to_mamba_final"]:
                ax.axvline(r["moe_steps_to_mamba_final"], color="tab:red", ls=":", lw=0.8)
        if per_seed:
            lo = min(min(r[f]["smoothed"][-1] for f in main_names) for r in per_seed)
            ax.set_ylim(lo - 0.1, lo + 1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss, EMA alpha={args.ema_alpha:.3g} (nats/byte)")
        ax.set_title("MoE-Mamba vs Mamba (dotted: MoE-Mamba reaches Mamba's final)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1]
        for i, (n, sw) in enumerate((sweep or {}).items()):
            pts = [(lr, v) for lr, v in sw["table"] if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=label(n))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        known = [v for sw in (sweep or {}).values() for _, v in sw["table"] if v is not None]
        if known:  # a diverging rate's loss would squash the rest
            ax.set_ylim(min(known) - 0.05, min(known) + 1.0)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(f"val loss after {setting['sweep_steps']} steps")
        ax.set_title("learning-rate sweep (each model's best is used)", fontsize=9)
        if sweep:
            ax.legend(fontsize=7)
        else:  # --lr: nothing was swept
            ax.text(0.5, 0.5, "no sweep: fixed rates\n" + "\n".join(f"{label(n)}: {lr:g}" for n, lr in lrs.items()),
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.grid(alpha=0.3)
        ax = axes[2]
        pts = sorted((experts_of(n, args), r["final_val_loss"]) for n in configs if experts_of(n, args)
                     for r in runs[n].values() if not r.get("diverged"))
        if pts:
            ax.plot(*zip(*pts), "o", color="tab:red", label="MoE-Mamba (sequential)")
        for n, style in (("mamba", "tab:blue"), ("parallel", "tab:green")):
            for r in runs.get(n, {}).values():
                if not r.get("diverged"):
                    ax.axhline(r["final_val_loss"], color=style, lw=0.8, label=label(n))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts (1 = dense control), equal active parameters")
        ax.set_ylabel("final val loss (nats/byte)")
        ax.set_title("number of experts and the parallel design", fontsize=9)
        handles, labels_ = ax.get_legend_handles_labels()
        uniq = dict(zip(labels_, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.grid(alpha=0.3)
        return fig

    plot(args.png, draw)
    if spec and args.png:
        plot(os.path.splitext(args.png)[0] + "_experts.png", lambda plt: draw_specialisation(
            plt, {label(n): sp for n, sp in spec.items()}))


if __name__ == "__main__":
    main()
