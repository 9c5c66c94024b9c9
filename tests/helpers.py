"""Comparison helpers shared by the tests: every mismatch reports max abs and max rel error."""

import torch


def max_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Return (max abs error, max rel error) between two tensors, computed in float64."""
    a = actual.detach().double()
    e = expected.detach().double()
    abs_err = (a - e).abs()
    rel_err = abs_err / e.abs().clamp_min(1e-12)
    return abs_err.max().item() if abs_err.numel() else 0.0, rel_err.max().item() if rel_err.numel() else 0.0


def assert_close(actual, expected, *, atol: float, rtol: float, what: str = "tensor") -> None:
    """torch.testing.assert_close with a message that always names max abs/rel error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ok = torch.allclose(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol)
    if not ok:
        abs_e, rel_e = max_errors(actual, expected)
        raise AssertionError(
            f"{what}: not close (atol={atol}, rtol={rtol}): max abs err {abs_e:.3e}, max rel err {rel_e:.3e}"
        )
