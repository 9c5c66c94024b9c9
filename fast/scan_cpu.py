"""The selective scan on CPU: vectorised PyTorch with a hand-written reverse-time backward.

Same math as ``reference/selective_scan.py`` (docs/paper-facts.md#selective-scan), read that file first. What changes:

* The reference builds dA and dBu for the whole sequence, (b, d, l, n) each, and lets autograd
  record every one of its l steps. Here the sequence is cut into chunks of ``CHUNK`` positions;
  dA and dBu exist for one chunk at a time, time-major (T, b, d, n) so that one position is one
  contiguous (b, d, n) tile.
* The recurrence inside a chunk is one in-place ``addcmul_`` per position on those tiles
  (h_t = dA_t * h_{t-1} + dBu_t, with the dBu buffer turned into the h buffer as it goes).
  Everything else (exp, products, the contractions, the reductions of the backward) is done for a
  whole chunk at once. Not chosen (considered, not measured): the "cumulative log-decay" form
  (h_t from exp(S_t - S_s) over a chunk) needs a (T, T) matrix per (b, d, n), T times the work of
  the recurrence at n = 16; and its cheap variant, dividing by exp(S_t), overflows on long
  sequences. The per-step loop has no such risk: it is the recurrence itself, and its Python
  overhead (one in-place op per position, a few microseconds) is small next to the chunk-wide work.
* Only the state at the start of every chunk is kept for the backward, (nchunks, b, d, n). The
  backward walks the chunks in reverse, recomputes the chunk's states from its start state, and
  runs the reverse-time recurrence for the state gradient:

      gh_t = gy_t C_t + dA_{t+1} * gh_{t+1}        (gh_t = dLoss/dh_t, all paths)

  from which every input gradient is a chunk-wide product and a sum (see ``_ScanCPU.backward``).

Glossary (as in the reference; T = positions in the current chunk):
    delta   Δ after bias and softplus                         (l, b, d)   time-major copy
    dA      exp(Δ_t A)                                        (T, b, d, n)
    dBu     Δ_t B_t u_t                                        (T, b, d, n)
    H       h_t for the chunk's positions                     (T, b, d, n)
    G       gh_t = dLoss/dh_t for the chunk's positions       (T, b, d, n)
    gy      dLoss/dy_t, y = C·h before the D skip and gate    (l, b, d)

Works for any device (the Triton path replaces it on CUDA); compute dtype float32, or float64 if an
input is float64; gradients are returned in each input's dtype.
"""

import torch
import torch.nn.functional as F

CHUNK = 64  # positions per chunk: big enough to amortise the chunk-wide ops, small enough for cache


def _prepare(u, delta, delta_bias, delta_softplus, f):
    """Time-major fp copies of u and of the processed step size; returns (u_t, delta_t, pre)."""
    l, b, d = u.shape[2], u.shape[0], u.shape[1]
    u_t = u.new_empty(l, b, d, dtype=f).copy_(u.permute(2, 0, 1))  # (l, b, d), a fresh copy
    pre = delta.new_empty(l, b, d, dtype=f).copy_(delta.permute(2, 0, 1))  # (l, b, d), a fresh copy
    if delta_bias is not None:
        pre.add_(delta_bias.to(f))
    d_t = F.softplus(pre) if delta_softplus else pre
    return u_t, d_t, pre


# --8<-- [start:chunk_states]
def _chunk_states(dA, H, h0):
    """In place: H (T, b, d, n) holds dBu and becomes the chunk's states h_t, starting from h0 (b, d, n)."""
    H[0].addcmul_(dA[0], h0)
    for t in range(1, H.shape[0]):
        H[t].addcmul_(dA[t], H[t - 1])  # h_t = dA_t * h_{t-1} + dBu_t
    return H
# --8<-- [end:chunk_states]


def _discretize(d_c, u_c, B_c, A, dA, dBu):
    """Fill dA = exp(Δ A) and dBu = Δ u B (T, b, d, n) for one chunk of Δ, u (T, b, d) and B (T, b, n).

    Written into buffers allocated once per call: fresh multi-megabyte tensors for every chunk
    cost an allocation and fresh page faults each time.
    """
    torch.mul(d_c[..., None], A, out=dA).exp_()
    torch.mul((d_c * u_c)[..., None], B_c[:, :, None, :], out=dBu)


def _contract_n(X, v):
    """Σ_n X[t, b, d, n] v[t, b, n] -> (T, b, d), as one batched matmul over (t, b)."""
    T, b, d, n = X.shape
    return torch.bmm(X.view(T * b, d, n), v.reshape(T * b, n, 1)).view(T, b, d)


def _contract_d(X, w):
    """Σ_d X[t, b, d, n] w[t, b, d] -> (T, b, n), as one batched matmul over (t, b)."""
    T, b, d, n = X.shape
    return torch.bmm(w.reshape(T * b, 1, d), X.view(T * b, d, n)).view(T, b, n)


# --8<-- [start:ScanCPU]
class _ScanCPU(torch.autograd.Function):
    """Forward: chunked scan saving chunk-start states. Backward: reverse chunks, reverse time."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, f):
        b, d, L = u.shape
        n = A.shape[1]
        u_t, d_t, pre = _prepare(u, delta, delta_bias, delta_softplus, f)
        del pre  # only the backward needs Δ before the softplus
        B_t = B.to(f).permute(2, 0, 1).contiguous()  # (l, b, n)
        C_t = C.to(f).permute(2, 0, 1).contiguous()  # (l, b, n)
        Af = A.to(f)  # (d, n)
        h = u_t.new_zeros(b, d, n) if initial_state is None else initial_state.to(f)  # (b, d, n)
        starts = range(0, L, CHUNK)
        h_starts = u_t.new_empty(len(starts), b, d, n)  # the state before each chunk
        y = u_t.new_empty(L, b, d)  # (l, b, d)
        T = min(CHUNK, L)
        dA_buf, H_buf = u_t.new_empty(T, b, d, n), u_t.new_empty(T, b, d, n)
        for i, t0 in enumerate(starts):
            t1 = min(t0 + CHUNK, L)
            dA, H = dA_buf[: t1 - t0], H_buf[: t1 - t0]  # (T, b, d, n)
            h_starts[i] = h
            _discretize(d_t[t0:t1], u_t[t0:t1], B_t[t0:t1], Af, dA, H)
            _chunk_states(dA, H, h)
            y[t0:t1] = _contract_n(H, C_t[t0:t1])  # y_t = Σ_n h_t C_t
            h = H[-1].clone()
        out = y  # (l, b, d), finished in place: out = (y + D u) * silu(z)
        if D is not None:
            out.addcmul_(u_t, D.to(f))
        if z is not None:
            out.mul_(F.silu(z.to(f).permute(2, 0, 1)))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h_starts)
        ctx.delta_softplus, ctx.f = delta_softplus, f
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return out.permute(1, 2, 0).to(u.dtype), h

    @staticmethod
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, h_starts = ctx.saved_tensors

        f = ctx.f
        b, d, L = u.shape
        n = A.shape[1]
        u_t, d_t, pre = _prepare(u, delta, delta_bias, ctx.delta_softplus, f)
        B_t = B.to(f).permute(2, 0, 1).contiguous()  # (l, b, n)
        C_t = C.to(f).permute(2, 0, 1).contiguous()  # (l, b, n)
        Af = A.to(f)
        g_out = g_out.to(f).permute(2, 0, 1)  # (l, b, d)

        # The output side, for the whole sequence: out = (y + D u) * silu(z).
        if z is not None:
            z_t = z.to(f).permute(2, 0, 1)
            sig = torch.sigmoid(z_t)
            gy = g_out * z_t * sig  # (l, b, d); silu(z) = z σ(z)
        else:
            gy = g_out.contiguous()
        y = u_t.new_empty(L, b, d)  # recomputed below, needed for dz
        gu = gy * D.to(f) if D is not None else torch.zeros_like(u_t)  # (l, b, d); D skip
        g_delta = u_t.new_empty(L, b, d)  # dLoss/dΔ (after softplus), filled per chunk
        gB = u_t.new_empty(L, b, n)
        gC = u_t.new_empty(L, b, n)
        gA = torch.zeros_like(Af)  # (d, n)

        # carry: extra gradient flowing into the chunk's last state (from the next chunk, or from
        # the returned last state for the final chunk).
        carry = g_last.to(f) if g_last is not None else u_t.new_zeros(b, d, n)
        T = min(CHUNK, L)
        dA_buf, H_buf, G_buf = (u_t.new_empty(T, b, d, n) for _ in range(3))
        for i in reversed(range(h_starts.shape[0])):
            t0 = i * CHUNK
            t1 = min(t0 + CHUNK, L)
            d_c, u_c, B_c, C_c, gy_c = d_t[t0:t1], u_t[t0:t1], B_t[t0:t1], C_t[t0:t1], gy[t0:t1]
            dA, H, G = dA_buf[: t1 - t0], H_buf[: t1 - t0], G_buf[: t1 - t0]  # (T, b, d, n)
            h0 = h_starts[i]
            _discretize(d_c, u_c, B_c, Af, dA, H)
            _chunk_states(dA, H, h0)  # recompute the chunk's states from its start state
            y[t0:t1] = _contract_n(H, C_c)
            gC[t0:t1] = _contract_d(H, gy_c)  # y_t = Σ_n h_t C_t

            # G: gh_t, in place from gy_t C_t, reverse time.
            torch.mul(gy_c[..., None], C_c[:, :, None, :], out=G)
            G[-1] += carry
            for t in range(G.shape[0] - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])  # gh_t += dA_{t+1} * gh_{t+1}
            carry = dA[0] * G[0]  # into h_{t0-1}: the previous chunk's last state

            # h_t = dA_t h_{t-1} + Δ_t u_t B_t, first the dBu path ...
            GB = _contract_n(G, B_c)  # Σ_n gh_t B_t: (T, b, d)
            gu[t0:t1] += GB * d_c
            gB[t0:t1] = _contract_d(G, d_c * u_c)
            # ... then the dA path: d(dA_t)/d(Δ_t A) = dA_t, so dLoss/d(Δ_t A) = gh_t dA_t h_{t-1}.
            P = G.mul_(dA)  # (T, b, d, n), in place: G is spent
            P[1:].mul_(H[:-1])
            P[0].mul_(h0)
            g_delta[t0:t1] = GB * u_c + torch.mul(P, Af, out=H).sum(-1)  # H is spent too
            gA += torch.mul(P, d_c[..., None], out=H).sum((0, 1))
        g_init = carry

        # Back through bias and softplus to the raw delta.
        g_pre = g_delta.mul_(pre.sigmoid_()) if ctx.delta_softplus else g_delta  # (l, b, d), in place

        def back(t, like):  # (l, b, x) time-major -> like's (b, x, l) layout and dtype
            return t.permute(1, 2, 0).to(like.dtype).contiguous()

        g_u = back(gu, u)
        g_dl = back(g_pre, delta)
        g_B, g_C = back(gB, B), back(gC, C)
        g_D = g_z = g_bias = g_h0 = None
        if D is not None and ctx.needs_input_grad[5]:
            g_D = (gy * u_t).sum((0, 1)).to(D.dtype)
        if z is not None and ctx.needs_input_grad[6]:
            pre_gate = y.addcmul_(u_t, D.to(f)) if D is not None else y  # y + D u, in place
            dsilu = torch.sub(1, sig).mul_(z_t).add_(1).mul_(sig)  # silu'(z) = σ(z)(1 + z(1 - σ(z)))
            g_z = back(pre_gate.mul_(g_out).mul_(dsilu), z)
        if delta_bias is not None and ctx.needs_input_grad[7]:
            g_bias = g_pre.sum((0, 1)).to(delta_bias.dtype)
        if ctx.needs_input_grad[8]:
            g_h0 = g_init.to(ctx.h0_dtype)
        return g_u, g_dl, gA.to(A.dtype), g_B, g_C, g_D, g_z, g_bias, g_h0, None, None
# --8<-- [end:ScanCPU]


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                       delta_softplus: bool, initial_state: torch.Tensor | None,
                       f: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (b, d, l) in u.dtype, last state (b, d, n) in f). Arguments already checked."""
    return _ScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, f)
