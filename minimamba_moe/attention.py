"""Causal self-attention with rotary position embeddings (RoPE), for the Transformer baselines.

Glossary: q, k, v queries/keys/values (b, h, l, hd); h = n_head, hd = d_model / n_head; RoPE
rotates each (even, odd)-split pair of q and k by the angle pos * theta^(-2i/hd) (Su et al. 2021),
in the "rotate half" form used by GPT-NeoX and Llama.

Recurrent inference keeps a KV cache of max_seq_len positions per layer: unlike a Mamba state it
grows with the number of tokens seen, which is the point the papers make. The cache also counts
the tokens it holds, so the mixer is called as every mixer is, ``attn(x, state=None) -> (out, None)``,
and knows the positions of x from its state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class KVCache:
    k: torch.Tensor  # (b, h, max_seq_len, hd)
    v: torch.Tensor  # (b, h, max_seq_len, hd)
    seq_len: int = 0  # positions 0..seq_len-1 are filled


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x (b, h, l, hd) at positions pos (l,)."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)  # (hd/2,)
    angle = pos.float()[:, None] * inv_freq[None, :]  # (l, hd/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)  # (l, hd)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.out_proj.weight._is_output_projection = True

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        c = self.config
        device = device or self.qkv.weight.device
        dtype = dtype or self.qkv.weight.dtype
        shape = (batch_size, c.n_head, c.max_seq_len, c.d_model // c.n_head)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, None]:
        """x (b, l, d) -> ((b, l, d), None). With ``state``, x follows the cached positions: read and extend the cache."""
        b, l, d = x.shape
        pos = 0 if state is None else state.seq_len
        q, k, v = self.qkv(x).view(b, l, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (b,h,l,hd)
        positions = torch.arange(pos, pos + l, device=x.device)
        q, k = rope(q, positions, self.config.rope_theta), rope(k, positions, self.config.rope_theta)
        if state is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if pos + l > state.k.shape[2]:
                raise ValueError(
                    f"Sequence of {pos + l} tokens exceeds the KV cache of max_seq_len={state.k.shape[2]}; "
                    "use a shorter prompt or fewer new tokens."
                )
            state.k[:, :, pos : pos + l] = k.to(state.k.dtype)
            state.v[:, :, pos : pos + l] = v.to(state.v.dtype)
            keys, values = state.k[:, :, : pos + l].to(q.dtype), state.v[:, :, : pos + l].to(q.dtype)
            # query i (absolute position pos+i) sees keys 0..pos+i
            mask = torch.arange(pos + l, device=x.device)[None, :] <= positions[:, None]  # (l, pos+l)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            state.seq_len += l
        return self.out_proj(y.transpose(1, 2).reshape(b, l, d)), None
