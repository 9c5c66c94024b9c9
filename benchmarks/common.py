"""What the benchmark and reproduction scripts share: models at equal active parameters, a small
training loop on the embedded corpus, and the table / JSON / PNG output.

    equal_active_configs(...)   the four models of the papers' comparisons, sized to one active count
    Trainer / train(...)        AdamW, warmup + cosine, grad clip: MoE-Mamba's recipe (paper §4.1)
    evaluate(...)               mean validation cross-entropy on fixed windows
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
def prepare(data: str = "", cache_dir: str = "data_cache") -> Path:
    """The byte-tokenized corpus folder (the stdlib's sources unless ``data`` names local text)."""
    return prepare_data(ByteTokenizer(), "bytes", data=data, cache_dir=cache_dir, log=lambda *a: None)


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
def evaluate(model: Model, val: Batches, batches: int, batch_size: int, device: str = "cpu") -> float:
    """Mean cross-entropy (nats per byte) over the same ``batches`` validation windows every call."""
    model.eval()
    losses = []
    for i in range(batches):
        x, y = val.get(i, batch_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(x.to(device)).logits
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    return statistics.fmean(losses)


def train(config: ModelConfig, folder: Path, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
          device: str = "cpu", eval_every: int = 0, eval_batches: int = 4, warmup_frac: float = 0.01,
          stats_from: float = 0.8, log=print) -> dict:
    """Train ``config`` from scratch; return its curves, final validation loss and routing statistics.

    Routing statistics are summed over the steps after ``stats_from * steps`` (training mode: the
    router's choices as trained, Sinkhorn included). Data order depends only on ``seed``, so two
    configs trained with the same seed see the same windows.
    """
    trainer = Trainer(config, lr, seed, device)
    train_data = Batches(folder, "train", seq_len, seed)
    val = Batches(folder, "val", seq_len, seed=10_000)
    warmup = max(1, int(warmup_frac * steps))
    losses, val_curve = [], []
    n_moe = sum(k == "moe" for k in config.layer_kinds)
    load = torch.zeros(n_moe, config.n_experts, dtype=torch.int64)
    dropped = slots = iters = iter_calls = 0
    start = time.perf_counter()
    for step in range(steps):
        x, y = train_data.get(step, batch_size)
        loss, out = trainer.step(x, y, lr_at(step, steps, lr, warmup))
        if not math.isfinite(loss):
            raise RuntimeError(f"{config.name}: loss is {loss} at step {step}; lower the learning rate.")
        losses.append(loss)
        if step >= stats_from * steps and out.router_stats:
            load += torch.stack([s.tokens_per_expert.cpu() for s in out.router_stats])
            dropped += sum(int(s.dropped) for s in out.router_stats)
            slots += sum(int(s.tokens_per_expert.sum()) + int(s.dropped) for s in out.router_stats)
            iters += sum(int(s.sinkhorn_iters) for s in out.router_stats)
            iter_calls += len(out.router_stats)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            val_curve.append((step + 1, evaluate(trainer.model, val, eval_batches, batch_size, device)))
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"  {config.name} seed {seed} step {step + 1}/{steps} loss {loss:.4f} "
                f"({time.perf_counter() - start:.0f}s)")
    train_s = time.perf_counter() - start
    final_val = evaluate(trainer.model, val, eval_batches, batch_size, device)
    val_curve.append((steps, final_val))
    return {"config": config.name, "seed": seed, "steps": steps, "tokens": steps * batch_size * seq_len,
            "lr": lr, "train_loss": losses, "val_curve": val_curve, "final_val_loss": final_val,
            "train_s": train_s, "load": load.tolist(), "dropped_frac": dropped / slots if slots else 0.0,
            "sinkhorn_iters_mean": iters / iter_calls if iter_calls else 0.0, "model": trainer.model}


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
    p.add_argument("--lr", type=float, default=2e-3, help=lr_help)
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--eval_batches", type=int, default=8)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="local text file or folder (default: the Python stdlib's sources)")
    p.add_argument("--data_cache", default="data_cache", help="where the tokenized corpus is cached")


def machine() -> dict:
    import platform

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats to 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, obj: dict) -> None:
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
