"""Sinkhorn balancing of router logits (BlackMamba's training-time router), plain-PyTorch reference.

Glossary (code name = meaning, shape):

    logits      router scores, one row per token            (T, E)
    c           cost/kernel matrix exp(logit_scale * logits) (T, E)   fp32
    d0          row scaling, one per token                  (T,)
    d1          column scaling, one per expert              (E,)
    P           balanced matrix d0[:, None] * c * d1[None, :] (T, E); rows sum to 1/T, columns to 1/E
    T, E        tokens in the local batch, experts

One pass: d0 = (1/T) / (c @ d1 + eps) makes every row sum 1/T; then d1 = (1/E) / (cᵀ @ d0 + eps)
makes every column sum 1/E (exact, up to eps). Repeating the pair converges to the unique P with
both marginals (Sinkhorn-Knopp). The router then sends token t to argmax_e P[t, e].

Options (docs/paper-facts.md#router-and-sinkhorn):
- ``init="blackmamba"``: d1 = 1 / (E * colsum(c)), the BlackMamba paper's "novel initialization"
  (already normalizes the columns once). ``init="uniform"``: d1 = 1, as in Megatron-LM upstream.
- ``stopping="absolute"`` (as released): stop when mean|d1 - d1_old| < tol.
  ``stopping="marginal"``: stop when max_t |T * rowsum_t(P) - 1| < tol, the relative error of the
  row marginals (columns are exact right after the d1 update), which is scale-free.
- ``logit_scale``: released BlackMamba uses exp(2 * logits); Megatron-LM upstream exp(logits).

The finding about BlackMamba's "novel initialization" (docs/paper-facts.md#router-and-sinkhorn),
stated rather than hidden: with the blackmamba init, d1 starts at 1 / (E * colsum(c)), which is O(1 / (E * T * mean(c))). Both d1_old and the updated d1 are that small,
so their mean absolute difference is below tol = 1e-4 as soon as E * T * mean(c) is beyond about
1e4 — i.e. for a large batch with logits near 0 or above, the released absolute rule stops after
exactly one pass, whatever their balance (a small batch, or logits well below 0 so that mean(c) is
small, takes a few passes: docs/moe.md). "Converges in one iteration" is then an artifact of an
absolute tolerance on a tiny quantity, not of balance: after one pass the columns are exact but the rows can be far from
1/T, and when logits are sharp (tokens strongly agree on an expert) the routes argmax_e P[t, e]
are less balanced than with fully converged Sinkhorn. ``stopping="marginal"`` measures what
matters and is the rule to use for a converged answer.

A second effect of that init: the pair (d0, d1) keeps the scale it starts with, so c @ d1 stays
about 1/T and eps = 1e-8 is not negligible next to it; it shifts row t by about eps / (c @ d1)_t
relative (≈ 1e-5 to 1e-4 at T = 2048). The marginal error then stalls near that level instead of
going to zero, so ``stopping="marginal"`` with a tolerance below it runs to max_iters. Routes depend
only on d1 and barely move; for a tight converged answer use ``init="uniform"`` or ``eps=0``.

Numerics: c = exp(logit_scale * logits) in fp32 overflows for logits above ~88 / logit_scale, as in
the released code; router logits are far smaller in practice. Computed in float32 (float64 if
logits are float64). The caller normally runs this under torch.no_grad (routes take no gradient).
The official code doing the same: Zyphra BlackMamba ``switch_mlp.py::sinkhorn`` (blackmamba init,
scale 2, absolute rule) and Megatron-LM ``megatron/core/transformer/moe/moe_utils.py::sinkhorn``
(uniform init, scale 1, absolute rule).
"""

import torch

from .checks import check_sinkhorn, compute_dtype


# --8<-- [start:sinkhorn]
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

    T, E = logits.shape
    c = torch.exp(logit_scale * logits.to(compute_dtype(logits)))  # (T, E)
    d0 = c.new_ones(T)  # (T,)
    if init == "blackmamba":
        d1 = 1.0 / (E * c.sum(0))  # (E,)
    else:
        d1 = c.new_ones(E)  # (E,)

    n_iters = 0
    for n_iters in range(1, max_iters + 1):
        d1_old = d1
        d0 = (1.0 / T) / (c @ d1 + eps)  # (T,) rows now sum to 1/T
        d1 = (1.0 / E) / (c.T @ d0 + eps)  # (E,) columns now sum to 1/E
        if stopping == "absolute":
            error = (d1 - d1_old).abs().mean()
        else:
            error = (T * d0 * (c @ d1) - 1.0).abs().max()  # row marginals after the d1 update
        if error < tol:
            break

    P = d0[:, None] * c * d1[None, :]  # (T, E)
    return P, torch.tensor(n_iters, dtype=torch.int64, device=logits.device)
# --8<-- [end:sinkhorn]
