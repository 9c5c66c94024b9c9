"""minimamba_moe.fast: the fast kernels, with the same signatures as minimamba_moe.reference.

Each op keeps the reference's signature and docstring and is tested against the reference op of
the same name (tests/test_fast_*.py, tests/test_triton_*.py).

selective_scan / selective_state_update (fast/selective_scan.py): Triton kernels on CUDA tensors
(fast/scan_triton.py, fast/state_update_triton.py), a chunked PyTorch scan with a hand-written
reverse-time backward elsewhere (fast/scan_cpu.py). causal_conv1d / causal_conv1d_update
(fast/causal_conv1d.py): one grouped F.conv1d, any device.

moe_experts (fast/moe.py): tokens grouped by expert on the device (fast/routing.py), then Triton
grouped GEMMs with gather / fused activation / gate + scatter-add epilogues on CUDA tensors
(fast/moe_triton.py), sort + torch grouped_mm with a hand-written backward elsewhere (fast/moe_cpu.py).
sinkhorn (fast/sinkhorn.py): every pass and the stopping rule in one Triton launch on CUDA tensors
(fast/sinkhorn_triton.py), the reference's passes less one matrix-vector product elsewhere.
"""

from minimamba_moe.reference import expert_mlp  # one expert on its own rows: plain PyTorch is already fast

from .causal_conv1d import causal_conv1d, causal_conv1d_update  # grouped F.conv1d, any device
from .moe import moe_experts  # sort + grouped GEMMs: Triton on CUDA, grouped_mm on CPU
from .selective_scan import selective_scan, selective_state_update  # Triton on CUDA, chunked PyTorch on CPU
from .sinkhorn import sinkhorn  # one fused Triton launch on CUDA, a lean loop on CPU

__all__ = [
    "selective_scan",
    "selective_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "sinkhorn",
    "moe_experts",
    "expert_mlp",
]
