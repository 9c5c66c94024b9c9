"""Helpers shared by the tests: comparisons (every mismatch reports max abs and max rel error), and
which optional extras of pyproject.toml are installed (for the ``needs_extra`` marker, see conftest.py)."""

import importlib.util

import torch

# The optional extras of pyproject.toml's [project.optional-dependencies] that tests need, and the
# modules each installs (tests/test_readme.py holds this to pyproject.toml). `dev` is the README's set-up.
EXTRAS = {
    "hf": ("tokenizers",),
    "plots": ("matplotlib",),
    "docs": ("mkdocs", "material", "mkdocstrings", "latex2mathml", "ruff", "jupytext"),
    "docs-test": ("playwright", "jupytext", "nbclient", "ipykernel"),
}


def missing_from_extra(extra: str) -> list[str]:
    """The modules of the optional extra ``extra`` that are not installed (none: the extra is installed).

    Only presence is asked: a module that is installed but fails to import fails the test that uses it.
    """
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


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
