"""Routing bookkeeping on the device: group the (token, slot) pairs by expert, without a host sync.

Glossary (code name = meaning, shape):

    expert_idx  the expert of each (token, slot); -1 = dropped           (T, k)   int
    N           token-slots, T * k; slot s belongs to token s // k
    key         expert of each slot, with dropped slots mapped to E      (N,)     int64
    order       slot ids sorted by expert (stable: token order inside)   (N,)     int64
                order[r] is the slot in sorted row r; dropped slots come last
    sorted_expert  key[order]: the expert of sorted row r (E = dropped)  (N,)     int64
    token       order // k: the token row of x feeding sorted row r     (N,)     int64
    counts      token-slots per expert                                    (E,)     int64
    offsets     where each expert's rows start in sorted order, offsets[E] = rows kept  (E+1,) int64

Every expert e owns the contiguous sorted rows offsets[e] : offsets[e+1]. That is all a grouped GEMM
needs: a block of sorted rows knows its experts from sorted_expert, a weight-gradient program for
expert e walks offsets[e] : offsets[e+1]. The dropped slots sit after offsets[E] and are never read.

No host sync: sort, scatter_add_ and cumsum stay on the device. (``torch.bincount`` would read the
maximum back to size its output, and boolean-mask indexing has a data-dependent shape: both
synchronise on a GPU, so neither is used.) Megatron-LM's ``permute`` (moe_utils.py) and MegaBlocks'
``indices_and_bins`` build the same three arrays.
"""

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    order: torch.Tensor  # (N,) int64 slot id of each sorted row
    sorted_expert: torch.Tensor  # (N,) int64 expert of each sorted row, E for dropped
    token: torch.Tensor  # (N,) int64 token (row of x) of each sorted row
    counts: torch.Tensor  # (E,) int64 rows per expert
    offsets: torch.Tensor  # (E+1,) int64 first sorted row of each expert; offsets[E] = kept rows


# --8<-- [start:group_by_expert]
def group_by_expert(expert_idx: torch.Tensor, n_experts: int) -> Routing:
    """expert_idx (T, k), -1 = dropped -> Routing of the N = T * k slots, grouped by expert."""
    T, k = expert_idx.shape
    E = n_experts
    flat = expert_idx.reshape(-1).long()  # (N,)
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)  # (N,) dropped -> E, sorts last
    sorted_expert, order = torch.sort(key, stable=True)  # (N,), (N,)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device)  # (E+1,) last bin: dropped
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=flat.device)  # (E+1,)
    offsets[1:] = torch.cumsum(counts[:E], 0)
    return Routing(order, sorted_expert, torch.div(order, k, rounding_mode="floor"), counts[:E], offsets)
# --8<-- [end:group_by_expert]
