# %%
"""Training, before it starts: how much memory each paper preset needs (the companion script of docs/training.md).

    python docs/tutorial/train_steps.py memory

The numbers are train.py's own estimate (minimamba_moe/run/memory.py), counted on the meta device in
milliseconds: nothing is allocated. tests/test_docs.py runs the command and checks that the page
shows its output.
"""

# %%
import argparse

from minimamba_moe import ModelConfig
from minimamba_moe.run.memory import GiB, inference_memory, n_params, training_memory
from minimamba_moe.run.settings import PRESET_TRAINING, TrainSettings


# %%
def size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


# %%
def step_memory():
    import torch

    # --8<-- [start:memory-run]
    default = TrainSettings()
    print("| preset | parameters | micro-batch | training, 1 process | under FSDP, 8 processes: each | sampling, bf16 |")
    print("|---|---|---|---|---|---|")
    for name, recipe in PRESET_TRAINING.items():
        config = ModelConfig.from_preset(name)
        b, l = recipe.get("batch_size", default.batch_size), recipe.get("seq_len", default.seq_len)
        one, fsdp = training_memory(config, b, l), training_memory(config, b, l, shards=8)
        sample = inference_memory(config, torch.bfloat16)
        print(f"| {name} | {n_params(config) / 1e6:.1f}M | {b} x {l} | {size(one.total)} "
              f"| {size(fsdp.total)} | {size(sample.total)} |")
    # --8<-- [end:memory-run]


# %%
STEPS = {"memory": step_memory}

# %% [markdown]
# In a notebook, every step in turn; as a script, the step named on the command line.

# %% active="ipynb"
# for name, step in STEPS.items():
#     print(f"--- {name}")
#     step()

# %% active="py"
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS)
    STEPS[parser.parse_args().step]()
