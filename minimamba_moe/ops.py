"""The one interface through which the model calls its kernels.

``get_ops(backend)`` returns a module holding the ops below; ``minimamba_moe.reference`` and
``minimamba_moe.fast`` define the same names with the same signatures, so the same weights run on
either and the tests can hold one against the other.

    selective_scan          the selective SSM over a whole sequence (SPEC §1), with initial/last state
    selective_state_update  the same recurrence for one token, state updated in place
    causal_conv1d           depthwise causal conv over length, optional carried conv state
    causal_conv1d_update    the same conv for one token, conv state updated in place
    sinkhorn                Sinkhorn balancing of a (tokens, experts) router matrix
    moe_experts             every token through its chosen experts, weighted by its gates

backend: "reference" (plain PyTorch loops, obviously correct), "fast" (Triton on GPU, vectorised
PyTorch on CPU), or "auto" (= "fast").
"""

from types import ModuleType

OP_NAMES = (
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "sinkhorn",
    "moe_experts",
)


def get_ops(backend: str) -> ModuleType:
    """The module whose functions implement OP_NAMES for this backend."""
    if backend == "reference":
        from minimamba_moe import reference

        return reference
    if backend in ("fast", "auto"):
        from minimamba_moe import fast

        return fast
    raise ValueError(f"Unknown backend {backend!r}: use 'reference', 'fast' or 'auto'.")
