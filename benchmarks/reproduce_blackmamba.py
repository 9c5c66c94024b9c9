"""BlackMamba's comparison: four models at equal active parameters and equal training FLOPs, each
at its own best learning rate; its routing under both rules; its expert balance and specialisation.

    python benchmarks/reproduce_blackmamba.py [--quick] [--scale long] [--out results.json] [--png loss.png]

The claims (BlackMamba, Anthony et al. 2024, §4: its evaluation, training-FLOPs and expert-balance
figures; docs/paper-facts.md#results): at equal active parameters and equal training FLOPs,
Mamba+MoE (BlackMamba) reaches a lower loss than a dense Transformer, a Transformer-MoE and a
dense Mamba; and its Sinkhorn router keeps the experts balanced, except in the last layers.

Here: the four models share width, depth and active parameter count (benchmarks/common.py).
The FLOP budget (minimamba_moe/flops.py, training = 3 x forward, attention at the training
context) is that of the Mamba+MoE model's --steps (default scale), or the least that gives every
model 50 training tokens per active parameter (long: --budget_from max); each model gets as many
steps of the same batch as that budget buys, and its own peak learning rate: the best of a sweep at 20% (long) or half
(default) of its own steps (common.sweep_lrs). Validation loss (nats per byte) is measured on the
same held-out windows for every model and seed, and each comparison is reported per seed as a
paired difference (Mamba+MoE minus the other model) with its validation standard error.

Two routings. BlackMamba trains with the Sinkhorn choice (the argmax of a Sinkhorn-balanced
matrix over the batch's tokens) and, in the released code, infers with the router's own argmax
(docs/paper-facts.md#router-and-sinkhorn). The router's scores are never balanced themselves, so
the two can disagree. For every seed the trained Mamba+MoE is scored both ways on the same
batches (``routings``: loss, load per MoE layer, share of tokens whose experts differ), and the
share of training tokens whose argmax expert differs from the Sinkhorn-chosen one is tracked
over training (``routing_disagreement``, 50 points). The table gives the paired differences
under both routings.

Scales: ``default`` (250 Mamba+MoE steps of 8 x 128 bytes, 3 seeds: a quick look, about 7 min
on one core of a quiet CPU) and ``long`` (common.long_setting: >= 50 training tokens per active
parameter for every model (--budget_from max), batch 32 x 128, warmup max(30, 1%), 64
validation batches on a held-out tenth of the documents, 3 seeds, 2 runs side by side, each
finished run cached in out/cache/reproduce_blackmamba-long; 39 min from scratch on a quiet
2-core CPU; --plan prints the numbers and a time estimate).

What differs from the paper, on purpose: bytes of Python source instead of 300B tokens of a web
mix, a tiny model; the last layers of a 2-MoE-layer model are not the last layers of a
15-MoE-layer one.

Scale to the paper on a GPU: --d_model 1152 --n_layer 30 --n_experts 8 --d_expert 3072
--seq_len 2048 --batch_size 32 (BlackMamba-1.5B's shape) with --data pointing at real text.
Time, from ``python train.py --preset=blackmamba-1.5b --plan --batch_size=64 --seq_len=1024``:
2.07 GFLOP per training token, 2.75 s per step of 524,288 tokens at 40% MFU of one H100, so the
paper's 300B tokens are about 440 H100-hours for the Mamba+MoE model alone.
"""

from __future__ import annotations

import math
import os

import torch

from common import (FAMILIES, LABELS, PAIRED_HEADERS, Runner, add_data_args, add_model_args, add_training_args,
                    base_parser, describe, draw_specialisation, equal_active_configs, imbalance, lr_grid, machine,
                    paired, paired_table, plot, prepare, run_plan, settle_scale, specialisation_depth_rows,
                    specialisation_rows, spread, sweep_rows, sweep_with, table, task, train_kw, verdict, write_json)

from minimamba_moe.flops import flops_per_token
from minimamba_moe.run.data import Batches

ROUTING_NOTE = (
    "The released code (Zyphra/BlackMamba switch_mlp.py) routes by the Sinkhorn choice only in training mode and "
    "by the router's argmax in eval mode (docs/paper-facts.md#router-and-sinkhorn). The paper compares the models "
    "by downstream evaluation scores (its evaluation table and its scores-against-training-FLOPs figure: "
    "HellaSwag, PIQA, WinoGrande, Lambada, ARC, OpenBookQA), which a harness computes with the model in eval "
    "mode: the argmax routing. So the comparison most likely used the argmax; the Sinkhorn choice is what the "
    "training loss saw.")


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
    p.add_argument("--budget_from", default=None, choices=["mamba_moe", "max"],
                   help="the FLOP budget: the Mamba+MoE model's steps (default scale), or the least budget that gives "
                        "every model --tokens_per_active tokens per active parameter (long)")
    args = p.parse_args()
    args.budget_from = args.budget_from or ("max" if args.scale == "long" else "mamba_moe")
    if args.quick:
        args.d_model, args.n_layer, args.n_experts, args.batch_size, args.seq_len = 32, 4, 4, 4, 32
        args.steps, args.eval_batches = 12, 2
        args.seeds = "0,1" if args.scale == "default" else "0,1,2"
        args.lr_grid, args.tokens_per_active = "2e-3,4e-3,8e-3,1.6e-2", 0.05
    elif args.scale == "long":
        args.d_model = 48 if args.d_model == 64 else args.d_model
    configs = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, args.seq_len)
    setting = settle_scale(args, "reproduce_blackmamba", describe(configs["mamba_moe"], args.seq_len)["params_active"])
    torch.set_num_threads(args.threads)
    folder = prepare(args.data, args.data_cache, setting["val_every"])
    tokens_per_step = args.batch_size * args.seq_len
    fpt = {f: flops_per_token(c, args.seq_len).total for f, c in configs.items()}
    if args.budget_from == "max":  # every model reaches the setting's tokens per active parameter
        need = {f: math.ceil(args.tokens_per_active * describe(c, args.seq_len)["params_active"] / tokens_per_step)
                for f, c in configs.items()}
        budget = max(need[f] * tokens_per_step * fpt[f] for f in configs)
    else:
        budget = fpt["mamba_moe"] * tokens_per_step * setting["steps"]
    setting["budget_from"] = args.budget_from
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"machine": machine(), "args": vars(args), "setting": setting, "flop_budget": budget, "models": {},
               "routing_note": ROUTING_NOTE}
    for fam, cfg in configs.items():
        info = describe(cfg, args.seq_len)
        info["flops_per_token_train"] = flops_per_token(cfg, args.seq_len).total
        room = budget * (1 + 1e-12) if args.budget_from == "max" else budget  # the max model's own steps exactly
        info["steps"] = max(1, math.floor(room / (info["flops_per_token_train"] * tokens_per_step)))
        info["tokens_per_active"] = info["steps"] * tokens_per_step / info["params_active"]
        info["train_flops"] = info["steps"] * tokens_per_step * info["flops_per_token_train"]
        info["sweep_steps"] = max(1, round(info["steps"] * setting["sweep_steps"] / setting["steps"]))
        results["models"][fam] = info
    models = results["models"]
    track = max(1, models["mamba_moe"]["steps"] // 50)
    if args.plan:
        grid_n = len(lr_grid(args.lr_grid))
        runs = [(f, models[f]["sweep_steps"]) for f in configs for _ in range(grid_n)] if args.lr is None else []
        runs += [(f, models[f]["steps"]) for f in configs for _ in seeds]
        results["plan"] = run_plan(configs, folder, args, runs, tokens_per_step, setting,
                                   ["model", "active params", "steps"],
                                   lambda f: [LABELS[f], models[f]["params_active"], models[f]["steps"]])
        write_json(args.out, results)
        return

    runner = Runner(args.cache, args.jobs, args.report_only)

    def make(fam, seed, lr, sweep=False):
        extra, ana = {}, ()
        if fam == "mamba_moe" and not sweep:
            extra["track_routing_every"] = track
            ana = ("routings", "specialisation") if seed == seeds[0] else ("routings",)
        steps = models[fam]["sweep_steps"] if sweep else models[fam]["steps"]
        return task(configs[fam], folder, analyses=ana, threads=args.threads,
                    **train_kw(args, setting, seed, lr, sweep=sweep, steps=steps, **extra))

    if args.lr is None:
        print(f"learning-rate sweep: {len(configs)} models, grid {args.lr_grid}")
        sweep = sweep_with(runner, lambda f, lr: make(f, seeds[0], lr, sweep=True), list(configs),
                           lr_grid(args.lr_grid), args.max_extra)
        lrs = {f: s["best_lr"] for f, s in sweep.items()}
    else:
        sweep, lrs = None, {f: args.lr for f in configs}
    results["sweep"], results["lrs"] = sweep, lrs
    # seed by seed, so that a job cut off leaves whole paired comparisons behind
    tasks = {f"{f}/seed={seed}": make(f, seed, lrs[f]) for seed in seeds for f in configs if lrs[f] is not None}
    print(f"main runs: {len(tasks)}; Mamba+MoE: {models['mamba_moe']['steps']} steps of {tokens_per_step} tokens "
          f"({models['mamba_moe']['tokens_per_active']:.1f} tokens per active parameter)")
    done = runner.run(tasks)
    runner.close()
    runs = {f: {} for f in configs}
    for key, r in done.items():
        f, seed = key.split("/seed=")
        if not r.get("missing"):
            runs[f][seed] = r
    results["runs_by_model"] = runs
    results["missing"] = sorted(k for k, r in done.items() if r.get("missing")) + \
        sorted(f for f in configs if lrs[f] is None)
    results["missing"] += [f"sweep/{n}/lr={lr:g}" for n, sw in (sweep or {}).items() for lr in sw["missing"]]
    results["complete"] = not results["missing"]
    others = [f for f in configs if f != "mamba_moe"]
    comparisons = {}
    for f in others:
        comparisons[f"mamba_moe - {f}"] = paired(runs["mamba_moe"], runs[f])
        comparisons[f"mamba_moe (Sinkhorn routing) - {f}"] = paired(runs["mamba_moe"], runs[f],
                                                                     key_a="routings.sinkhorn")
    comparisons["transformer_moe - transformer"] = paired(runs["transformer_moe"], runs["transformer"])
    comparisons["mamba_moe: Sinkhorn - argmax routing"] = paired(runs["mamba_moe"], runs["mamba_moe"],
                                                                 key_a="routings.sinkhorn", key_b="routings.argmax")
    results["paired"] = {k: dict(p, claim_sign=-1, verdict=verdict(p, -1)) for k, p in comparisons.items()}
    results["paired"]["mamba_moe: Sinkhorn - argmax routing"]["claim_sign"] = None
    results["paired"]["mamba_moe: Sinkhorn - argmax routing"]["verdict"] = verdict(
        comparisons["mamba_moe: Sinkhorn - argmax routing"], -1).replace("as claimed", "Sinkhorn lower").replace(
        "reversed", "argmax lower")
    summary = {f: spread([r["final_val_loss"] for r in runs[f].values() if not r.get("diverged")]) for f in configs}
    mm = [r for r in runs["mamba_moe"].values() if "routings" in r]
    routing = {
        "val_loss_argmax": spread([r["routings"]["argmax"]["val_loss"] for r in mm]),
        "val_loss_sinkhorn": spread([r["routings"]["sinkhorn"]["val_loss"] for r in mm]),
        "per_seed": [{"seed": r["seed"], "argmax": r["routings"]["argmax"]["val_loss"],
                      "sinkhorn": r["routings"]["sinkhorn"]["val_loss"],
                      "imbalance_argmax": r["routings"]["argmax"]["imbalance"],
                      "imbalance_sinkhorn": r["routings"]["sinkhorn"]["imbalance"],
                      "disagreement_val": r["routings"]["disagreement"],
                      "disagreement_training_first": r["routing_disagreement"][0][1] if r.get("routing_disagreement") else None,
                      "disagreement_training_last": r["routing_disagreement"][-1][1] if r.get("routing_disagreement") else None}
                     for r in mm],
    }
    results["routing"] = routing
    results["summary"] = {"final_val_loss": summary,
                          "tokens_per_s": {f: spread([r.get("tokens_per_s") for r in runs[f].values()]) for f in configs}}
    first = runs["mamba_moe"].get(str(seeds[0]), {})
    if "routings" in first:  # the expert load figure: the first seed's model, both routings
        results["expert_load"] = {"training": first["load"], "inference": first["routings"]["argmax"]["load"],
                                  "sinkhorn_on_validation": first["routings"]["sinkhorn"]["load"]}
        results["expert_imbalance"] = {k: [imbalance(layer) for layer in v] for k, v in results["expert_load"].items()}
    spec = {"mamba_moe": first["specialisation"]} if "specialisation" in first else {}
    results["specialisation"] = spec

    per_active = ", ".join(f"{LABELS[f]} {m['tokens_per_active']:.1f}" for f, m in models.items())
    print(f"\n{machine()['device']}, scale {args.scale}: FLOP budget {budget:.3g} (= {models['mamba_moe']['steps']} "
          f"Mamba+MoE steps of {args.batch_size} x {args.seq_len} tokens; budget from {args.budget_from}; tokens per "
          f"active parameter: {per_active}), "
          f"{setting['eval_batches']} validation batches, seeds {seeds}"
          f"{'' if results['complete'] else ', PARTIAL: ' + str(len(results['missing'])) + ' runs missing'}")
    if sweep:
        print(table(["model", "peak lr", "sweep val loss", "best"], sweep_rows(sweep, lambda f: LABELS[f])))
        print()
    print(table(["model", "active params", "total params", "train GFLOP/token", "steps", "lr", "val loss mean", "std",
                 "seeds", "tokens/s"],
                [[LABELS[f], models[f]["params_active"], models[f]["params_total"],
                  models[f]["flops_per_token_train"] / 1e9, models[f]["steps"], lrs[f], summary[f]["mean"],
                  summary[f]["std"], summary[f]["n"], results["summary"]["tokens_per_s"][f]["mean"]] for f in configs]))
    print()
    print(table(PAIRED_HEADERS, [row for k, v in results["paired"].items() for row in paired_table(v, k)]))
    print()
    print(table(["comparison", "mean diff", "std over seeds", "seeds", "verdict"],
                [[k, v["mean"], v["std"], v["n"], v["verdict"]] for k, v in results["paired"].items()]))
    print()
    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs) if xs else "-"  # noqa: E731
    print(table(["seed", "val loss, argmax", "val loss, Sinkhorn", "imbalance per layer, argmax",
                 "imbalance, Sinkhorn", "argmax != Sinkhorn (val)", "argmax != Sinkhorn, training: first step", "last step"],
                [[r["seed"], r["argmax"], r["sinkhorn"], fmt(r["imbalance_argmax"]), fmt(r["imbalance_sinkhorn"]),
                  fmt(r["disagreement_val"]), fmt(r["disagreement_training_first"]),
                  fmt(r["disagreement_training_last"])] for r in routing["per_seed"]]))
    for n, sp in spec.items():
        print()
        print(table(["model", "MoE layer", "expert", "share of tokens", *sp["classes"], "top bytes by lift"],
                    specialisation_rows(sp, LABELS[n])))
        print()
        print(table(["model", "MoE layer", "MI(expert; class) bits", "MI(expert; byte) bits", "H(expert) bits"],
                    specialisation_depth_rows(sp, LABELS[n])))
    write_json(args.out, results)

    def draw(plt):
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
        for f in FAMILIES:
            for i, r in enumerate(runs[f].values()):
                if r.get("diverged"):
                    continue
                xs, ys = zip(*r["val_curve"])
                flops = [x * tokens_per_step * models[f]["flops_per_token_train"] for x in xs]
                a.plot(flops, ys, marker=".", color=f"C{FAMILIES.index(f)}", alpha=0.8,
                       label=f"{LABELS[f]} (lr {lrs[f]:g})" if i == 0 else None)
        a.set_xlabel("training FLOPs")
        a.set_ylabel("validation loss (nats/byte)")
        a.set_title("equal active parameters, equal FLOP budget, own best lr", fontsize=9)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
        load = results.get("expert_load")
        if load:
            for k, (key, title) in enumerate((("inference", "argmax (released inference)"),
                                              ("sinkhorn_on_validation", "Sinkhorn choice (as trained)"))):
                ax = (b, c)[k]
                inf = load[key]
                E = len(inf[0])
                width = 0.8 / E
                for e in range(E):
                    ax.bar([i + e * width for i in range(len(inf))], [layer[e] / max(1, sum(layer)) for layer in inf],
                           width, label=f"expert {e}")
                ax.axhline(1 / E, color="k", ls="--", lw=0.8)
                ax.set_xticks([i + 0.4 - width / 2 for i in range(len(inf))], [f"MoE layer {i}" for i in range(len(inf))])
                ax.set_ylabel("fraction of validation tokens")
                ax.set_title(f"expert load, trained Mamba+MoE: {title}", fontsize=9)
                ax.legend(fontsize=6, ncol=2)
        return fig

    plot(args.png, draw)
    if spec and args.png:
        plot(os.path.splitext(args.png)[0] + "_experts.png",
             lambda plt: draw_specialisation(plt, {LABELS[n]: sp for n, sp in spec.items()}))


if __name__ == "__main__":
    main()
