"""Decode latency and state memory against context length, four models of equal active parameters.

    python benchmarks/bench_generate.py [--quick] [--out results.json] [--png latency.png]

BlackMamba's latency figure (paper §4), measured with this code: a
Mamba+MoE model, a dense Mamba, a Transformer with a KV cache and a Transformer-MoE, the same
width and depth and the same active parameter count, random weights (latency does not depend on
them). For each context length c: one prefill pass over c tokens (timed), then ``--new`` decoding
steps (``Model.step``, one token each; median per-token time). "state bytes" is what the
recurrent state holds after the prefill: each Mamba layer's conv tail and SSM state (fixed
size), each attention layer's KV cache, allocated for exactly c + new positions. The models take
turns step by step. On CPU the clock is this process's CPU time and one thread is used (--clock,
--threads), so that other work on a shared machine does not inflate the numbers.

Scale to the papers on a GPU: --d_model 1152 --n_layer 30 --n_experts 8 --d_expert 3072
--contexts 128,256,...,8192 --dtype bfloat16 (BlackMamba-1.5B's shape).
"""

from __future__ import annotations

import statistics

import torch

from common import (FAMILIES, LABELS, add_model_args, base_parser, describe, equal_active_configs, machine,
                    plot, table, timer, write_json)

from minimamba_moe.generate import state_nbytes
from minimamba_moe.model import Model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(models: dict[str, Model], context: int, new: int, repeats: int, device: str, clock) -> dict[str, dict]:
    """For each model: prefill ``context`` random tokens (median of ``repeats``), then ``new`` steps (median).

    The models take turns, prefill by prefill and step by step, so that a burst of load from
    other processes on a shared machine lands on all of them alike.
    """
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, 256, (1, context), generator=g).to(device)
    prefills = {f: [] for f in models}
    steps = {f: [] for f in models}
    states, tokens = {}, {}
    for model in models.values():
        model.config.max_seq_len = context + new + 1  # the KV cache holds exactly what this run needs
    for _ in range(repeats):
        for f, model in models.items():
            states[f] = model.init_state(1, device=device)
            sync(device)
            t0 = clock()
            tokens[f] = model(prompt, state=states[f]).logits[:, -1].argmax(-1)
            sync(device)
            prefills[f].append(clock() - t0)
    nbytes = {f: state_nbytes(states[f]) for f in models}
    for i in range(new):
        for f, model in models.items():
            t0 = clock()
            tokens[f] = model.step(tokens[f], states[f]).argmax(-1)
            sync(device)
            if i:  # the first step warms up
                steps[f].append(clock() - t0)
    return {f: {"context": context, "prefill_s": statistics.median(prefills[f]),
                "step_s": statistics.median(steps[f] or [float("nan")]), "state_bytes": nbytes[f]} for f in models}


def main():
    p = base_parser(__doc__)
    add_model_args(p, d_model=256, n_layer=8)
    p.add_argument("--contexts", default="128,256,512,1024,2048,4096,8192")
    p.add_argument("--new", type=int, default=64, help="decoding steps per context (the first is not timed)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per context (median)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    if args.quick:
        args.d_model, args.n_layer, args.n_experts = 64, 2, 4
        args.contexts, args.new, args.repeats = "16,64,256", 4, 1
    torch.set_num_threads(args.threads)
    clock = timer(args)
    contexts = [int(c) for c in args.contexts.split(",")]
    configs = equal_active_configs(args.d_model, args.n_layer, args.n_experts, args.d_expert, max(contexts))
    dtype = getattr(torch, args.dtype)
    results = {"machine": machine(), "args": vars(args), "models": {}}
    models = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        models[fam] = Model(configs[fam]).to(args.device, dtype).eval()
        results["models"][fam] = dict(describe(configs[fam], max(contexts)), curve=[])
    for c in contexts:
        for fam, point in measure(models, c, args.new, args.repeats, args.device, clock).items():
            results["models"][fam]["curve"].append(point)
        print(f"context {c} done")
    # the headline: how much slower each model decodes at the longest context than at the shortest,
    # and the speed-up of Mamba+MoE over each model at the longest context
    for fam, info in results["models"].items():
        first, last = info["curve"][0], info["curve"][-1]
        info["step_growth"] = last["step_s"] / first["step_s"]
        info["state_growth"] = last["state_bytes"] / first["state_bytes"]
        info["mamba_moe_speedup_at_max_context"] = last["step_s"] / results["models"]["mamba_moe"]["curve"][-1]["step_s"]
    rows = []
    for fam, info in results["models"].items():
        for pt in info["curve"]:
            rows.append([LABELS[fam], pt["context"], pt["step_s"] * 1e3, pt["prefill_s"] * 1e3,
                         pt["state_bytes"] / 2**20])
    print(f"\n{machine()['device']}, {args.dtype}, {torch.get_num_threads()} threads, {args.clock} clock, batch 1, "
          f"median of {args.new - 1} steps")
    print(table(["model", "context", "decode ms/token", "prefill ms", "state MiB"], rows))
    print()
    print(table(["model", "active params", "step time growth", "state growth", "Mamba+MoE speed-up"],
                [[LABELS[f], i["params_active"], i["step_growth"], i["state_growth"],
                  i["mamba_moe_speedup_at_max_context"]] for f, i in results["models"].items()]))
    write_json(args.out, results)

    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for fam, info in results["models"].items():
            xs = [pt["context"] for pt in info["curve"]]
            a.plot(xs, [pt["step_s"] * 1e3 for pt in info["curve"]], marker="o", label=LABELS[fam])
            b.plot(xs, [pt["state_bytes"] / 2**20 for pt in info["curve"]], marker="o", label=LABELS[fam])
        for ax, title in ((a, "decode latency per token (ms)"), (b, "state / KV cache (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        b.set_yscale("log")
        a.legend()
        return fig

    plot(args.png, draw)


if __name__ == "__main__":
    main()
