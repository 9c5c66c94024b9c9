# %%
"""Sampling, one rule at a time: what sample_token draws from (companion of docs/sampling.md).

    python docs/tutorial/sample_steps.py rules

For one row of five logits, each setting of temperature, top_k and top_p: the distribution the
rule defines, worked out here by hand, against the frequencies of 100,000 tokens drawn by
minimamba_moe.generate.sample_token (seeded, so the output is the same on every run).
tests/test_docs.py runs the command and checks that the page shows its output.
"""

# %%
import argparse
import math

import torch

from minimamba_moe.generate import sample_token


# %%
# --8<-- [start:by-hand]
def by_hand(logits, temperature=1.0, top_k=None, top_p=None):
    """The rule's distribution from its definition: scale, keep the k largest, keep the nucleus."""
    if temperature == 0:
        return [1.0 if i == logits.index(max(logits)) else 0.0 for i in range(len(logits))]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])  # most likely first
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        z = sum(math.exp(logits[i] / temperature) for i in keep)
        mass, nucleus = 0.0, []
        for i in keep:  # the smallest prefix whose probability reaches top_p
            nucleus.append(i)
            mass += math.exp(logits[i] / temperature) / z
            if mass >= top_p:
                break
        keep = nucleus
    z = sum(math.exp(logits[i] / temperature) for i in keep)
    return [math.exp(logits[i] / temperature) / z if i in keep else 0.0 for i in range(len(logits))]
# --8<-- [end:by-hand]


# %%
def step_rules():
    # --8<-- [start:rules-run]
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]  # one row, a vocabulary of 5
    rows = torch.tensor([logits]).expand(100_000, -1)  # 100,000 independent draws in one call
    g = torch.Generator().manual_seed(0)
    for rule in (dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0),
                 dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.8),
                 dict(temperature=0.0)):
        tokens = sample_token(rows, **rule, generator=g)  # (100000,) token ids
        drawn = torch.bincount(tokens, minlength=5) / len(tokens)
        name = ", ".join(f"{k}={v}" for k, v in rule.items())
        print(f"{name:26s} rule ", " ".join(f"{p:.2f}" for p in by_hand(logits, **rule)))
        print(f"{'':26s} drawn", " ".join(f"{p:.2f}" for p in drawn.tolist()))
    # --8<-- [end:rules-run]


# %%
STEPS = {"rules": step_rules}

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
