"""The MoE experts on CPU tensors: sort the token-slots by expert, one grouped matmul per layer.

Glossary (code name = meaning, shape; see routing.py for order / token / offsets):

    n        kept token-slots (offsets[E]); sorted rows 0 : n, expert e owns offsets[e] : offsets[e+1]
    xs       x[token], the input rows in sorted order                       (n, d)
    h        xs @ w1[e].T, pre-activation (gate half then up half)          (n, F1)  F1 = 2f or f
    a        act(h)                                                          (n, f)
    y        a @ w2[e].T, the expert outputs                                 (n, d)
    g        gate of each sorted row                                         (n,)
    out      Σ over a token's rows of g * y, summed in fp32 (index_add)     (T, d)

Data flow, forward:  gather xs -> grouped matmul (w1) -> act -> grouped matmul (w2) -> * g -> index_add
(``experts_forward``; when no gradient is needed, ``moe_experts_no_grad`` runs it over blocks of rows).
Backward, the same steps reversed (dout = gradient of out, (T, d)):
    dy   = dout[token]                         (n, d)
    da   = dy @ w2[e]     (grouped)            (n, f)    before the gate
    dg   = Σ_j da * a                          (n,)      = <dy, y>, since y = a @ w2[e].T
    da  *= g;  dh = act'(h) · da               (n, F1)
    dw2[e] = (g * dy)_eᵀ @ a_e                 (E, d, f)  grouped "transposed" matmul
    dw1[e] = dh_eᵀ @ xs_e                      (E, F1, d)
    dx   = index_add over token of dh @ w1[e]  (T, d)
dg from da avoids keeping y for the backward. Nothing loops over tokens; the only Python loop is
over experts, in the fallback when ``torch.nn.functional.grouped_mm`` cannot take the tensors
(float64, or rows not 16-byte aligned) — on CPU tensors reading offsets to the host costs nothing.
Tensors the backward owns (dy, da) are scaled in place: a fresh tensor of more than 32 MiB is a
new mmap for glibc's malloc, and its first touch (a page fault per 4 KiB) can cost more than the
arithmetic on it.

Where the time goes (benchmarks/bench_moe.py): both this path and the reference do the same matmul
work (forward h, y: 2 n d (F1 + f) FLOP; backward da, dw2, dw1, dx: twice that). At E = 8, T = 4096,
d = 512, f = 1024, k = 1 that is 38.6 GFLOP; at the 266 GFLOP/s a 4096³ fp32 matmul reaches on this
2-core machine, at least 145 ms, against ~300 ms for the reference: the reference is already
mostly matmuls, so no fp32 CPU path can be more than ~2x faster than it at E = 8 (measured: 1.3x
at k = 2 to 1.7x at k = 1; the forward alone 1.0x-1.1x). The gain is the reference's autograd
overhead, which grows with E: every ``w1[e]`` / ``w2[e]`` it indexes gets a full (E, F1, d) /
(E, d, f) zero gradient in the backward, E times over — 6x to 15x at E = 64 here (the reference's
time swings from run to run).
"""

import torch
import torch.nn.functional as F

from minimamba_moe.reference.checks import compute_dtype

from .routing import Routing, group_by_expert

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(*tensors) -> bool:
    """grouped_mm's own rule: fp32/bf16/fp16, 16-byte aligned base and non-unit strides."""
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.data_ptr() % 16:
            return False
        if any(s != 1 and (s * t.element_size()) % 16 for s in t.stride()):
            return False
    return True


# --8<-- [start:grouped_mm]
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row group e of a (rows offsets[e] : offsets[e+1]) times b[e]: (n, K) x (E, K, M) -> (n, M)."""
    if _GROUPED_MM is not None and a.shape[0] > 0 and _aligned(a, b):
        return _GROUPED_MM(a, b, offs=offsets[1:].to(torch.int32))
    out = a.new_empty(a.shape[0], b.shape[2])
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi], b[e], out=out[lo:hi])
    return out
# --8<-- [end:grouped_mm]


def grouped_mm_t(a, b, offsets):
    """Per group e: a_eᵀ @ b_e with a (n, K), b (n, M) -> (E, K, M); an expert with no rows gives 0."""
    E = offsets.shape[0] - 1
    if _GROUPED_MM is not None and a.shape[0] > 0 and _aligned(a.t(), b):
        out = _GROUPED_MM(a.t(), b, offs=offsets[1:].to(torch.int32))  # (E, K, M)
        empty = (offsets[1:] == offsets[:-1]).nonzero().view(-1)  # CPU: no device to wait for
        if empty.numel():
            out[empty] = 0  # grouped_mm leaves the blocks of experts with no rows unwritten
        return out
    out = a.new_zeros(E, a.shape[1], b.shape[1])
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
    return out


def act_forward(h, activation):
    """h (n, F1) -> a (n, f), one new (n, f) tensor: fn(gate) is written, then multiplied by up in place."""
    if activation == "relu":
        return F.relu(h)
    f = h.shape[1] // 2
    gate, up = h[:, :f], h[:, f:]
    return (F.silu(gate) if activation == "swiglu" else F.gelu(gate)).mul_(up)


def act_backward(h, da, activation):
    """h (n, F1), da = dL/da (n, f) -> dh (n, F1), the derivative of act_forward by hand:

        relu:   dh = da * [h > 0]                              (written into da: the caller's scratch)
        gated:  a = fn(gate) * up  ->  d gate = da * up * fn'(gate),  d up = da * fn(gate)
                silu' = s (1 + gate (1 - s)), s = sigmoid(gate);  gelu' = Φ(gate) + gate φ(gate)

    fn'(gate) times its incoming gradient is PyTorch's own fused elementwise kernel
    (aten.silu_backward / aten.gelu_backward: the same formulas, one pass over memory). The gated
    case allocates dh only and uses its gate half as scratch for fn(gate): on a CPU a fresh large
    tensor costs a page fault per 4 KiB on first touch, more than the arithmetic itself.
    """
    if activation == "relu":
        return da.masked_fill_(h <= 0, 0)
    f = h.shape[1] // 2
    gate, up = h[:, :f], h[:, f:]
    dh = torch.empty_like(h)  # (n, F1)
    dgate, dup = dh[:, :f], dh[:, f:]
    aten = torch.ops.aten
    if activation == "swiglu":
        aten.silu.out(gate, out=dgate)  # scratch: fn(gate)
    else:
        aten.gelu.out(gate, out=dgate)
    torch.mul(da, dgate, out=dup)  # d up = da * fn(gate)
    torch.mul(da, up, out=dgate)  # da * up, then times fn'(gate) in place:
    if activation == "swiglu":
        aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)
    else:
        aten.gelu_backward.grad_input(dgate, gate, grad_input=dgate)
    return dh


# --8<-- [start:experts_forward]
def experts_forward(x, token, g, w1, w2, offsets, activation, out):
    """Sorted rows through their experts: h, a, y for rows x[token], g * y added into out (T, d).

    token (R,) and g (R,) belong to R consecutive sorted rows; expert e owns rows offsets[e] :
    offsets[e+1] of them. Returns h (R, F1) and a (R, f), which the backward needs.
    """
    h = grouped_mm(x[token], w1.transpose(1, 2), offsets)  # (R, F1)
    a = act_forward(h, activation)  # (R, f)
    y = grouped_mm(a, w2.transpose(1, 2), offsets)  # (R, d)
    out.index_add_(0, token, y.to(out.dtype).mul_(g.to(out.dtype)[:, None]))  # y is ours: scaled in place
    return h, a
# --8<-- [end:experts_forward]


BLOCK_BYTES = 8 << 20  # no-grad forward: rows per block so that one block of h is 8 MiB


def moe_experts_no_grad(x, expert_idx, gates, w1, w2, activation):
    """The forward alone (inference), in blocks of sorted rows: nothing is kept for a backward, so
    xs, h, a and y exist for one block at a time. Blocks of 8 MiB stay below glibc's mmap threshold
    (freed memory is reused, no page faults) and mostly in cache; a block may straddle experts
    (its offsets are the global ones clipped to the block)."""
    r: Routing = group_by_expert(expert_idx, w1.shape[0])
    n = int(r.offsets[-1])  # CPU tensor: no device to wait for
    g = gates.reshape(-1)[r.order[:n]]  # (n,)
    rows = max(1, BLOCK_BYTES // (w1.shape[1] * x.element_size()))
    out = torch.zeros(x.shape, dtype=compute_dtype(x), device=x.device)  # (T, d)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        offsets = r.offsets.clamp(lo, hi) - lo  # (E+1,) expert e owns block rows offsets[e] : offsets[e+1]
        experts_forward(x, r.token[lo:hi], g[lo:hi], w1, w2, offsets, activation, out)
    return out.to(x.dtype)


class MoEExpertsCPU(torch.autograd.Function):
    """moe_experts by sort + grouped matmuls, with the backward written out (see the module doc)."""

    @staticmethod
    def forward(ctx, x, expert_idx, gates, w1, w2, activation):
        T, d = x.shape
        k = expert_idx.shape[1]
        acc = compute_dtype(x)
        r: Routing = group_by_expert(expert_idx, w1.shape[0])
        n = int(r.offsets[-1])  # CPU tensor: no device to wait for
        rows, token = r.order[:n], r.token[:n]  # (n,), (n,)
        g = gates.reshape(T * k)[rows]  # (n,)
        out = torch.zeros(T, d, dtype=acc, device=x.device)
        h, a = experts_forward(x, token, g, w1, w2, r.offsets, activation, out)  # (n, F1), (n, f)
        ctx.save_for_backward(x, w1, w2, rows, token, g, h, a, r.offsets)
        ctx.activation, ctx.k, ctx.gates_dtype = activation, k, gates.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, rows, token, g, h, a, offsets = ctx.saved_tensors
        T, d = x.shape
        acc = compute_dtype(x)
        dx = dgates = dw1 = dw2 = None
        dy = dout[token]  # (n, d), a fresh gather: ours to scale in place
        da = grouped_mm(dy, w2, offsets)  # (n, f) = dy @ w2[e], the raw gradient before the gate
        if ctx.needs_input_grad[2]:
            dg = torch.linalg.vecdot(da.to(acc), a.to(acc))  # (n,) = <dy, y>
            dgates = torch.zeros(T * ctx.k, dtype=acc, device=x.device).index_put_((rows,), dg).view(T, ctx.k)
            dgates = dgates.to(ctx.gates_dtype)
        gcol = g.to(dy.dtype)[:, None]  # (n, 1)
        if ctx.needs_input_grad[4]:
            dw2 = grouped_mm_t(dy.mul_(gcol), a, offsets)  # (E, d, f) = (g dy)_eᵀ @ a_e
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            dh = act_backward(h, da.mul_(gcol), ctx.activation)  # (n, F1)
            if ctx.needs_input_grad[3]:
                dw1 = grouped_mm_t(dh, x[token], offsets)  # (E, F1, d)
            if ctx.needs_input_grad[0]:
                dxs = grouped_mm(dh, w1, offsets)  # (n, d) = dh @ w1[e]
                dx = torch.zeros(T, d, dtype=acc, device=x.device).index_add_(0, token, dxs.to(acc)).to(x.dtype)
        return dx, None, dgates, dw1, dw2, None
