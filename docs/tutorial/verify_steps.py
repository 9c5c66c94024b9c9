# %%
"""How a property test finds a bug: a planted one, and the smallest example Hypothesis shrinks it to.

The companion script of docs/testing.md:

    python docs/tutorial/verify_steps.py shrink

A scan split into chunks of 3 positions must carry the state from one chunk to the next (the law
of test_scan_split_with_carried_state). Here the carry is planted wrong (each chunk restarts from
a zero state) and Hypothesis searches the same kind of inputs tests/test_fast_scan.py draws for
an example where the split scan differs from the reference, then shrinks it; the correct split
finds none. derandomize=True: the same search, so the same output, on every run.
tests/test_docs.py runs the command and checks that the page shows its output.
"""

# %%
import argparse

import torch
from hypothesis import find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from minimamba_moe import reference


# %%
# --8<-- [start:split-scans]
def split_scan(u, delta, A, B, C, chunk, carry):
    """reference.selective_scan run chunk by chunk; carry=False is the planted bug."""
    outs, state = [], None
    for s in range(0, u.shape[-1], chunk):
        part = slice(s, s + chunk)
        out, last = reference.selective_scan(u[..., part], delta[..., part], A, B[..., part],
                                             C[..., part], delta_softplus=True,
                                             initial_state=state, return_last_state=True)
        outs.append(out)
        state = last if carry else None  # the bug: every chunk starts again from zero
    return torch.cat(outs, dim=-1)
# --8<-- [end:split-scans]


# %%
def inputs(seed, b, d, n, l):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.exp(r(d, n)), B=r(b, n, l), C=r(b, n, l))


# %%
def step_shrink():
    # --8<-- [start:shrink-run]
    seeds = st.integers(0, 2**31 - 1)
    shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 16), st.integers(1, 70))

    for carry in (False, True):
        def breaks_the_law(example):  # the property, negated: True where split != whole
            seed, shape = example
            x = inputs(seed, *shape)
            whole = reference.selective_scan(**x, delta_softplus=True)
            return not torch.allclose(split_scan(**x, chunk=3, carry=carry), whole, atol=1e-10)

        try:
            seed, (b, d, n, l) = find(st.tuples(seeds, shapes), breaks_the_law,
                                      settings=settings(derandomize=True, max_examples=200))
            print(f"carry={carry}: smallest failing example: seed={seed}, b={b}, d={d}, n={n}, l={l}")
        except NoSuchExample:
            print(f"carry={carry}: no failing example in 200 draws")
    # --8<-- [end:shrink-run]


# %%
STEPS = {"shrink": step_shrink}

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
