"""What the benchmark and reproduction scripts share: models at equal active parameters, a small
training loop on the embedded corpus, and the table / JSON / PNG output.

    equal_active_configs(...)   the four models of the papers' comparisons, sized to one active count
    Trainer / train(...)        AdamW, warmup + cosine, grad clip: MoE-Mamba's recipe (paper §4.1)
    evaluate(...)               mean validation cross-entropy on fixed windows (and its standard error)
    long_setting(...)           the long setting's derived numbers (steps, warmup, EMA, validation)
    sweep_lrs(...)              a peak learning-rate sweep per model, extended at an edge
    Runner                      runs training tasks `jobs` at a time, each cached as it finishes
    paired(...) / verdict(...)  per-seed paired differences, with the validation standard error
    evaluate_routings(...)      a Sinkhorn-trained model's loss and load under both routings
    specialisation(...)         what each expert takes, by byte class and by byte
    table / write_json / plot   output (matplotlib is optional and imported only to draw)

Data: the Python standard library's own sources, byte tokenizer (``minimamba_moe.run.data``), so
everything runs offline; ``--data`` points at any local text file or folder instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minimamba_moe.config import ModelConfig  # noqa: E402
from minimamba_moe.flops import flops_per_token  # noqa: E402
from minimamba_moe.model import Model, count_params  # noqa: E402
from minimamba_moe.run.data import Batches, prepare_data  # noqa: E402
from minimamba_moe.run.tokenizer import ByteTokenizer  # noqa: E402

FAMILIES = ("mamba_moe", "mamba", "transformer", "transformer_moe")
LABELS = {"mamba_moe": "Mamba+MoE", "mamba": "Mamba", "transformer": "Transformer",
          "transformer_moe": "Transformer-MoE"}
PATTERNS = {"mamba_moe": ("mamba", "moe"), "mamba": ("mamba",), "transformer": ("attention", "mlp"),
            "transformer_moe": ("attention", "moe")}
# BlackMamba's choices (paper §3) and MoE-Mamba's (paper §4.1: LayerNorm, ReLU experts, Switch).
STYLES = {
    "blackmamba": dict(norm="rmsnorm", final_norm="layernorm", tie_embeddings=True, mlp_activation="swiglu",
                       router="sinkhorn"),
    "moe-mamba": dict(norm="layernorm", final_norm="none", tie_embeddings=False, mlp_activation="relu",
                      router="switch", capacity_factor=1.0, aux_loss_coef=0.01),
}


# --- models ---------------------------------------------------------------------------------------
def equal_active_configs(d_model: int, n_layer: int, n_experts: int, d_expert: int | None, seq_len: int,
                         style: str = "blackmamba", families=FAMILIES, **overrides) -> dict[str, ModelConfig]:
    """One config per family, all with ``n_layer`` layers of width ``d_model``.

    The dense Mamba has only Mamba layers (MoE-Mamba's baseline: one expert replaces one Mamba
    layer). Mamba+MoE alternates Mamba and MoE layers with experts of width ``d_expert``, or, when
    it is None, of the width that gives it the dense Mamba's active parameter count. The
    Transformers alternate attention with a dense MLP or an MoE layer whose hidden width is solved
    for so that their *active* parameter count equals the Mamba+MoE model's (within one unit of
    width).
    """
    common = dict(vocab_size=256, pad_vocab_size_multiple=64, d_model=d_model, n_layer=n_layer,
                  max_seq_len=seq_len, n_experts=n_experts, d_expert=d_expert or 2 * d_model,
                  n_head=max(1, d_model // 64), **STYLES[style])
    common.update(overrides)
    if d_expert is None:
        dense = count_params(ModelConfig(**common, layer_pattern=PATTERNS["mamba"])).active
        common["d_expert"] = _solve_width(dict(common, layer_pattern=PATTERNS["mamba_moe"]), "d_expert", dense, d_model)
    ref = ModelConfig(**common, layer_pattern=PATTERNS["mamba_moe"], name="mamba_moe")
    target = count_params(ref).active
    out = {}
    for fam in families:
        kw = dict(common, layer_pattern=PATTERNS[fam], name=fam)
        if fam == "transformer":
            kw["d_ff"] = _solve_width(kw, "d_ff", target, d_model)
        elif fam == "transformer_moe":
            kw["d_expert"] = _solve_width(kw, "d_expert", target, d_model)
        out[fam] = ModelConfig(**kw)
    return out


def _solve_width(kw: dict, field: str, target: int, d_model: int) -> int:
    """The width for which the active parameter count is closest to ``target`` (it is affine in it)."""
    a = count_params(ModelConfig(**{**kw, field: d_model})).active
    b = count_params(ModelConfig(**{**kw, field: 2 * d_model})).active
    return max(1, round(d_model + (target - a) * d_model / (b - a)))


def describe(config: ModelConfig, seq_len: int) -> dict:
    pc = count_params(config)
    return {"layer_pattern": list(config.layer_pattern), "d_model": config.d_model, "n_layer": config.n_layer,
            "d_ff": config.d_ff, "d_expert": config.d_expert, "n_experts": config.n_experts, "router": config.router,
            "params_total": pc.total, "params_active": pc.active,
            "flops_per_token_fwd": flops_per_token(config, seq_len, training=False).forward}


# --- data -----------------------------------------------------------------------------------------
def prepare(data: str = "", cache_dir: str = "data_cache", val_every: int = 100) -> Path:
    """The byte-tokenized corpus folder (the stdlib's sources unless ``data`` names local text);
    every ``val_every``-th document is held out for validation."""
    return prepare_data(ByteTokenizer(), "bytes", data=data, cache_dir=cache_dir, val_every=val_every,
                        log=lambda *a: None)


class ValWindows:
    """Validation windows that do not overlap, spread evenly over the whole validation split.

    ``get(i, batch_size)`` is batch i of ``n_batches``: windows i*batch_size .. (i+1)*batch_size - 1
    of n_batches * batch_size windows whose starts are evenly spaced (stride >= seq_len + 1 when the
    split is long enough; ``overlapping`` says when it is not).
    """

    def __init__(self, folder: Path, seq_len: int, n_batches: int, batch_size: int):
        self.data = Batches(folder, "val", seq_len, seed=10_000)  # checks the split is long enough
        tokens = self.data.tokens
        n = n_batches * batch_size
        room = len(tokens) - seq_len - 1
        self.stride = max(1, room // max(1, n - 1)) if n > 1 else 1
        self.starts = [min(room, i * self.stride) for i in range(n)]
        self.overlapping = self.stride < seq_len + 1
        self.seq_len, self.tokens_in_split = seq_len, len(tokens)

    def get(self, i: int, batch_size: int):
        import numpy as np

        rows = np.stack([self.data.tokens[s: s + self.seq_len + 1]
                         for s in self.starts[i * batch_size: (i + 1) * batch_size]]).astype(np.int64)
        xy = torch.from_numpy(rows)
        return xy[:, :-1], xy[:, 1:]


# --- training -------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, lr: float, warmup: int, min_frac: float = 0.1) -> float:
    """Linear warmup, then cosine down to ``min_frac * lr`` at the last step (MoE-Mamba §4.1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Trainer:
    """A model, its AdamW and one ``step``: forward, LM loss + auxiliary loss, backward, clip, update."""

    def __init__(self, config: ModelConfig, lr: float, seed: int, device: str = "cpu", weight_decay: float = 0.1,
                 betas=(0.9, 0.999), grad_clip: float = 0.5):
        torch.manual_seed(seed)
        self.model = Model(config).to(device)
        self.device, self.grad_clip = device, grad_clip
        decay = [p for p in self.model.parameters() if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)]
        other = [p for p in self.model.parameters() if not (p.ndim >= 2 and not getattr(p, "_no_weight_decay", False))]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=lr, betas=betas)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        """One update on (x, y) (b, l); returns (LM loss, the model output) with no host sync but the loss."""
        self.model.train()
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = x.to(self.device), y.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            out = self.model(x)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item(), out


@torch.no_grad()
def evaluate_batches(model: Model, val, batches: int, batch_size: int, device: str = "cpu",
                     routing: str = "model") -> list[float]:
    """Cross-entropy (nats per byte) of each of the same ``batches`` validation batches every call.

    ``routing``: "model" (model.eval(): the inference routing, the router's argmax) or "sinkhorn"
    (the routing as trained: the Sinkhorn choice over each batch's tokens; no dropout anywhere, so
    train mode changes nothing else).
    """
    model.train(routing == "sinkhorn")
    losses = []
    for i in range(batches):
        x, y = val.get(i, batch_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(x.to(device)).logits
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.eval()
    return losses


def evaluate(model: Model, val, batches: int, batch_size: int, device: str = "cpu") -> float:
    """Mean cross-entropy (nats per byte) over the same ``batches`` validation windows every call."""
    return statistics.fmean(evaluate_batches(model, val, batches, batch_size, device))


def std_error(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (0 for fewer than 2)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


class Diverged(RuntimeError):
    """The training loss stopped being finite."""


def train(config: ModelConfig, folder: Path, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
          device: str = "cpu", eval_every: int = 0, eval_batches: int = 4, warmup_frac: float = 0.01,
          warmup: int | None = None, stats_from: float = 0.8, curve_eval_batches: int | None = None,
          val_windows: str = "random", track_routing_every: int = 0, log=print) -> dict:
    """Train ``config`` from scratch; return its curves, final validation loss and routing statistics.

    Routing statistics are summed over the steps after ``stats_from * steps`` (training mode: the
    router's choices as trained, Sinkhorn included). Data order depends only on ``seed``, so two
    configs trained with the same seed see the same windows. ``warmup`` steps (default
    ``max(1, int(warmup_frac * steps))``). The final validation uses ``eval_batches`` batches
    (``val_losses`` per batch, ``val_se`` the standard error of their mean), the curve points
    ``curve_eval_batches``; ``val_windows`` "random" (windows drawn at random, seed 10,000) or
    "strided" (ValWindows: evenly spread, not overlapping). ``track_routing_every`` > 0 (Sinkhorn
    routers): every that many steps, the share of the step's tokens, per MoE layer, whose router
    argmax differs from the Sinkhorn-chosen expert (``routing_disagreement``: [step, [share]]).
    """
    trainer = Trainer(config, lr, seed, device)
    train_data = Batches(folder, "train", seq_len, seed)
    val = make_val(folder, seq_len, eval_batches, batch_size, val_windows)
    curve_batches = curve_eval_batches or eval_batches
    warmup = warmup if warmup is not None else max(1, int(warmup_frac * steps))
    disagreement, tracker = [], None
    if track_routing_every and config.router == "sinkhorn":
        tracker = RoutingTracker(trainer.model)
    losses, val_curve = [], []
    n_moe = sum(k in ("moe", "parallel") for k in config.layer_kinds)  # a parallel block holds one MoE
    load = torch.zeros(n_moe, config.n_experts, dtype=torch.int64)
    dropped = slots = iters = iter_calls = 0
    start = time.perf_counter()
    for step in range(steps):
        x, y = train_data.get(step, batch_size)
        if tracker is not None:
            tracker.active = step % track_routing_every == 0 or step == steps - 1
        loss, out = trainer.step(x, y, lr_at(step, steps, lr, warmup))
        if tracker is not None and tracker.active:
            disagreement.append((step + 1, tracker.pop()))
        if not math.isfinite(loss):
            raise Diverged(f"{config.name}: loss is {loss} at step {step}; lower the learning rate.")
        losses.append(loss)
        if step >= stats_from * steps and out.router_stats:
            load += torch.stack([s.tokens_per_expert.cpu() for s in out.router_stats])
            dropped += sum(int(s.dropped) for s in out.router_stats)
            slots += sum(int(s.tokens_per_expert.sum()) + int(s.dropped) for s in out.router_stats)
            iters += sum(int(s.sinkhorn_iters) for s in out.router_stats)
            iter_calls += len(out.router_stats)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            val_curve.append((step + 1, evaluate(trainer.model, val, curve_batches, batch_size, device)))
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"  {config.name} seed {seed} step {step + 1}/{steps} loss {loss:.4f} "
                f"({time.perf_counter() - start:.0f}s)")
    train_s = time.perf_counter() - start
    if tracker is not None:
        tracker.remove()
    val_losses = evaluate_batches(trainer.model, val, eval_batches, batch_size, device)
    final_val = statistics.fmean(val_losses)
    val_curve.append((steps, final_val))
    out = {"config": config.name, "seed": seed, "steps": steps, "tokens": steps * batch_size * seq_len,
           "lr": lr, "warmup": warmup, "train_loss": losses, "val_curve": val_curve, "final_val_loss": final_val,
           "val_losses": val_losses, "val_se": std_error(val_losses), "train_s": train_s,
           "tokens_per_s": steps * batch_size * seq_len / train_s if train_s > 0 else None,
           "load": load.tolist(), "dropped_frac": dropped / slots if slots else 0.0,
           "sinkhorn_iters_mean": iters / iter_calls if iter_calls else 0.0, "model": trainer.model}
    if tracker is not None:
        out["routing_disagreement"] = disagreement
    return out


def make_val(folder: Path, seq_len: int, batches: int, batch_size: int, kind: str = "random"):
    """The validation windows: "random" (Batches, seed 10,000) or "strided" (ValWindows)."""
    if kind == "strided":
        return ValWindows(folder, seq_len, batches, batch_size)
    return Batches(folder, "val", seq_len, seed=10_000)


def moe_layers(model: Model) -> list:
    """The model's MoE modules in layer order (inside a parallel block too)."""
    from minimamba_moe.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def choices(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an MoE module's input x (..., d): (the router's argmax, the Sinkhorn choice), each (T,).

    The Sinkhorn choice is computed as the layer computes it in training (same logits, same
    settings), so it equals the expert the training forward used (route_sinkhorn is deterministic).
    """
    from minimamba_moe.moe import route_sinkhorn

    logits = moe.router_logits(x.detach().reshape(-1, x.shape[-1]))
    sink = route_sinkhorn(logits, moe.config, training=True)[0][:, 0]
    return logits.argmax(-1), sink


class RoutingTracker:
    """Forward hooks on every MoE layer: when ``active``, record the share of tokens whose router
    argmax differs from the Sinkhorn-chosen expert (no effect on the forward itself)."""

    def __init__(self, model: Model):
        self.active, self.shares = False, []
        self.handles = [m.register_forward_hook(self._hook) for m in moe_layers(model)]

    @torch.no_grad()
    def _hook(self, module, inputs, output):
        if self.active:
            arg, sink = choices(module, inputs[0])
            self.shares.append((arg != sink).float().mean().item())

    def pop(self) -> list[float]:
        """The shares recorded since the last pop, one per MoE layer; stops recording."""
        shares, self.shares, self.active = self.shares, [], False
        return shares

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, started at the first value (MoE-Mamba smooths its loss this way)."""
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def steps_to_reach(curve: list[float], target: float) -> int | None:
    """1-based step at which ``curve`` first reaches ``target`` or below, None if it never does."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def imbalance(load: list[int]) -> float:
    """max / mean tokens per expert: 1 is perfectly balanced, E means every token to one expert."""
    total = sum(load)
    return max(load) * len(load) / total if total else float("nan")


def spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


# --- the long setting ---------------------------------------------------------------------------------
TOKENS_PER_ACTIVE = 50  # training tokens per active parameter, at least (the floor; see docs)


def long_setting(active_params: int, batch_size: int = 32, seq_len: int = 128,
                 tokens_per_active: float = TOKENS_PER_ACTIVE, sweep_frac: float = 0.2,
                 eval_batches: int = 64) -> dict:
    """The derived numbers of a long run for a model of ``active_params`` active parameters
    (embedding and head included: the stricter count for a byte vocabulary):

        steps         ceil(tokens_per_active * active / (batch_size * seq_len))
        warmup        max(30, ceil(1% of steps))
        ema_alpha     1 / window, window = max(10, round(steps / 50)) steps (MoE-Mamba smooths
                      150K steps with alpha 0.001, a 1,000-step window; with a batch 16x smaller
                      than the paper's, a window of 2% of the run keeps the curve readable)
        sweep_steps   ceil(sweep_frac * steps), with its own warmup by the same rule
        eval_batches  validation batches of batch_size x seq_len at the end (curve points: 1/8 of them)
    """
    tokens_per_step = batch_size * seq_len
    steps = math.ceil(tokens_per_active * active_params / tokens_per_step)
    sweep_steps = math.ceil(sweep_frac * steps)
    window = max(10, round(steps / 50))
    return {"active_params": active_params, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
            "tokens": steps * tokens_per_step, "tokens_per_active": steps * tokens_per_step / active_params,
            "warmup": warmup_steps(steps), "ema_window": window, "ema_alpha": 1 / window,
            "sweep_steps": sweep_steps, "sweep_warmup": warmup_steps(sweep_steps),
            "eval_batches": eval_batches, "curve_eval_batches": max(1, eval_batches // 8)}


def warmup_steps(steps: int) -> int:
    """The long setting's warmup: 1% of the steps, never under 30 (nor over the run)."""
    return min(steps, max(30, math.ceil(0.01 * steps)))


# --- the learning-rate sweep ----------------------------------------------------------------------
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)  # peak learning rates, factor 2, spanning 8x


def lr_grid(text: str) -> list[float]:
    """"1e-3,2e-3,..." -> a log grid (a constant ratio between neighbours, checked)."""
    grid = sorted(float(v) for v in text.split(","))
    if len(grid) < 2:
        raise ValueError("a learning-rate grid needs at least 2 values")
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    if max(ratios) / min(ratios) > 1.01:
        raise ValueError(f"not a log grid (ratios {ratios}): give values with a constant ratio")
    return grid


def _lr(v: float) -> float:
    return float(f"{v:.6g}")  # grid points computed by ratio compare equal to the ones typed


def sweep_lrs(names: list[str], grid: list[float], evaluate, max_extra: int = 3) -> dict[str, dict]:
    """A learning-rate sweep per model, in rounds.

    Round 0 evaluates every (name, lr) of the grid; after each round, a model whose best lr (lowest
    loss) is the lowest or highest it has tried gets one more grid step beyond that edge, up to
    ``max_extra`` steps. ``evaluate([(name, lr), ...])`` returns {(name, lr): loss}: a number, or
    None / {"diverged": True} for a run that diverged, or {"missing": True} for one not run yet (a
    report from a partial cache); such an lr counts as tried, never as best. Returns per name: ``table`` [[lr, loss]] by lr, ``best_lr``, ``best_loss``,
    ``extended`` (the lrs added), ``at_edge`` (the best is still an edge after the last
    extension), ``complete`` (no tried lr is missing: each has a loss or diverged).
    """
    grid = [_lr(v) for v in grid]
    factor = grid[1] / grid[0]
    tried: dict[str, dict[float, float | None]] = {n: {} for n in names}
    missing: dict[str, set] = {n: set() for n in names}
    pending = [(n, lr) for n in names for lr in grid]
    for rnd in range(max_extra + 1):
        got = evaluate(pending) if pending else {}
        for (n, lr), v in got.items():
            tried[n][lr] = v
            if isinstance(v, dict) and v.get("missing"):
                missing[n].add(lr)
        pending = []
        if rnd == max_extra:
            break
        for n in names:
            nxt = _beyond_edge(_losses(tried[n]), factor)
            if nxt is not None and nxt not in tried[n]:
                pending.append((n, nxt))
    out = {}
    for n in names:
        losses = _losses(tried[n])
        known = {lr: v for lr, v in losses.items() if v is not None}
        best = min(known, key=known.get) if known else None
        out[n] = {"grid": grid, "factor": factor, "table": [[lr, losses[lr]] for lr in sorted(losses)],
                  "best_lr": best, "best_loss": known.get(best), "extended": sorted(set(losses) - set(grid)),
                  "at_edge": best is not None and _beyond_edge(losses, factor) is not None,
                  "missing": sorted(missing[n]),
                  "diverged": sorted(lr for lr, v in losses.items() if v is None and lr not in missing[n]),
                  "complete": not missing[n]}
    return out


def sweep_rows(sweep: dict, labels) -> list[list]:
    """Table rows: model, lr, its sweep loss (or why there is none), the best marked."""
    return [[labels(n), lr, v if v is not None else ("not run yet" if lr in s["missing"] else "diverged"),
             "<-" if lr == s["best_lr"] else ""] for n, s in sweep.items() for lr, v in s["table"]]


def _losses(tried: dict) -> dict[float, float | None]:
    """{lr: loss or None}; a loss is a number, or a dict {"missing": True} / {"diverged": True}, or None."""
    return {lr: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for lr, v in tried.items()}


def _beyond_edge(losses: dict[float, float | None], factor: float) -> float | None:
    known = {lr: v for lr, v in losses.items() if v is not None}
    if not known:
        return None
    best = min(known, key=known.get)
    if best == min(losses):
        return _lr(best / factor)
    if best == max(losses):
        return _lr(best * factor)
    return None


# --- running many trainings: in parallel, cached ----------------------------------------------------
def task(config: ModelConfig, folder: Path, *, analyses: tuple[str, ...] = (), threads: int = 1,
         **train_kw) -> dict:
    """A training run as plain data: what ``execute`` runs and what names it in the cache."""
    return {"config": config.to_dict(), "folder": str(folder), "train": train_kw, "analyses": list(analyses),
            "threads": threads}


def task_key(t: dict) -> str:
    import hashlib

    body = {k: v for k, v in t.items() if k != "threads"}  # threads change the speed, not the result
    body["folder"] = os.path.basename(t["folder"].rstrip("/"))
    return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def execute(t: dict) -> dict:
    """Train one task (in this process) and run its analyses on the trained model."""
    torch.set_num_threads(t["threads"])
    config = ModelConfig.from_dict(t["config"])
    folder = Path(t["folder"])
    kw = dict(t["train"])
    try:
        r = train(config, folder, log=None, **kw)
    except Diverged as e:  # a diverged run: a result, not a crash (the sweep counts it as tried); any other error is raised
        return {"config": config.name, "seed": kw["seed"], "lr": kw["lr"], "diverged": True, "error": str(e)}
    model = r.pop("model")
    val = make_val(folder, kw["seq_len"], kw.get("eval_batches", 4), kw["batch_size"], kw.get("val_windows", "random"))
    args = (model, val, kw.get("eval_batches", 4), kw["batch_size"], kw.get("device", "cpu"))
    for name in t["analyses"]:
        r[name] = ANALYSES[name](*args)
    return r


class Runner:
    """Runs tasks ``jobs`` at a time (separate processes, ``threads`` each), keeping each result in
    ``cache_dir/<key>.json`` as it finishes: a run cut off keeps every run it finished, and a rerun
    with the same settings starts from them. ``report_only``: run nothing, return what is cached
    ({"missing": True} for the rest)."""

    def __init__(self, cache_dir: str = "", jobs: int = 1, report_only: bool = False, log=print):
        self.cache_dir, self.jobs, self.report_only, self.log = cache_dir, jobs, report_only, log or (lambda *a: None)
        self.ran = self.cached = self.missing = 0
        self.pool = None
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.cache_dir, f"{key}.json")

    def _load(self, key: str):
        if self.cache_dir and os.path.exists(self._path(key)):
            with open(self._path(key)) as f:
                return json.load(f)["result"]
        return None

    def _save(self, key: str, t: dict, r: dict) -> None:
        if self.cache_dir:
            write_json(self._path(key), {"task": t, "result": r}, quiet=True)

    def run(self, tasks: dict) -> dict:
        """{name: task} -> {name: result}."""
        results, todo = {}, {}
        for name, t in tasks.items():
            key = task_key(t)
            r = self._load(key)
            if r is not None:
                results[name] = r
                self.cached += 1
            elif self.report_only:
                results[name] = {"missing": True}
                self.missing += 1
            else:
                todo[name] = (key, t)
        if not todo:
            return results
        start = time.perf_counter()

        def done(name, key, t, r):
            self._save(key, t, r)
            results[name] = r
            self.ran += 1
            tps = r.get("tokens_per_s")
            self.log(f"  done {name}: " + ("diverged" if r.get("diverged") else
                     f"val {r['final_val_loss']:.4f} +- {r['val_se']:.4f}, {tps:,.0f} tokens/s, "
                     f"{r['train_s']:.0f} s") + f" [{len(results)}/{len(tasks)}, {time.perf_counter() - start:.0f} s]")

        if self.jobs <= 1 or len(todo) == 1:
            for name, (key, t) in todo.items():
                done(name, key, t, execute(t))
        else:
            from concurrent.futures import as_completed

            futs = {self._pool().submit(execute, t): (name, key, t) for name, (key, t) in todo.items()}
            for fut in as_completed(futs):
                name, key, t = futs[fut]
                done(name, key, t, fut.result())
        return results

    def _pool(self):
        """One pool of ``jobs`` spawned workers for the Runner's life (each imports torch once)."""
        if self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def sweep_with(runner: Runner, make_task, names: list[str], grid: list[float], max_extra: int = 3) -> dict:
    """sweep_lrs over ``runner``: ``make_task(name, lr)`` is a short run; its loss the final validation loss."""
    def evaluate(pairs):
        res = runner.run({f"sweep/{n}/lr={lr:g}": make_task(n, lr) for n, lr in pairs})
        return {(n, lr): _sweep_loss(res[f"sweep/{n}/lr={lr:g}"]) for n, lr in pairs}
    return sweep_lrs(names, grid, evaluate, max_extra)


def _sweep_loss(r: dict):
    if r.get("missing"):
        return {"missing": True}
    if r.get("diverged"):
        return {"diverged": True}
    return r["final_val_loss"]


# --- paired differences and the verdict -------------------------------------------------------------
def paired(a: dict, b: dict, key_a=None, key_b=None) -> dict:
    """Per-seed paired differences a - b of the final validation loss, {seed: result} each.

    ``key_a`` / ``key_b``: where a's / b's per-batch losses are (default the run's own ``val_losses``;
    e.g. a path into an analysis, as "routings.sinkhorn"). ``se`` is the standard error of the mean
    per-batch difference (both models scored on the same
    validation batches, so the yardstick's own noise is what remains). Seeds missing from either
    side (unfinished runs) are left out, and ``n`` says how many remain.
    """
    rows = []
    for seed in sorted(set(a) & set(b), key=int):
        ra, rb = a[seed], b[seed]
        if ra.get("missing") or rb.get("missing") or ra.get("diverged") or rb.get("diverged"):
            continue
        la, lb = _dig(ra, key_a)["val_losses"], _dig(rb, key_b)["val_losses"]
        diffs = [x - y for x, y in zip(la, lb)]
        rows.append({"seed": int(seed), "a": statistics.fmean(la), "b": statistics.fmean(lb),
                     "diff": statistics.fmean(la) - statistics.fmean(lb), "se": std_error(diffs)})
    d = [r["diff"] for r in rows]
    return {"per_seed": rows, "n": len(rows), "mean": statistics.fmean(d) if d else None,
            "std": statistics.stdev(d) if len(d) > 1 else (0.0 if d else None)}


def _dig(r: dict, path: str | None) -> dict:
    for k in (path.split(".") if path else []):
        r = r[k]
    return r


def verdict(p: dict, claim_sign: int, z: float = 2.0) -> str:
    """What the per-seed differences say about a claim that a - b has the sign ``claim_sign``.

    "as claimed" or "reversed": every seed's difference has that sign (or the opposite one) and is
    more than ``z`` validation standard errors from 0; "within noise": no seed's is; "mixed": the rest.
    """
    rows = p["per_seed"]
    if not rows:
        return "no finished runs"
    above = [abs(r["diff"]) > z * r["se"] for r in rows]
    signs = [1 if r["diff"] > 0 else -1 for r in rows]
    n = len(rows)
    seeds = f"{n} seed{'s' if n > 1 else ''}"
    if all(above) and all(s == claim_sign for s in signs):
        return f"as claimed, above noise in every seed ({seeds})"
    if all(above) and all(s == -claim_sign for s in signs):
        return f"reversed, above noise in every seed ({seeds})"
    if not any(above):
        return f"within noise ({seeds})"
    return f"mixed: {sum(above)} of {seeds} above noise, signs {signs}"


def paired_table(p: dict, label: str) -> list[list]:
    return [[label, r["seed"], r["a"], r["b"], r["diff"], r["se"], r["diff"] / r["se"] if r["se"] else None]
            for r in p["per_seed"]]


PAIRED_HEADERS = ["comparison (a - b)", "seed", "a val loss", "b val loss", "a - b", "val SE of a - b", "z"]


# --- routing and specialisation analyses -----------------------------------------------------------
@torch.no_grad()
def evaluate_routings(model: Model, val, batches: int, batch_size: int, device: str = "cpu") -> dict:
    """A Sinkhorn-trained model under both routings, on the same validation batches: per routing,
    ``val_losses`` / ``val_loss`` / ``val_se`` and ``load`` (tokens per expert per MoE layer); and
    ``disagreement`` per layer, the share of tokens whose argmax expert differs from the Sinkhorn
    choice (on the argmax routing's forward, so each layer sees the input that routing gives it)."""
    out = {}
    for routing in ("argmax", "sinkhorn"):
        counts, shares = None, []
        layers = moe_layers(model)

        def hook(module, inputs, output, _shares=shares):
            arg, sink = choices(module, inputs[0])
            _shares.append((arg != sink).float().mean().item())

        handles = [m.register_forward_hook(hook) for m in layers] if routing == "argmax" else []
        model.train(routing == "sinkhorn")
        losses = []
        for i in range(batches):
            x, y = val.get(i, batch_size)
            res = model(x.to(device))
            losses.append(F.cross_entropy(res.logits.float().flatten(0, 1), y.to(device).flatten()).item())
            c = torch.stack([s.tokens_per_expert.cpu() for s in res.router_stats])
            counts = c if counts is None else counts + c
        for h in handles:
            h.remove()
        model.eval()
        out[routing] = {"val_losses": losses, "val_loss": statistics.fmean(losses), "val_se": std_error(losses),
                        "load": counts.tolist(), "imbalance": [imbalance(layer) for layer in counts.tolist()]}
        if routing == "argmax":
            n = len(layers)
            out["disagreement"] = [statistics.fmean(shares[j::n]) for j in range(n)]
    return out


BYTE_CLASSES = ("letters", "digits", "whitespace", "punctuation", "other")


def byte_class(b: int) -> int:
    import string

    ch = chr(b)
    if b < 128 and ch.isalpha():
        return 0
    if b < 128 and ch.isdigit():
        return 1
    if ch in " \t\n\r\x0b\x0c":
        return 2
    if ch in string.punctuation:
        return 3
    return 4


@torch.no_grad()
def specialisation(model: Model, val, batches: int, batch_size: int, device: str = "cpu", top: int = 5,
                   min_count: int = 20) -> dict:
    """What each expert takes, per MoE layer, at inference (the router's argmax, top-1), on the
    validation windows; a token is the byte the layer reads at that position.

    Per layer: ``counts`` [expert][byte] (256 bytes); ``class_share`` [expert][class] (BYTE_CLASSES,
    rows sum to 1), and the same for all tokens (``overall_class_share``); ``top_bytes`` [expert]:
    the ``top`` bytes with the highest lift P(byte | expert) / P(byte) among those it took at least
    ``min_count`` times, as [byte, lift, count]; ``mi_class_bits`` and ``mi_byte_bits``: the mutual
    information between the expert and the byte's class / the byte itself, and ``h_expert_bits``
    the expert's entropy (its upper bound for the byte: a fully byte-determined routing).
    """
    model.eval()
    layers = moe_layers(model)
    E = layers[0].config.n_experts if layers else 0
    counts = [torch.zeros(E, 256, dtype=torch.int64) for _ in layers]
    current = {}

    def make_hook(j):
        def hook(module, inputs, output):
            arg, _ = (module.router_logits(inputs[0].reshape(-1, inputs[0].shape[-1])).argmax(-1), None)
            idx = arg.cpu() * 256 + current["bytes"]
            counts[j].view(-1).scatter_add_(0, idx, torch.ones_like(idx))
        return hook

    handles = [m.register_forward_hook(make_hook(j)) for j, m in enumerate(layers)]
    for i in range(batches):
        x, _ = val.get(i, batch_size)
        current["bytes"] = x.reshape(-1)
        model(x.to(device))
    for h in handles:
        h.remove()
    cls = torch.tensor([byte_class(b) for b in range(256)])
    out = []
    for c in counts:
        cf = c.double()
        total = cf.sum()
        p_byte = cf.sum(0) / total
        by_class = torch.zeros(E, len(BYTE_CLASSES), dtype=torch.float64).index_add_(1, cls, cf)
        p_e = cf.sum(1) / total
        top_bytes = []
        for e in range(E):
            n_e = cf[e].sum()
            if n_e == 0:
                top_bytes.append([])
                continue
            lift = torch.where((cf[e] >= min_count) & (p_byte > 0), (cf[e] / n_e) / p_byte.clamp_min(1e-30),
                               torch.zeros_like(p_byte))
            order = lift.argsort(descending=True)[:top]
            top_bytes.append([[int(b), float(lift[b]), int(c[e, b])] for b in order if lift[b] > 0])
        out.append({"counts": c.tolist(), "expert_share": p_e.tolist(),
                    "class_share": (by_class / by_class.sum(1, keepdim=True).clamp_min(1)).tolist(),
                    "overall_class_share": (by_class.sum(0) / total).tolist(),
                    "top_bytes": top_bytes, "mi_class_bits": _mi(by_class), "mi_byte_bits": _mi(cf),
                    "h_expert_bits": _entropy(p_e)})
    return {"classes": list(BYTE_CLASSES), "layers": out}


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def _mi(joint: torch.Tensor) -> float:
    """Mutual information (bits) of a joint count table."""
    p = joint / joint.sum()
    return _entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p.flatten())


def specialisation_rows(spec: dict, model_label: str) -> list[list]:
    """Table rows: model, layer, expert, its share of tokens, share per class, top bytes by lift."""
    rows = []
    for j, layer in enumerate(spec["layers"]):
        for e, shares in enumerate(layer["class_share"]):
            tops = " ".join(f"{chr(b)!r}:{lift:.1f}" for b, lift, _ in layer["top_bytes"][e][:3])
            rows.append([model_label, j, e, layer["expert_share"][e], *shares, tops])
    return rows


def specialisation_depth_rows(spec: dict, model_label: str) -> list[list]:
    return [[model_label, j, layer["mi_class_bits"], layer["mi_byte_bits"], layer["h_expert_bits"]]
            for j, layer in enumerate(spec["layers"])]


def draw_specialisation(plt, specs: dict[str, dict]):
    """One heat map per model: rows (MoE layer, expert), columns the byte classes, share of the expert's tokens."""
    fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 6), squeeze=False)
    for ax, (label, spec) in zip(axes[0], specs.items()):
        rows, names = [], []
        for j, layer in enumerate(spec["layers"]):
            rows.append(layer["overall_class_share"])
            names.append(f"L{j} all")
            for e, shares in enumerate(layer["class_share"]):
                rows.append(shares)
                names.append(f"L{j} e{e} ({100 * layer['expert_share'][e]:.0f}%)")
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(spec["classes"])), spec["classes"], rotation=30, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=5 if len(names) > 40 else 7)
        ax.set_title(f"{label}: byte classes per expert", fontsize=9)
    fig.colorbar(im, ax=axes[0, -1], shrink=0.6, label="share of the expert's tokens")
    return fig


ANALYSES = {"routings": evaluate_routings, "specialisation": specialisation}


def cfg_name(config: ModelConfig, name: str) -> ModelConfig:
    config.name = name
    return config


# --- command line and output ----------------------------------------------------------------------
def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds (what the tests run)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--png", default="", help="draw the figure here (needs matplotlib: pip install -e '.[plots]')")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1: small models gain little from more, and a shared machine's "
                        "other jobs stall a multi-threaded op on its slowest thread)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="wall: elapsed time; cpu: CPU seconds of this process (with --threads 1, the time it "
                        "would take on an idle core, whatever else runs on a shared machine); auto: cpu on CPU")
    return p


def timer(args) -> callable:
    """The clock the timings use: time.process_time for --clock cpu (or auto on a CPU device), else perf_counter."""
    kind = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" else "wall")
    args.clock = kind
    return time.process_time if kind == "cpu" else time.perf_counter


def add_model_args(p: argparse.ArgumentParser, d_model: int = 64, n_layer: int = 4, n_experts: int = 8,
                   n_layer_help: str | None = None) -> None:
    """The size of the Mamba+MoE model; the other models are matched to its active parameters."""
    p.add_argument("--d_model", type=int, default=d_model)
    p.add_argument("--n_layer", type=int, default=n_layer, help=n_layer_help)
    p.add_argument("--n_experts", type=int, default=n_experts)
    p.add_argument("--d_expert", type=int, default=None, help="default: the width matching the dense Mamba")


def add_training_args(p: argparse.ArgumentParser, steps: int, seeds: str, steps_help: str | None = None,
                      lr_help: str | None = None) -> None:
    """Batch, schedule length, learning rate, seeds and evaluation size of a training comparison."""
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--lr", type=float, default=None,
                   help=lr_help or "one peak LR for every model (default: each model's best from the sweep)")
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--scale", default="default", choices=["default", "long"],
                   help="default: the short runs above; long: >= 50 training tokens per active parameter, "
                        "batch 32 x 128, warmup max(30, 1%%), 64 validation batches on a larger held-out "
                        "split, 3 seeds (common.long_setting)")
    p.add_argument("--lr_grid", default=",".join(f"{v:g}" for v in LR_GRID),
                   help="the sweep's log grid of peak LRs (extended by one step while the best is at an edge)")
    p.add_argument("--sweep_steps", type=int, default=None,
                   help="steps of a sweep run (default: half of --steps; long: 20%% of the run)")
    p.add_argument("--max_extra", type=int, default=3, help="grid steps the sweep may add beyond an edge")
    p.add_argument("--tokens_per_active", type=float, default=TOKENS_PER_ACTIVE, help="long setting's budget")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side, --threads each (default 1; long: 2, one per core)")
    p.add_argument("--cache", default=None,
                   help="keep each finished run here and reuse it (default: none; long: out/cache/<script>-long)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: report from the runs in --cache (a partial report while a long job runs)")
    p.add_argument("--plan", action="store_true",
                   help="print the derived numbers and a time estimate from a few measured steps, then stop")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="local text file or folder (default: the Python stdlib's sources)")
    p.add_argument("--data_cache", default="data_cache", help="where the tokenized corpus is cached")


def machine() -> dict:
    import platform

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


class Transcript:
    """What a benchmark prints, line by line, kept so its JSON holds the table verbatim (the pages quote it)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def write_benchmark_json(path: str, script: str, args, say: Transcript, drop=("out",), **results) -> None:
    """A kernel benchmark's JSON: the command that ran, the machine and its load, the settings, the
    results and the printed output."""
    write_json(path, {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
                      "machine": {**machine(), "load_average": os.getloadavg()},
                      "settings": {k: v for k, v in vars(args).items() if k not in drop},
                      **results, "output": say.text})


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats to 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, obj: dict, quiet: bool = False) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file renamed into place)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def plot(path: str, draw) -> bool:
    """Call ``draw(plt)`` and save the current figure to ``path``; skip (one line) without matplotlib."""
    if not path:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[plots]')")
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig = draw(plt)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return True


def settle_scale(args, script: str, active_params: int) -> dict:
    """Fill in what --scale implies; return the setting (the long one's derived numbers, or the default's)."""
    if args.scale == "long":
        if not args.quick:
            args.batch_size, args.seq_len = max(args.batch_size, 32), max(args.seq_len, 128)
        eval_batches = args.eval_batches if args.quick else max(64, args.eval_batches)
        setting = long_setting(active_params, args.batch_size, args.seq_len, args.tokens_per_active,
                               eval_batches=eval_batches)
        if args.sweep_steps:
            setting["sweep_steps"], setting["sweep_warmup"] = args.sweep_steps, warmup_steps(args.sweep_steps)
        args.steps, args.eval_batches = setting["steps"], setting["eval_batches"]
        setting.update(val_every=10, val_windows="strided")
        args.jobs = args.jobs or 2
        if args.cache is None:
            args.cache = os.path.join("out", "cache", f"{script}-long")
    else:
        sweep = args.sweep_steps or max(1, args.steps // 2)
        setting = {"active_params": active_params, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "steps": args.steps, "tokens": args.steps * args.batch_size * args.seq_len,
                   "tokens_per_active": args.steps * args.batch_size * args.seq_len / active_params,
                   "warmup": max(1, int(0.01 * args.steps)), "sweep_steps": sweep,
                   "sweep_warmup": max(1, int(0.01 * sweep)), "eval_batches": args.eval_batches,
                   "curve_eval_batches": args.eval_batches, "val_every": 100, "val_windows": "random"}
        args.jobs = args.jobs or 1
        args.cache = args.cache or ""
    return setting


def train_kw(args, setting: dict, seed: int, lr: float, sweep: bool = False, steps: int | None = None,
             **extra) -> dict:
    """The keyword arguments of ``train`` for one run of the setting (a sweep run when ``sweep``);
    ``steps`` replaces the setting's (its warmup follows the setting's rule)."""
    if steps is None:
        steps = setting["sweep_steps"] if sweep else setting["steps"]
        warmup = setting["sweep_warmup"] if sweep else setting["warmup"]
    else:
        warmup = warmup_steps(steps) if args.scale == "long" else max(1, int(0.01 * steps))
    kw = dict(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=_lr(lr), seed=seed,
              device=args.device, eval_batches=setting["eval_batches"], warmup=warmup,
              curve_eval_batches=setting["curve_eval_batches"], val_windows=setting["val_windows"],
              eval_every=0 if sweep else max(1, steps // 8))
    kw.update(extra)
    return kw


def measure_tokens_per_s(configs: dict, folder: Path, args, steps: int = 4) -> dict[str, float]:
    """Tokens/s of a few training steps of each model (one process, --threads threads), after one warm-up step."""
    torch.set_num_threads(args.threads)
    out = {}
    for name, cfg in configs.items():
        tr = Trainer(cfg, 1e-3, 0, args.device)
        data = Batches(folder, "train", args.seq_len, 0)
        tr.step(*data.get(0, args.batch_size), 1e-3)
        t0 = time.perf_counter()
        for s in range(steps):
            tr.step(*data.get(s + 1, args.batch_size), 1e-3)
        out[name] = steps * args.batch_size * args.seq_len / (time.perf_counter() - t0)
    return out


def plan_estimate(runs: list[tuple[str, int]], tokens_per_s: dict[str, float], tokens_per_step: int,
                  jobs: int, parallel_efficiency: float = 1.0) -> dict:
    """Seconds to train ``runs`` [(model, steps)] at the measured one-process speeds, ``jobs`` side by
    side at ``parallel_efficiency`` (the throughput of jobs processes over jobs x one process)."""
    serial = sum(steps * tokens_per_step / tokens_per_s[m] for m, steps in runs)
    return {"runs": len(runs), "serial_s": serial, "jobs": jobs, "parallel_efficiency": parallel_efficiency,
            "estimate_s": serial / (jobs * parallel_efficiency)}


def _measure_worker(payload):
    configs, folder, args_dict, threads = payload
    args = argparse.Namespace(**{**args_dict, "threads": threads})
    return measure_tokens_per_s({k: ModelConfig.from_dict(v) for k, v in configs.items()}, Path(folder), args)


def measure_parallelism(config: ModelConfig, folder: Path, args, jobs: int = 2) -> dict:
    """Tokens/s of one model three ways: one process on one thread, one process on ``jobs`` threads,
    and ``jobs`` one-thread processes side by side (their sum): which uses the cores better."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    payload = ({"m": config.to_dict()}, str(folder),
               {"seq_len": args.seq_len, "batch_size": args.batch_size, "device": args.device}, 1)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        one = pool.submit(_measure_worker, payload).result()["m"]
        threaded = pool.submit(_measure_worker, payload[:3] + (jobs,)).result()["m"]
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        side = [f.result()["m"] for f in [pool.submit(_measure_worker, payload) for _ in range(jobs)]]
    return {"one_thread_tokens_per_s": one, f"{jobs}_threads_tokens_per_s": threaded,
            f"{jobs}x1_thread_tokens_per_s": sum(side), "parallel_efficiency": sum(side) / (jobs * one),
            "best": "side by side" if sum(side) > threaded else "threads"}


def run_plan(configs: dict, folder: Path, args, runs: list[tuple[str, int]], tokens_per_step: int, setting: dict,
             headers: list[str], row) -> dict:
    """--plan: each model's tokens/s on one thread, the side-by-side efficiency of ``args.jobs`` runs,
    and the time ``runs`` ((model, steps) pairs) would take; printed, and returned for the JSON.
    ``row(name)`` gives a model's cells under ``headers``; its tokens/s is added after them."""
    tps = measure_tokens_per_s(configs, folder, args, steps=2 if args.quick else 4)
    par = measure_parallelism(configs["mamba_moe"], folder, args, args.jobs) if args.jobs > 1 else None
    eff = par["parallel_efficiency"] if par else 1.0
    plan = {"tokens_per_s_one_thread": tps, "parallelism": par,
            **plan_estimate(runs, tps, tokens_per_step, args.jobs, eff)}
    print(table(["setting", "value"], [[k, v] for k, v in setting.items()]))
    print(table([*headers, "tokens/s (1 thread)"], [[*row(n), tps[n]] for n in configs]))
    if par:
        print(table(["one model, tokens/s", "value"], [[k, v] for k, v in par.items()]))
    print(f"\n{plan['runs']} runs (sweep extensions not counted): {plan['serial_s'] / 3600:.2f} h on one thread, "
          f"about {plan['estimate_s'] / 3600:.2f} h with {args.jobs} side by side")
    return plan
