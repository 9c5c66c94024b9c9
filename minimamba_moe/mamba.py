"""The Mamba mixer: one selective-SSM layer (Gu & Dao 2023, section 3; docs/paper-facts.md#mamba-mixer).

Glossary (code name -> paper symbol):
    x          input sequence after in_proj and the causal conv  x_t     (b, l, d_inner)
    z          gate branch, multiplies the output through silu   z_t     (b, l, d_inner)
    delta      step size, input-dependent                         Δ_t     (b, d_inner, l)
    A          state matrix, diagonal per channel, A = -exp(A_log) A       (d_inner, d_state)
    B, C       input / output projections, input-dependent        B_t,C_t (b, d_state, l)
    D          skip connection                                    D       (d_inner,)
    h          recurrent state                                    h_t     (b, d_inner, d_state)
    dt_rank    rank of the low-rank projection producing Δ        R

Called as every mixer is: ``mixer(hidden, state=None) -> (out, None)``. Given a state and one
token, it runs the one-token kernels (``_step``); otherwise the whole-sequence ones, starting
from the state if given. Where the official code does the same: mamba_ssm/modules/mamba_simple.py
(class Mamba: forward, step, allocate_inference_cache). The kernels come from ``get_ops(config.backend)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .ops import get_ops


@dataclass
class MambaState:
    """Recurrent state of one Mamba layer; its size does not depend on how many tokens were seen."""

    conv: torch.Tensor  # (b, d_inner, d_conv): the last d_conv conv inputs, zeros before the first
    ssm: torch.Tensor  # (b, d_inner, d_state), fp32: h after the last token


class MambaMixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
        self.in_proj = nn.Linear(d, 2 * di, bias=False)  # -> (x, z)
        # depthwise causal conv; weight (d_inner, 1, d_conv) as in the released checkpoints
        self.conv1d = nn.Conv1d(di, di, kernel_size=k, groups=di, bias=True)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)  # -> (dt_low, B, C)
        self.dt_proj = nn.Linear(r, di, bias=True)  # its bias is the scan's delta_bias
        self.A_log = nn.Parameter(torch.empty(di, n, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(di, dtype=torch.float32))
        self.out_proj = nn.Linear(di, d, bias=False)
        self.out_proj.weight._is_output_projection = True  # Model scales these by 1/sqrt(n_layer)
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max] via inverse softplus (docs/paper-facts.md#initialization)."""
        c, di, n = self.config, self.config.d_inner, self.config.d_state
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(di, n))
        self.D.fill_(1.0)
        std = c.dt_rank**-0.5
        self.dt_proj.weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(di) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt

    def init_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        c = self.config
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return MambaState(
            conv=torch.zeros(batch_size, c.d_inner, c.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=torch.float32),
        )

    def _dt_B_C(self, x: torch.Tensor):
        """x (..., d_inner) -> delta without bias (..., d_inner), B (..., n), C (..., n)."""
        r, n = self.config.dt_rank, self.config.d_state
        dt_low, B, C = self.x_proj(x).split([r, n, n], dim=-1)
        return F.linear(dt_low, self.dt_proj.weight), B, C  # bias is applied inside the scan

    def forward(self, hidden: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, None]:
        """hidden (b, l, d_model) -> ((b, l, d_model), None). With ``state``, start from it and update it in place."""
        if state is not None and hidden.shape[1] == 1:
            return self._step(hidden[:, 0], state)[:, None], None
        ops = get_ops(self.config.backend)
        k = self.config.d_conv
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each
        x, z = x.transpose(1, 2), z.transpose(1, 2)  # (b, d_inner, l): the kernels' layout
        conv_w = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
        if state is not None:  # the conv state after this chunk: its last d_conv inputs, zero-padded
            new_conv = torch.cat([state.conv, x.to(state.conv.dtype)], dim=-1)[..., -k:]
        x = ops.causal_conv1d(
            x, conv_w, self.conv1d.bias, conv_state=None if state is None else state.conv, activation="silu"
        )
        if state is not None:
            state.conv.copy_(new_conv)
        delta, B, C = self._dt_B_C(x.transpose(1, 2))  # (b, l, d_inner), (b, l, n), (b, l, n)
        A = -torch.exp(self.A_log.float())  # (d_inner, n)
        y = ops.selective_scan(
            x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=None if state is None else state.ssm, return_last_state=state is not None,
        )
        if state is not None:
            y, last = y
            state.ssm.copy_(last)
        return self.out_proj(y.transpose(1, 2)), None  # (b, l, d_model)

    def _step(self, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: hidden (b, d_model) -> (b, d_model); ``state`` is updated in place."""
        ops = get_ops(self.config.backend)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d_inner) each
        x = ops.causal_conv1d_update(
            x.to(state.conv.dtype), state.conv, self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu"
        )
        delta, B, C = self._dt_B_C(x)  # (b, d_inner), (b, n), (b, n)
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(
            state.ssm, x, delta, A, B, C, self.D.float(), z, dt_bias=self.dt_proj.bias.float(), dt_softplus=True
        )
        return self.out_proj(y)
