"""The one interface through which the model calls its kernels.

``get_ops(backend)`` returns a module holding the ops below; ``minimamba_moe.reference`` and
``minimamba_moe.fast`` define the same names with the same signatures and docstrings (a test holds
them to it), so the same weights run on either and the tests can hold one against the other.

    selective_scan          the selective SSM over a whole sequence (docs/paper-facts.md#selective-scan),
                            with initial/last state
    selective_state_update  the same recurrence for one token, state updated in place
    causal_conv1d           depthwise causal conv over length, optional carried conv state
    causal_conv1d_update    the same conv for one token, conv state updated in place
    sinkhorn                Sinkhorn balancing of a (tokens, experts) router matrix
    moe_experts             every token through its chosen experts, weighted by its gates

backend: "reference" (plain PyTorch loops, obviously correct), "fast" (Triton on GPU, vectorised
PyTorch on CPU), or "auto" (= "fast").

The import graph runs one way: model -> ops -> reference | fast (fast also takes the shared argument
checks, ``reference/checks.py``, from the reference); neither backend imports the model.
"""

from types import ModuleType

from minimamba_moe import fast, reference

from .config import BACKENDS

OP_NAMES = (
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "sinkhorn",
    "moe_experts",
)

_MODULES = {"reference": reference, "fast": fast, "auto": fast}  # one per name in config.BACKENDS


def get_ops(backend: str) -> ModuleType:
    """The module whose functions implement OP_NAMES for this backend."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    return _MODULES[backend]
