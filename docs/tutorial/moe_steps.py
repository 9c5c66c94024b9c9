# %%
"""Mixture of Experts, step by step: routing, Sinkhorn, grouping by expert, the grouped GEMMs.

The companion script of docs/moe.md and docs/moe-kernels.md. Each step is one command:

    python docs/tutorial/moe_steps.py switch       # Switch top-k routing with a capacity
    python docs/tutorial/moe_steps.py sinkhorn     # Sinkhorn passes and balance, per init and rule
    python docs/tutorial/moe_steps.py passes       # when the released rule takes more than one pass
    python docs/tutorial/moe_steps.py grouping     # token-slots grouped by expert (fast/routing.py)
    python docs/tutorial/moe_steps.py cpu          # fast.moe_experts on CPU vs the reference loop
    TRITON_INTERPRET=1 python docs/tutorial/moe_steps.py triton   # the Triton kernels vs the reference

Every step runs the project's own code; tests/test_docs.py runs each command and checks that the
page shows its output.
"""

# %% [markdown]
# In a notebook: without a GPU, Triton's interpreter runs the kernels on the CPU. It is chosen when
# triton is imported, so it is set first.

# %% active="ipynb"
# import os
#
# import torch
#
# if not torch.cuda.is_available():
#     os.environ["TRITON_INTERPRET"] = "1"

# %%
import argparse
import os
import sys

import torch

from minimamba_moe import ModelConfig, reference
from minimamba_moe.fast.routing import group_by_expert


# %%
def err(a, b):
    """The largest absolute difference, printed with one significant digit (the exact bits vary by machine)."""
    e = (a.double() - b.double()).abs().max().item()
    return "0" if e == 0 else f"{e:.0e}"


# %%
def step_switch():
    from minimamba_moe.moe import route_switch

    # --8<-- [start:switch-run]
    config = ModelConfig.from_preset("moe-mamba-25m", n_experts=4, top_k=1, capacity_factor=1.0)
    logits = torch.tensor([[2.0, 0.1, 0.0, 0.0],  # 8 tokens, 4 experts: 4 tokens want expert 0
                           [1.5, 0.2, 0.1, 0.0],
                           [1.0, 0.0, 0.3, 0.0],
                           [3.0, 0.0, 0.0, 0.1],
                           [0.0, 2.0, 0.0, 0.0],
                           [0.0, 0.0, 2.0, 0.0],
                           [0.0, 0.0, 0.0, 2.0],
                           [0.0, 0.0, 1.0, 0.5]])
    expert_idx, gates, aux = route_switch(logits, config, training=True)
    print("capacity per expert:", int(config.capacity_factor * 8 * config.top_k / config.n_experts))
    print("expert_idx:", expert_idx.view(-1).tolist(), " (-1 = dropped: over capacity)")
    print("gates:     ", [round(g, 3) for g in gates.view(-1).tolist()])
    print(f"aux loss:   {aux.item():.4f}  (alpha = {config.aux_loss_coef}; 0.01 when perfectly balanced)")
    # --8<-- [end:switch-run]


# %%
def step_sinkhorn():
    # --8<-- [start:sinkhorn-run]
    g = torch.Generator().manual_seed(0)
    T, E = 2048, 8
    for std in (0.3, 3.0):  # soft logits, then sharp ones (tokens agree on a favourite expert)
        logits = std * (torch.randn(T, E, generator=g) + torch.randn(E, generator=g))
        load = torch.bincount(logits.argmax(1), minlength=E)
        print(f"logit std {std}: argmax only, max/mean load {(load.max() / load.float().mean()).item():.2f}")
        for init, stopping in (("blackmamba", "absolute"), ("blackmamba", "marginal"), ("uniform", "marginal")):
            P, n = reference.sinkhorn(logits, init=init, stopping=stopping, max_iters=100)
            load = torch.bincount(P.argmax(1), minlength=E)
            print(f"  init {init:10s} stop {stopping:8s}: {int(n):3d} passes, "
                  f"max/mean load {(load.max() / load.float().mean()).item():.2f}")
    # --8<-- [end:sinkhorn-run]


# %%
def step_passes():
    # --8<-- [start:passes-run]
    g = torch.Generator().manual_seed(0)
    E = 8
    print("passes of the released rule (blackmamba init, mean|d1 - d1_old| < 1e-4), E = 8")
    for shift in (0.0, -2.0, -4.0, -6.0):  # logits N(0, 1) + shift: a router that favours no expert
        passes = []
        for T in (128, 1024, 4096, 16384):
            logits = torch.randn(T, E, generator=g) + shift
            passes.append(int(reference.sinkhorn(logits)[1]))
        print(f"logits N({shift:g}, 1): T = 128, 1024, 4096, 16384 -> passes {passes}")
    # --8<-- [end:passes-run]


# %%
def step_grouping():
    # --8<-- [start:grouping-run]
    expert_idx = torch.tensor([[2, 0], [1, 2], [0, -1], [2, 3], [0, 1], [3, 2]])  # (T=6, k=2), -1 = dropped
    r = group_by_expert(expert_idx, n_experts=4)
    print("slot expert   ", expert_idx.view(-1).tolist())
    print("order         ", r.order.tolist(), " (slot of each sorted row)")
    print("sorted_expert ", r.sorted_expert.tolist(), " (4 = dropped, sorted last)")
    print("token         ", r.token.tolist(), " (row of x each sorted row reads)")
    print("counts        ", r.counts.tolist())
    print("offsets       ", r.offsets.tolist(), " (expert e owns sorted rows offsets[e]:offsets[e+1])")
    # --8<-- [end:grouping-run]


# %%
def moe_inputs(T=40, d=16, f=8, E=4, k=2, activation="swiglu", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    expert_idx = torch.randint(0, E, (T, k), generator=g)
    expert_idx[::7, 1] = -1  # some dropped slots
    gates = torch.rand(T, k, generator=g, dtype=dtype)
    w1 = 0.3 * torch.randn(E, 2 * f if activation != "relu" else f, d, generator=g, dtype=dtype)
    w2 = 0.3 * torch.randn(E, d, f, generator=g, dtype=dtype)
    return x, expert_idx, gates, w1, w2


# %%
def compare(name, moe, device="cpu"):
    """Outputs and gradients of x, gates, w1, w2 against the reference loop over experts."""
    x, expert_idx, gates, w1, w2 = moe_inputs()
    results = {}
    for which, fn in (("reference", reference.moe_experts), (name, moe)):
        leaves = [t.clone().to(device).requires_grad_(True) for t in (x, gates, w1, w2)]
        out = fn(leaves[0], expert_idx.to(device), leaves[1], leaves[2], leaves[3], "swiglu")
        out.backward(torch.ones_like(out))
        results[which] = [out.detach().cpu()] + [t.grad.cpu() for t in leaves]
    labels = ("out", "d/dx", "d/dgates", "d/dw1", "d/dw2")
    print(f"{name} vs reference, T=40 tokens, top-2 of 4 experts, some slots dropped, swiglu:")
    print("  " + ", ".join(f"{lab} {err(a, b)}" for lab, a, b in zip(labels, results[name], results["reference"])))


# %%
def step_cpu():
    from minimamba_moe import fast

    # --8<-- [start:cpu-run]
    compare("fast.moe_experts (CPU grouped matmul)", fast.moe_experts)
    # --8<-- [end:cpu-run]


# %%
def step_triton():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("No CUDA device: run with TRITON_INTERPRET=1 so that Triton's interpreter runs the kernels on the CPU.")
    from minimamba_moe.fast.moe_triton import moe_experts_triton

    # --8<-- [start:triton-run]
    compare("moe_experts_triton", moe_experts_triton, "cuda" if torch.cuda.is_available() else "cpu")
    # --8<-- [end:triton-run]


# %%
STEPS = {"switch": step_switch, "sinkhorn": step_sinkhorn, "passes": step_passes,
         "grouping": step_grouping, "cpu": step_cpu,
         "triton": step_triton}

# %% [markdown]
# In a notebook, every step in turn; as a script, the step named on the command line.

# %% active="ipynb"
# torch.set_num_threads(1)
# for name, step in STEPS.items():
#     print(f"--- {name}")
#     step()

# %% active="py"
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS, help="which step of docs/moe.md / docs/moe-kernels.md to run")
    torch.set_num_threads(1)
    STEPS[parser.parse_args().step]()
