# %%
"""The Mamba block on a CPU: its shapes, and its decode state (the companion script of docs/mamba-block.md).

    python docs/tutorial/mamba_steps.py shapes   # every tensor of one forward pass, with its shape
    python docs/tutorial/mamba_steps.py conv     # the causal conv on an impulse; fast == reference
    python docs/tutorial/mamba_steps.py decode   # prefill + one token at a time == one forward pass

Runs the project's own MambaMixer (minimamba_moe/mamba.py) on the tiny preset's sizes, and its
causal convolution (reference/causal_conv1d.py, fast/causal_conv1d.py); tests/test_docs.py runs
the commands and checks that the page shows their output.
"""

# %%
import argparse

import torch

from minimamba_moe import ModelConfig
from minimamba_moe.mamba import MambaMixer


# %%
def err(a, b):
    e = (a.double() - b.double()).abs().max().item()
    return "0" if e == 0 else f"{e:.0e}"


# %%
def step_shapes():
    # --8<-- [start:shapes-run]
    config = ModelConfig.from_preset("tiny")  # d_model 128 -> d_inner 256, d_state 16, dt_rank 8
    mixer = MambaMixer(config)
    for name, p in mixer.named_parameters():
        print(f"{name:16s} {str(tuple(p.shape)):14s} {p.dtype}")
    shapes = {}  # the output of every submodule called as a module, recorded as forward runs

    def record(module, args, out):
        shapes[names[module]] = tuple(out.shape)

    names = {module: name for name, module in mixer.named_children()}
    for module in names:
        module.register_forward_hook(record)
    hidden = torch.randn(2, 10, config.d_model)  # (b, l, d_model)
    out, _ = mixer(hidden)
    print("hidden", tuple(hidden.shape), "->", ", ".join(f"{k} {v}" for k, v in shapes.items()),
          "-> out", tuple(out.shape))
    # --8<-- [end:shapes-run]


# %%
def step_conv():
    from minimamba_moe import fast, reference

    # --8<-- [start:conv-run]
    weight = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # (d=1, k=4): weight[:, -1] meets input t
    x = torch.zeros(1, 1, 8)  # (b, d, l)
    x[..., 3] = 1.0  # an impulse at position 3
    print("x              ", x[0, 0].tolist())
    out = reference.causal_conv1d(x, weight)  # (1, 1, 8)
    print("causal_conv1d  ", [round(v, 2) for v in out[0, 0].tolist()])
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 6, 50, generator=g), torch.randn(6, 4, generator=g)  # (b, d, l), (d, k)
    bias = torch.randn(6, generator=g)
    want = reference.causal_conv1d(x, w, bias, activation="silu")
    print("fast vs reference, (2, 6, 50): max |difference| =",
          err(fast.causal_conv1d(x, w, bias, activation="silu"), want))
    state = torch.zeros(2, 6, 4)  # the decode state: the last k = 4 inputs, oldest first
    steps = [reference.causal_conv1d_update(x[..., t], state, w, bias, activation="silu")
             for t in range(50)]  # 50 x (b, d)
    steps = torch.stack(steps, dim=-1)
    print("50 single steps vs the whole sequence: max |difference| =", err(steps, want))
    # --8<-- [end:conv-run]


# %%
def step_decode():
    # --8<-- [start:decode-run]
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", backend="reference")
    mixer = MambaMixer(config)
    hidden = torch.randn(1, 12, config.d_model)  # one sequence of 12 positions
    whole, _ = mixer(hidden)  # no state: one pass over the sequence
    state = mixer.init_state(batch_size=1)
    print("state: conv", tuple(state.conv.shape), "ssm", tuple(state.ssm.shape))
    outs = [mixer(hidden[:, :3], state)[0]]  # prefill the first 3 positions: state updated in place
    for t in range(3, 12):  # then one position at a time
        outs.append(mixer(hidden[:, t:t + 1], state)[0])
    stepped = torch.cat(outs, dim=1)
    print(f"prefill 3 + 9 single steps vs one forward pass: max |difference| = {err(stepped, whole)}")
    print("state after 12 positions: conv", tuple(state.conv.shape), "ssm", tuple(state.ssm.shape),
          f"({state.conv.numel() * 4 + state.ssm.numel() * 4} bytes, whatever the length)")
    # --8<-- [end:decode-run]


# %%
STEPS = {"shapes": step_shapes, "conv": step_conv, "decode": step_decode}

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
    parser.add_argument("step", choices=STEPS)
    torch.set_num_threads(1)
    STEPS[parser.parse_args().step]()
