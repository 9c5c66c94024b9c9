"""The correctness sections of gpu_check.py: every Triton kernel and the whole model, fast vs reference.

Each ``section_<name>(ctx)`` yields its plan: a ``Check`` per check, and rows for what it skips. Nothing
runs while the plan is built (the driver lists every check before any runs); the section's
subprocess then runs the checks in order (``Ctx.run``, gpu_check.py), one row each. Tolerances are
the test suite's; see gpu_check.py's docstring.
"""

from __future__ import annotations

import math
import os
import sys

from gpu_check import MIN_VERSIONS, REPO, below_minimum, check, row, version_tuple


def tol_ratio(actual, expected, atol, rtol):
    """max |a - e| / (atol + rtol |e|) over the elements (<= 1: allclose), and the max abs error."""
    import torch

    a, e = actual.detach().double(), expected.detach().to(actual.device).double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    err = (a - e).abs()
    return (err / (atol + rtol * e.abs())).max().item(), err.max().item()


def compare(pairs, atol, rtol, scaled=("d", "grad")):
    """pairs: [(name, actual, expected)] -> metrics of the worst one; ok when every ratio <= 1.

    Tensors whose names start with one of ``scaled`` (by default the gradients) get an absolute
    tolerance of atol * max(1, max|expected|), as the test suite does for sums over many positions.
    """
    worst, worst_name, worst_abs = -1.0, "", 0.0
    for name, a, e in pairs:
        scale = max(1.0, e.detach().abs().max().item()) if name.startswith(scaled) else 1.0
        r, abs_err = tol_ratio(a, e, atol * scale, rtol)
        if r > worst:
            worst, worst_name, worst_abs = r, name, abs_err
    return dict(ok=worst <= 1.0, worst=worst_name, tol_ratio=worst, max_abs_err=worst_abs, atol=atol, rtol=rtol)


def scan_inputs(seed, b, d, n, l, h0=False, device="cpu"):
    """float64 scan arguments at the model's init ranges (A = -(1..n), softplus(bias) in [1e-3, 0.1]),
    drawn on ``device`` (paper sizes are 10^8 numbers: drawing them on the GPU saves seconds)."""
    import torch

    g = torch.Generator(device).manual_seed(seed)
    f64 = dict(dtype=torch.float64, device=device)
    randn = lambda *s: torch.randn(*s, generator=g, **f64)  # noqa: E731
    dt = torch.exp(torch.rand(d, generator=g, **f64) * math.log(100.0) - 6.9)
    return dict(u=randn(b, d, l), delta=0.5 * randn(b, d, l), A=-torch.arange(1, n + 1.0, **f64).repeat(d, 1),
                B=randn(b, n, l), C=randn(b, n, l), D=randn(d), z=randn(b, d, l),
                delta_bias=dt + torch.log(-torch.expm1(-dt)), initial_state=randn(b, d, n) if h0 else None)


def ieee_fp32():
    """fp32 matmuls and cuDNN convolutions in full fp32, no TF32. torch 2.11 defaults cuDNN convolutions to
    TF32 (torch.backends.cudnn.conv.fp32_precision == "tf32"), which would round the fast backend's
    causal conv (F.conv1d) to 10-bit mantissas while the reference sums its taps in fp32. The legacy
    flags are used on purpose: torch 2.6 has no other, and in 2.11-2.13 setting the new per-op
    fp32_precision makes any later read of torch.backends.cudnn.allow_tf32 raise ("a mix of the
    legacy and new APIs"), while setting the legacy flags updates the new ones (conv becomes "none")."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2.9+: "Please use the new API settings to control TF32 behavior"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


PARAMS = ("A", "D", "delta_bias", "initial_state")


def cast(kw, dtype, device):
    """Sequence tensors in dtype, parameters and the state in fp32 (as in the model); float64 keeps all."""
    import torch

    keep = lambda k: torch.float64 if dtype == torch.float64 else torch.float32  # noqa: E731
    return {k: None if v is None else v.to(device=device, dtype=keep(k) if k in PARAMS else dtype) for k, v in kw.items()}


def grads_of(fn, kw, seed):
    """Outputs and every tensor argument's gradient for a fixed random linear loss on (out, last)."""
    import torch

    kw = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in kw.items()}
    out, last = fn(kw)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(torch.bfloat16).double().to(out.device)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(out.device)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    names = [k for k, v in kw.items() if v is not None]
    return [("out", out), ("last_state", last)] + list(zip(
        [f"grad {k}" for k in names], torch.autograd.grad(loss, [kw[k] for k in names])))


def section_env(ctx):
    import torch

    def env():
        m = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda or "none")
        try:
            import triton

            m["triton"] = triton.__version__
        except ImportError as e:
            m["triton"] = f"missing ({e})"
        import minimamba_moe
        import minimamba_moe.fast
        import minimamba_moe.reference

        m["package"] = os.path.dirname(minimamba_moe.__file__)
        m["from_checkout"] = all(str(REPO) in os.path.abspath(mod.__file__) for mod in
                                 (minimamba_moe, minimamba_moe.fast, minimamba_moe.reference))
        if ctx.cuda:
            p = torch.cuda.get_device_properties(torch.device(ctx.device))
            m.update(device=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
        m["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
        import numpy

        m["numpy"] = numpy.__version__
        interpreted = m["triton_interpret"] not in ("", "0")
        old_interpreter = not m["triton"].startswith("missing") and version_tuple(m["triton"]) < (3, 7)
        if interpreted and old_interpreter and version_tuple(numpy.__version__) >= (2, 4):  # (a GPU never interprets)
            m["interpreter"] = "fails: Triton 3.6's interpreter needs numpy < 2.4 (pip install 'numpy<2.4')"
        m["grouped_mm"] = hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm")
        old = [f"{p} {v} < {MIN_VERSIONS[p]}" for p, v in (("torch", torch.__version__), ("triton", m["triton"]))
               if not v.startswith("missing") and below_minimum(p, v)]
        m["below_minimum"] = ", ".join(old) or "none"
        m["ok"] = m["from_checkout"] and not old and "interpreter" not in m
        return m

    yield check("versions and device", env)


def section_scan(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.scan_triton import selective_scan_triton

    def run(b, d, l, dtype, h0, seed=0, block=None):
        kw = scan_inputs(seed, b, d, 16, l, h0, ctx.device)
        low = cast(kw, dtype, ctx.device)  # what the kernel gets
        exact = cast(low, torch.float64, ctx.device)  # the same values, float64
        tri = grads_of(lambda k: selective_scan_triton(**k, delta_softplus=True, block_l=block and block[0],
                                                       block_d=block and block[1]), low, seed)
        ref = grads_of(lambda k: reference.selective_scan(**k, delta_softplus=True, return_last_state=True),
                       exact, seed)
        # tests/test_fast_scan.py: fp32 1e-4 x scale abs and 1e-3 rel; bf16 2e-2 and 2e-2
        tol = (1e-4, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
        return compare([(n, a, e) for (n, a), (_, e) in zip(tri, ref)], *tol, scaled=("",))  # all scaled, as the tests

    shapes = [(2, 5, 37, True, (4, 2)), (1, 3, 40, True, None)]  # tiny tiles; the launcher's (across 2 chunks)
    shapes += [] if ctx.quick else [(3, 64, 100, True, None)]
    if not ctx.quick:
        shapes += [(1, 2304, 2048, False, None), (1, 2944, 2048, False, None)]
    for dtype in (torch.float32, torch.bfloat16):
        for b, d, l, h0, block in shapes:
            name = f"fwd+bwd {str(dtype)[6:]} b={b} d_inner={d} l={l}" + (" h0" if h0 else "")
            if dtype == torch.bfloat16 and not ctx.cuda:
                yield row("scan", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)")
                continue
            yield check(name, run, b, d, l, dtype, h0, block=block)


def section_step(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.state_update_triton import selective_state_update_triton

    def run(b, d, dtype):
        kw = scan_inputs(1, b, d, 16, 1, True, ctx.device)
        args = dict(x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"], B=kw["B"][..., 0], C=kw["C"][..., 0],
                    D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"])
        low = {k: v.to(ctx.device, torch.float32 if k in ("A", "D", "dt_bias") else dtype) for k, v in args.items()}
        s_tri = kw["initial_state"].to(ctx.device, torch.float32)
        s_ref = s_tri.double()
        out = selective_state_update_triton(s_tri, **low, dt_softplus=True)
        out_r = reference.selective_state_update(s_ref, **{k: v.double() for k, v in low.items()}, dt_softplus=True)
        tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)  # tests/test_triton_scan.py; bf16 as the scan
        return compare([("out", out, out_r), ("state", s_tri, s_ref)], *tol)

    for dtype in (torch.float32, torch.bfloat16):
        for b, d in [(2, 40)] + ([] if ctx.quick else [(1, 2304), (8, 2944)]):
            name = f"step {str(dtype)[6:]} b={b} d_inner={d}"
            if dtype == torch.bfloat16 and not ctx.cuda:
                yield row("step", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)")
                continue
            yield check(name, run, b, d, dtype)


def moe_case(seed, T, d, f, E, k, activation, device, dtype, drop=False):
    """Random MoE inputs drawn on device: k distinct experts per token, weights ~ N(0, 1/fan_in);
    drop: Switch capacity factor 1.0 (slot-major arrival, the rest dropped)."""
    import torch

    g = torch.Generator(device).manual_seed(seed)
    F1 = f if activation == "relu" else 2 * f
    randn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    x, w1, w2 = randn(T, d), randn(E, F1, d) / d**0.5, randn(E, d, f) / f**0.5
    gates = torch.rand(T, k, generator=g, device=device)
    idx = torch.rand(T, E, generator=g, device=device).topk(k, dim=1).indices
    if drop:
        onehot = torch.nn.functional.one_hot(idx.t().reshape(-1), E)
        keep = ((onehot.cumsum(0) * onehot).sum(-1) - 1 < int(T * k / E)).view(k, T).t()
        idx = torch.where(keep, idx, torch.full_like(idx, -1))
    return x.to(dtype), idx, gates.to(dtype), w1.to(dtype), w2.to(dtype)


def moe_grads(op, x, idx, gates, w1, w2, activation, dout):
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, w1, w2)]
    out = op(leaves[0], idx, leaves[1], leaves[2], leaves[3], activation)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return [("out", out)] + [(n, torch.zeros_like(t) if gr is None else gr)
                             for n, t, gr in zip(("dx", "dgates", "dw1", "dw2"), leaves, grads)]


def section_moe(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.moe_triton import moe_experts_triton

    def run(T, d, f, E, k, act, dtype, drop):
        ieee_fp32()  # the fp32 reference in true fp32
        x, idx, gates, w1, w2 = moe_case(0, T, d, f, E, k, act, ctx.device, dtype, drop)
        dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, dtype)
        got = moe_grads(moe_experts_triton, x, idx, gates, w1, w2, act, dout)
        want = moe_grads(reference.moe_experts, x, idx, gates, w1, w2, act, dout)
        pairs = [(n, a, e) for (n, a), (_, e) in zip(got, want)]
        if dtype == torch.float32:  # tests/test_triton_moe.py
            return compare(pairs, 2e-5, 1e-4)
        out = compare(pairs[:1], 3e-2, 3e-2)  # tests/test_fast_moe.py bf16: 3e-2 outputs, 5e-2 x scale grads
        grads = compare(pairs[1:], 5e-2, 5e-2)
        return grads if grads["tol_ratio"] > out["tol_ratio"] else out

    cases = [("small", 40, 33, 70, 6, 2, "swiglu", False), ("small drops", 40, 33, 70, 6, 2, "relu", True)]
    if not ctx.quick:
        cases += [("blackmamba-1.5b", 2048, 1152, 3072, 8, 1, "swiglu", False),
                  ("blackmamba-2.8b", 2048, 1472, 3872, 8, 1, "swiglu", False),
                  ("moe-mamba-25m", 2048, 512, 1536, 42, 1, "relu", True),
                  ("moe-mamba-100m", 2048, 768, 2304, 42, 1, "relu", True)]
    for dtype in (torch.float32, torch.bfloat16):
        for label, T, d, f, E, k, act, drop in cases:
            name = f"fwd+bwd {str(dtype)[6:]} {label}: T={T} d={d} f={f} E={E} top-{k} {act}"
            if dtype == torch.bfloat16 and not ctx.cuda:
                yield row("moe", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)")
                continue
            yield check(name, run, T, d, f, E, k, act, dtype, drop)


def section_sinkhorn(ctx):
    import torch

    from minimamba_moe import reference
    from minimamba_moe.fast.sinkhorn_triton import sinkhorn_triton

    def run(T, E, sigma, init, stopping, dtype, max_iters=100, tol=1e-4):
        g = torch.Generator().manual_seed(T + E)
        logits = (sigma * torch.randn(T, E, generator=g)).to(ctx.device, dtype)
        P, n = sinkhorn_triton(logits, init, stopping, tol, max_iters)
        P_ref, n_ref = reference.sinkhorn(logits, init, stopping, tol, max_iters)
        # tests/test_fast_sinkhorn.py: P within 2e-5 of max P; counts equal unless tol +-1% changes the
        # reference's count; routes equal where the reference's top-2 differ by > 1e-3 relative
        edge = len({int(reference.sinkhorn(logits, init, stopping, tol * s, max_iters)[1]) for s in (0.99, 1.01)}) > 1
        r, abs_err = tol_ratio(P, P_ref, 2e-5 * P_ref.max().item(), 0.0)
        top2 = P_ref.topk(min(2, E), dim=1).values
        clear = (top2[:, 0] - top2[:, -1] > 1e-3 * top2[:, 0]) | (E == 1)
        routes = torch.equal(P.argmax(1)[clear], P_ref.argmax(1)[clear])
        return dict(ok=r <= 1 and routes and (edge or int(n) == int(n_ref)), tol_ratio=r, max_abs_err=abs_err,
                    passes=int(n), passes_ref=int(n_ref), knife_edge=edge, routes_equal=routes)

    cases = [(80, 5, 1.0, "uniform", "marginal"), (300, 8, 2.0, "blackmamba", "absolute")]
    if not ctx.quick:
        cases += [(16384, 8, 1.0, "blackmamba", "absolute"), (16384, 8, 1.0, "uniform", "marginal"),
                  (4096, 42, 1.0, "uniform", "marginal")]
    for dtype in (torch.float32, torch.bfloat16):
        for T, E, sigma, init, stopping in cases:
            name = f"{str(dtype)[6:]} logits T={T} E={E} {init}/{stopping}"
            if dtype == torch.bfloat16 and not ctx.cuda:
                yield row("sinkhorn", name, "skip", reason="bf16 kernels need a GPU (the interpreter runs fp32)")
                continue
            yield check(name, run, T, E, sigma, init, stopping, dtype)


SMALL = dict(vocab_size=50, pad_vocab_size_multiple=16, d_model=32, n_layer=4, d_expert=24, max_seq_len=64)
FAMILIES = {  # tests/test_model.py: one small config per preset family
    "blackmamba": ("tiny", {}), "moe-mamba": ("moe-mamba-25m", dict(n_experts=5)), "mamba": ("mamba-25m", {}),
    "transformer-moe": ("transformer-moe-25m", dict(n_head=2, n_experts=3)),
}


def section_model(ctx):
    import torch

    from minimamba_moe import Model, ModelConfig

    def build(preset, overrides, seed=0):
        ieee_fp32()  # fast and reference in true fp32: matmuls and the fast causal conv's cuDNN call
        torch.manual_seed(seed)
        model = Model(ModelConfig.from_preset(preset, **overrides, backend="reference")).to(ctx.device).eval()
        with torch.no_grad():  # random, not freshly initialised, weights (as tests/test_model.py)
            for p in model.parameters():
                if p.dim() >= 2:
                    p.add_(0.05 * torch.randn_like(p))
        return model

    def fwd_bwd(model, ids, backend, bf16=False):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return [("logits", logits.detach().float())] + [(f"grad {n}", p.grad.detach().clone())
                                                         for n, p in model.named_parameters() if p.grad is not None]

    def backends(preset, overrides, b, l, bf16=False):
        model = build(preset, overrides)  # eval mode: routing depends on the token alone (no Sinkhorn batch)
        ids = torch.randint(0, model.config.vocab_size, (b, l), generator=torch.Generator().manual_seed(1)).to(ctx.device)
        got, want = fwd_bwd(model, ids, "fast", bf16), fwd_bwd(model, ids, "reference", bf16)
        # test_model.py holds fast to reference at 1e-4 on logits; gradients 1e-3 x scale; bf16 autocast 5e-2
        tol = (5e-2, 5e-2) if bf16 else (1e-4, 1e-3)
        return compare([(n, a, e) for (n, a), (_, e) in zip(got, want)], *tol)

    def step_equals_forward(preset, overrides, l):
        model = build(preset, overrides)
        model.set_backend("fast")
        ids = torch.randint(0, model.config.vocab_size, (2, l), generator=torch.Generator().manual_seed(2)).to(ctx.device)
        with torch.no_grad():
            full = model(ids).logits
            state = model.init_state(2)
            half = l // 2
            pre = model(ids[:, :half], state=state).logits
            rest = torch.stack([model.step(ids[:, t], state) for t in range(half, l)], dim=1)
        return compare([("prefill+step logits", torch.cat([pre, rest], 1), full)], 1e-4, 1e-4)  # test_model.py STEP_*

    for family, (preset, extra) in FAMILIES.items():
        yield check(f"{family} small fp32: fast vs reference, logits + grads",
                    backends, preset, {**SMALL, **extra}, 2, 10)
        yield check(f"{family} small: prefill + step == forward (fast)",
                    step_equals_forward, preset, {**SMALL, **extra}, 9)
    if ctx.cuda:
        yield check("blackmamba small bf16 autocast: fast vs reference", backends, "tiny", SMALL, 2, 10, True)
    if not ctx.quick:
        big = dict(n_layer=2, vocab_size=4096)
        yield check("blackmamba-1.5b 2 layers fp32 b=1 l=512: fast vs reference",
                    backends, "blackmamba-1.5b", big, 1, 512)
        yield check("blackmamba-1.5b 2 layers: prefill + step == forward",
                    step_equals_forward, "blackmamba-1.5b", big, 32)
        yield check("moe-mamba-100m 2 layers fp32 b=1 l=512: fast vs reference",
                    backends, "moe-mamba-100m", big, 1, 512)
