"""Small helpers shared by the reference ops: argument checks and the compute dtype.

Not part of the public interface; ``fast/`` may use them too, so both raise the same errors.
"""

import torch


def check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    """Raise ValueError unless ``tensor.shape == expected``, naming the argument and both shapes."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(expected)}, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """Raise ValueError unless ``tensor`` has ``ndim`` dimensions; ``layout`` names them, e.g. "(b, d, l)"."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(tensor.shape)}")


def compute_dtype(*tensors) -> torch.dtype:
    """The dtype the reference ops compute in: float32, or float64 when any given tensor is float64.

    float32 is the rule (SPEC §1 step 6: fp32 whatever the input dtype); float64 inputs keep float64
    so that the tests can check exact laws and run ``torch.autograd.gradcheck``.
    """
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
