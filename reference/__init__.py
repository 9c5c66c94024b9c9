"""minimamba_moe.reference: the plain-PyTorch reference implementation of every kernel.

Each op here is written to be read and checked, not to be fast: explicit loops, fp32 compute,
autograd for the gradients, a glossary mapping code names to paper symbols at the top of each file.
The property tests in tests/test_reference_*.py hold these ops against the math
(docs/paper-facts.md#selective-scan, #router-and-sinkhorn).

The rule: ``minimamba_moe.fast`` exports the same names with the same signatures and the same
docstrings, so the model can switch between the two and a reader can diff them. Every fast op is
tested against the reference op of the same name.

    selective_scan, selective_state_update   the Mamba-1 selective scan, and one decode step
    causal_conv1d, causal_conv1d_update      Mamba's depthwise causal conv, and one decode step
    sinkhorn                                 BlackMamba's Sinkhorn router balancing
    moe_experts, expert_mlp                  run routed tokens through their expert MLPs
"""

from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .moe import expert_mlp, moe_experts
from .selective_scan import selective_scan, selective_state_update
from .sinkhorn import sinkhorn

__all__ = [
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "sinkhorn",
    "moe_experts",
    "expert_mlp",
]
