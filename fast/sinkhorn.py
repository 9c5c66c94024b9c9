"""Sinkhorn balancing of router logits, fast: one fused Triton launch on GPU, a lean loop on CPU.

Same signature and docstring as ``reference.sinkhorn.sinkhorn`` (diff them). Where the work happens:

    CUDA tensors -> sinkhorn_triton.py  every pass and the stopping rule inside one kernel launch:
                                        no launch per pass, no host sync per pass
    CPU tensors  -> sinkhorn_cpu below  the reference's passes with one matrix-vector product less
    (and float64, E > 64)               (on a GPU this one reads the error back once per pass)

Glossary (code name = meaning, shape): as in reference/sinkhorn.py —

    c       exp(logit_scale * logits)                     (T, E)  fp32 (fp64 for fp64 logits)
    d0, d1  row scaling (T,), column scaling (E,)
    r       c @ d1, the row sums of c * d1 before d0 scales them   (T,)

The saving on CPU: a pass needs r = c @ d1 for the new d0, and the marginal stopping rule needs
c @ d1 again after d1 is updated — the very r of the next pass. Keeping it turns the reference's
three products per pass (marginal rule) into two, with bit-identical results: the same
expressions are evaluated in the same order, so the iteration counts match the reference exactly.
"""

import torch

from minimamba_moe.reference.checks import check_sinkhorn, compute_dtype

try:  # triton is a dependency on Linux only; elsewhere every tensor takes the PyTorch path
    from .sinkhorn_triton import sinkhorn_triton
except ImportError:
    sinkhorn_triton = None


def sinkhorn(logits: torch.Tensor, init: str = "blackmamba", stopping: str = "absolute", tol: float = 1e-4,
             max_iters: int = 100, eps: float = 1e-8, logit_scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance exp(logit_scale * logits) to rows summing to 1/T and columns to 1/E.

    Args:
        logits: (T, E) router logits, any float dtype.
        init: "blackmamba" (d1 = 1 / (E * colsum(c))) or "uniform" (d1 = 1).
        stopping: "absolute" (mean|d1 - d1_old| < tol, as released) or "marginal"
            (max_t |T * d0_t * (c @ d1)_t - 1| < tol, relative row-marginal error).
        tol: the stopping tolerance.
        max_iters: the most passes to run (>= 1); the loop stops there even if not converged.
        eps: added to every denominator, as released.
        logit_scale: c = exp(logit_scale * logits); 2.0 as released by BlackMamba, 1.0 upstream.

    Returns:
        (P, n_iters): P (T, E) float32 (float64 if logits are float64); n_iters the number of
        passes done, a 0-dim int64 tensor, 1 <= n_iters <= max_iters.

    Raises:
        ValueError: on a bad init, stopping rule, max_iters or logits shape.
    """
    check_sinkhorn(logits, init, stopping, max_iters)
    if logits.is_cuda and logits.dtype != torch.float64 and logits.shape[1] <= 64 and sinkhorn_triton is not None:
        return sinkhorn_triton(logits, init, stopping, tol, max_iters, eps, logit_scale)
    return sinkhorn_cpu(logits, init, stopping, tol, max_iters, eps, logit_scale)


def sinkhorn_cpu(logits: torch.Tensor, init: str, stopping: str, tol: float, max_iters: int, eps: float,
                 logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's passes, keeping r = c @ d1 from one pass to the next (see the module doc)."""
    T, E = logits.shape
    c = torch.exp(logit_scale * logits.to(compute_dtype(logits)))  # (T, E)
    d1 = 1.0 / (E * c.sum(0)) if init == "blackmamba" else c.new_ones(E)  # (E,)
    r = c @ d1  # (T,)
    d0 = c.new_ones(T)  # (T,)
    n_iters = 0
    for n_iters in range(1, max_iters + 1):
        d1_old = d1
        d0 = (1.0 / T) / (r + eps)  # (T,) rows now sum to 1/T
        d1 = (1.0 / E) / (c.T @ d0 + eps)  # (E,) columns now sum to 1/E
        r = c @ d1  # (T,) for the marginal rule now, and for d0 in the next pass
        if stopping == "absolute":
            error = (d1 - d1_old).abs().mean()
        else:
            error = (T * d0 * r - 1.0).abs().max()
        if error < tol:
            break
    P = d0[:, None] * c * d1[None, :]  # (T, E)
    return P, torch.tensor(n_iters, dtype=torch.int64, device=logits.device)
