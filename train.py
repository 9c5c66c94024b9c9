"""Train a Mamba + Mixture-of-Experts language model: any preset, one CPU to many GPUs, exact resume.

    python train.py                                   # tiny preset, Python stdlib sources, bytes; no network
    python train.py --max_steps=1000 --d_model=256    # any setting (--help), and any ModelConfig field
    python train.py my_run.toml --lr=1e-3             # settings from a TOML/JSON file, then the command line
    python train.py --preset=moe-mamba-25m --dataset=allenai/c4 --dataset_config=en   # streamed from the hub
    python train.py --resume                          # continue the run in out_dir exactly where it stopped
    torchrun --nproc_per_node=8 train.py --preset=blackmamba-1.5b --fsdp ...          # DDP, or FSDP2 with --fsdp
    python train.py --preset=blackmamba-2.8b --plan --nproc=8  # memory per GPU, FLOPs, time per step; allocates nothing
    python train.py --help                            # every setting with its default (--preset=NAME: that preset's)

Writes into out_dir: model.safetensors + config.json (what sample.py reads), train_state.pt (optimizer,
step, RNG, settings: what --resume reads) and metrics.jsonl (one JSON record per step / evaluation).
With --fsdp under torchrun, the training state is sharded/ instead (torch.distributed.checkpoint: each
process writes its shard; --resume reads it onto any number of processes), and model.safetensors is
written at the end a tensor at a time (or at any time by `python -m minimamba_moe.run.distributed export`).
The settings are defined, typed and range-checked once, in minimamba_moe/run/settings.py.

Errors print one line on stderr (--debug: the traceback) and exit with 2 for a bad setting, 1 for
anything else. Nothing in out_dir changes before the settings are checked; a step whose loss or
gradient norm is nan/inf stops the run (--on_nonfinite=skip skips it) and is never checkpointed.
"""

import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from minimamba_moe import Model
from minimamba_moe.run.checkpoint import (CONFIG, TRAIN_STATE, WEIGHTS, CheckpointError, atomic_write, config_text,
                                          file_digest, load_train_state, load_weights, read_config,
                                          recover_interrupted_save, save_checkpoint)
from minimamba_moe.config import PRESETS, ConfigError
from minimamba_moe.run.cli import run_main, set_threads
from minimamba_moe.run.data import Batches, DataError, prepare_data
from minimamba_moe.run.distributed import (SHARDED, build_model, device_mesh, export_weights, load_full_weights,
                                           load_sharded, read_state, save_sharded)
from minimamba_moe.run.memory import MemoryCheckError, check_fits, n_params, training_memory
from minimamba_moe.run.plan import format_plan, make_plan, mfu
from minimamba_moe.run.settings import (DEFAULT_OUT_DIR, TrainSettings, UsageError, check_seq_len, help_text, merge,
                                        model_config, read_given)
from minimamba_moe.run.tokenizer import TokenizerError, load_tokenizer

# FSDP2 warns that the logits are a view (the padded vocab is sliced off); nothing here modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is nan or inf."""


USAGE_ERRORS = (UsageError,)
ERRORS = (UsageError, ConfigError, DataError, TokenizerError, CheckpointError, MemoryCheckError, NonFiniteError)
TRAIN_STATE_KEYS = ("optimizer", "settings", "rng_cpu", "step")


class Processes(NamedTuple):
    distributed: bool
    rank: int
    world: int
    dev: str  # this process's device: cpu, cuda:0, ...
    device_type: str  # cpu | cuda

    @property
    def master(self):
        return self.rank == 0


# --- settings, processes, the run's folder ------------------------------------------------------------
def read_saved_run(out_dir):
    """The training state in out_dir (after undoing an interrupted save) and its settings dict."""
    recover_interrupted_save(out_dir)  # before anything reads the folder
    sharded = (out_dir / SHARDED / ".metadata").is_file()  # an FSDP run's: step and settings beside its DCP files
    state = read_state(out_dir / SHARDED) if sharded else load_train_state(out_dir, required=TRAIN_STATE_KEYS)
    try:
        saved = json.loads(state["settings"])
        assert isinstance(saved, dict)
    except (TypeError, ValueError, KeyError, AssertionError):
        where = SHARDED + "/state.json" if sharded else "train_state.pt"
        raise CheckpointError(f"{out_dir}/{where} holds no readable settings: it is damaged.") from None
    return state, saved


def start_processes(s: TrainSettings) -> Processes:
    """One process, or one per device under torchrun (NCCL on GPUs, gloo on CPUs)."""
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={s.device}: no CUDA GPU is available here; use --device=cpu (or auto)")
    dev = s.device if s.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        if dev.startswith("cuda"):
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
    try:
        torch.empty(0, device=dev)  # e.g. mps in a build without it, or cuda:7 on a machine with one GPU
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device={s.device} is not available here ({str(e).strip().splitlines()[0]}); "
                         "use --device=cpu, cuda or auto") from None
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    return Processes(distributed, rank, world, dev, "cuda" if dev.startswith("cuda") else "cpu")


def on_rank0(fn, procs: Processes):
    """fn() on rank 0 only; if it fails, every process raises its error (so none waits for it forever)."""
    result, error = None, None
    if procs.master:
        try:
            result = fn()
        except ERRORS as e:
            error = e
    if procs.distributed:
        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)  # a class name and a message, from our own rank 0
        if box[0] is not None:
            raise {c.__name__: c for c in ERRORS}[box[0][0]](box[0][1])
    elif error is not None:
        raise error
    return result


def check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write_test").write_text("")
        (out_dir / ".write_test").unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out_dir={out_dir} ({e.strerror}): choose a folder you can write to")
    for name in ("metrics.jsonl", WEIGHTS, "config.json", "train_state.pt"):
        if (out_dir / name).is_dir():
            raise UsageError(f"{out_dir / name} is a folder, where this run writes a file: choose another --out_dir")
    recover_interrupted_save(out_dir)


# --- the model ---------------------------------------------------------------------------------------
def choose_model_config(s: TrainSettings, model_overrides: dict, tok, out_dir: Path):
    """The preset with its overrides, or on --resume the checkpoint's own config (overrides must agree)."""
    if not s.resume:
        if tok.vocab_size > PRESETS[s.preset]["vocab_size"] and "vocab_size" not in model_overrides:
            model_overrides = {**model_overrides, "vocab_size": tok.vocab_size}  # e.g. --tokenizer=gpt2 on tiny
        return model_config(s, model_overrides)
    config, _ = read_config(out_dir)
    saved = {"preset": config.name, **config.to_dict()}
    for k, v in {"preset": s.preset, **model_overrides}.items():
        if k != "backend" and saved[k] != (list(v) if isinstance(v, tuple) else v):
            raise CheckpointError(f"--{k}={v} does not match the checkpoint in {out_dir} ({k}={saved[k]!r}): "
                                  "a run resumes with its own model; drop the setting or use a fresh --out_dir")
    config.backend = model_overrides.get("backend", config.backend)
    check_seq_len(s, config)
    return config


def check_memory(s: TrainSettings, config, procs: Processes) -> None:
    """Refuse (one line) a run whose parameters, gradients, AdamW state and logits cannot fit."""
    shards = procs.world if s.fsdp else 1
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if procs.device_type == "cpu" else 1  # processes on one RAM
    check_fits(training_memory(config, s.batch_size, s.seq_len, shards), procs.dev, processes=sharing,
               lower="lower --batch_size (raise --grad_accum to keep the batch) or --seq_len, or choose a smaller "
                     "model; --check_memory=false tries anyway")


def build(config, s: TrainSettings, procs: Processes, bf16: bool):
    """(the model on its device, the names of its no-decay parameters). Under --fsdp with several processes
    it is built on the meta device and sharded layer by layer, and each process allocates and initialises
    only its shard; the weights are those of ``torch.manual_seed(seed); Model(config)`` either way."""
    with torch.device("meta"):
        no_decay = no_decay_names(Model(config))  # (FSDP drops the _no_weight_decay mark)
    mesh = device_mesh(procs.device_type) if procs.distributed and s.fsdp else None
    return build_model(config, s.seed, procs.dev, mesh, bf16=bf16,
                       activation_checkpointing=s.activation_checkpointing), no_decay


def distribute(raw_model, s: TrainSettings, procs: Processes):
    """The model as the loop calls it: DDP-wrapped (FSDP2 shards it in ``build``) or as is; compiled if asked."""
    model = raw_model
    if procs.distributed and not s.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[procs.dev] if procs.device_type == "cuda" else None)
    return torch.compile(model) if s.compile else model


def show_plan(s: TrainSettings, model_overrides: dict, out_dir: Path) -> None:
    """--plan: the run's sizes, memory per GPU, FLOPs and time per step, for --nproc processes (GPUs, bf16)."""
    config = read_config(out_dir)[0] if s.resume else model_config(s, model_overrides)
    nproc = s.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    print(format_plan(make_plan(config, s.batch_size, s.seq_len, s.grad_accum, nproc, fsdp=s.fsdp,
                                bf16=s.dtype != "float32", activation_checkpointing=s.activation_checkpointing,
                                peak_tflops=s.peak_tflops, mfu=s.mfu)))


def no_decay_names(model) -> set[str]:
    """1-D tensors (norms, biases, D, dt bias) and A_log (marked _no_weight_decay): read before FSDP
    replaces the parameters (and drops that mark)."""
    return {n for n, p in model.named_parameters() if p.ndim < 2 or getattr(p, "_no_weight_decay", False)}


# --8<-- [start:param_groups]
def param_groups(model, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on the ``no_decay`` parameters (docs/paper-facts.md,
    "Initialization": A_log, D and biases are not decayed)."""
    no_decay = no_decay_names(model) if no_decay is None else no_decay
    params = dict(model.named_parameters())
    return [{"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0}]
# --8<-- [end:param_groups]


def resume_from(out_dir: Path, state: dict, raw_model, optimizer, s: TrainSettings, procs: Processes) -> int:
    """Load the saved run into the model and optimizer (sharded or not, either way); return its step."""
    if (out_dir / SHARDED / ".metadata").is_file():  # an FSDP run's, written by any number of processes
        return load_sharded(out_dir / SHARDED, raw_model, optimizer)["step"]
    # a whole-model checkpoint; under FSDP each process reads it a tensor at a time and keeps its rows
    (load_full_weights if procs.distributed and s.fsdp else load_weights)(raw_model, out_dir / WEIGHTS)
    return restore(state, raw_model, optimizer, procs.device_type)


def restore(state: dict, raw_model, optimizer, device_type: str) -> int:
    """Load the optimizer and RNG states of a saved run; return its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    try:
        set_optimizer_state_dict(raw_model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(state["rng_cpu"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the optimizer state in train_state.pt does not fit this model ({type(e).__name__}).") from None
    if device_type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])
    return int(state["step"])


def prepare(tok, tok_spec: str, s: TrainSettings, log) -> Path:
    """The tokenized corpus's folder in data_cache (tokenized now if it is not there yet)."""
    return prepare_data(tok, tok_spec, s.data, s.dataset, s.dataset_config, s.text_field, s.data_cache, s.val_every,
                        s.max_data_tokens, log=log)


# --- one step, evaluation, checkpoints, metrics ------------------------------------------------------
# --8<-- [start:lr_at]
def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup for warmup_frac of the schedule, then cosine from lr down to lr * min_lr_ratio."""
    total = s.decay_steps or s.max_steps
    warmup = max(1, round(s.warmup_frac * total))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = s.lr * s.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - floor)
# --8<-- [end:lr_at]


# --8<-- [start:compute_loss]
def compute_loss(model, x, y, dev, autocast):
    with autocast:
        out = model(x.to(dev))
    return F.cross_entropy(out.logits.float().flatten(0, 1), y.to(dev).flatten()), out
# --8<-- [end:compute_loss]


@torch.no_grad()
def evaluate(model, val_data: Batches, s: TrainSettings, procs: Processes, autocast) -> float:
    model.eval()
    losses = [compute_loss(model, *val_data.get(i, s.batch_size, 0, 1, procs.rank, procs.world), procs.dev, autocast)[0]
              for i in range(s.eval_batches)]
    model.train()
    loss = torch.stack(losses).mean()
    if procs.distributed:  # SUM, then divide: gloo has no ReduceOp.AVG in torch 2.6 and 2.7
        dist.all_reduce(loss)
        loss /= procs.world
    return loss.item()


# --8<-- [start:train_step]
def train_step(model, raw_model, optimizer, data: Batches, step: int, s: TrainSettings, procs: Processes, autocast):
    """One optimizer step over grad_accum micro-batches: (its metrics record, whether the step was taken).

    A step whose loss or gradient norm is not finite is not taken (the gradients are dropped)."""
    lr = lr_at(step, s)
    for group in optimizer.param_groups:
        group["lr"] = lr
    k, dev = s.grad_accum, procs.dev
    loss, aux, routing = 0.0, 0.0, None
    # Sinkhorn routing balances each process's micro-batch (as BlackMamba does per device), so with
    # the sinkhorn router, splitting a batch over micro-batches or processes changes the routing a little.
    for micro in range(k):
        last = micro == k - 1  # gradients are averaged over processes only after the last micro-batch
        if procs.distributed and s.fsdp:
            raw_model.set_requires_gradient_sync(last)
        with model.no_sync() if procs.distributed and not s.fsdp and not last else nullcontext():
            ce, out = compute_loss(model, *data.get(step, s.batch_size, micro, k, procs.rank, procs.world), dev, autocast)
            ((ce + out.aux_loss) / k).backward()
        loss, aux = loss + ce.detach() / k, aux + out.aux_loss.detach() / k
        if out.router_stats:  # (layers, experts) token counts, (layers,) dropped, (layers,) Sinkhorn passes
            stats = [torch.stack([getattr(r, f) for r in out.router_stats]) for f in ("tokens_per_expert", "dropped")]
            iters = torch.stack([r.sinkhorn_iters for r in out.router_stats])
            routing = [*stats, iters] if routing is None else [routing[0] + stats[0], routing[1] + stats[1],
                                                                torch.maximum(routing[2], iters)]
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), s.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    means = torch.stack([torch.as_tensor(v, device=dev).float() for v in (loss, aux)])
    if procs.distributed:  # the global batch's mean loss, and every process's routing counts
        dist.all_reduce(means)  # SUM, then divide: gloo has no ReduceOp.AVG in torch 2.6 and 2.7
        means /= procs.world
        for t, op in zip(routing or [], (dist.ReduceOp.SUM, dist.ReduceOp.SUM, dist.ReduceOp.MAX)):
            dist.all_reduce(t, op=op)
    (loss, aux), grad_norm = means.tolist(), grad_norm.item()
    record = dict(step=step + 1, loss=loss, aux_loss=aux, lr=lr, grad_norm=grad_norm)
    if routing is not None:
        record.update(tokens_per_expert=routing[0].tolist(), dropped=routing[1].tolist(), sinkhorn_iters=routing[2].tolist())
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return record, finite
# --8<-- [end:train_step]


def save(out_dir: Path, raw_model, optimizer, config, s: TrainSettings, model_overrides: dict, tok_spec: str,
         step: int, procs: Processes, last: bool) -> None:
    """The checkpoint of `step`: sharded under FSDP (see save_sharded_run), else written whole by rank 0."""
    settings = json.dumps({**vars(s), "resume": False, "model": {**model_overrides}})
    if procs.distributed and s.fsdp:
        return save_sharded_run(out_dir, raw_model, optimizer, config, settings, tok_spec, step, procs, last)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(raw_model, options=full)
    osd = get_optimizer_state_dict(raw_model, optimizer, options=full)
    if procs.master:
        state = {"optimizer": osd, "settings": settings, "rng_cpu": torch.get_rng_state()}
        if procs.device_type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(out_dir, sd, config, state, tokenizer=tok_spec, step=step)
        shutil.rmtree(out_dir / SHARDED, ignore_errors=True)  # an older sharded state must not be resumed
    if procs.distributed:
        dist.barrier()


def save_sharded_run(out_dir: Path, raw_model, optimizer, config, settings: str, tok_spec: str, step: int,
                     procs: Processes, last: bool) -> None:
    """Each process writes its shard of the model and AdamW state into out_dir/sharded (DCP), rank 0
    state.json and config.json; model.safetensors only at the end (``last``), a tensor at a time."""
    save_sharded(out_dir / SHARDED, raw_model, optimizer, {"step": step, "settings": settings})
    meta = {"format": 1, "model": config.to_dict(), "tokenizer": tok_spec, "step": step}
    if last:
        export_weights(raw_model, out_dir / f".{WEIGHTS}.export.tmp", {"format": 1, "step": step})
    if procs.master:
        for stale in (TRAIN_STATE, WEIGHTS):  # an earlier step's: the state is sharded/, the weights come at the end
            (out_dir / stale).unlink(missing_ok=True)
        digests = {}
        if last:
            os.replace(out_dir / f".{WEIGHTS}.export.tmp", out_dir / WEIGHTS)
            digests = {WEIGHTS: file_digest(out_dir / WEIGHTS)}
        atomic_write(out_dir / CONFIG, lambda p: Path(p).write_text(config_text(meta, digests)))
    dist.barrier()


def start_metrics(path: Path, resume: bool, start_step: int) -> None:
    """metrics.jsonl from scratch, or on --resume its records up to start_step (a torn last line is dropped)."""
    keep = []
    for line in path.read_text(errors="replace").splitlines() if resume and path.exists() else []:
        try:
            if json.loads(line)["step"] <= start_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    path.write_text("".join(line + "\n" for line in keep))


def record(path: Path, procs: Processes, **r) -> None:
    """One strict-JSON line (nan and inf written as null)."""
    if procs.master:
        r = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in r.items()}
        with open(path, "a") as f:
            f.write(json.dumps(r, allow_nan=False) + "\n")


def diverged(step: int, what: str, out_dir: Path, saved_at: int | None, hint: str) -> NonFiniteError:
    """The error that stops a diverged run, saying which checkpoint (if any) is left."""
    kept = (f"the last checkpoint in {out_dir} is step {saved_at}'s" if saved_at is not None else
            f"this run has written no checkpoint to {out_dir}")
    return NonFiniteError(f"step {step}: {what}: training diverged, and stops here; {kept} ({hint})")


def main(argv):
    if "--help" in argv or "-h" in argv:
        return print(__doc__ + "\n" + help_text(argv))
    given = read_given(argv)  # every value checked; nothing read or written yet
    out_dir = Path(given.get("out_dir", DEFAULT_OUT_DIR))
    state, saved = read_saved_run(out_dir) if given.get("resume") else (None, None)
    s, model_overrides = merge(given, saved)
    if s.plan:
        return show_plan(s, model_overrides, out_dir)
    procs = start_processes(s)
    log = print if procs.master else (lambda *a, **k: None)
    tok = load_tokenizer(s.tokenizer)
    tok_spec = s.tokenizer if s.tokenizer in ("bytes", "gpt2") else os.path.abspath(s.tokenizer)
    config = choose_model_config(s, model_overrides, tok, out_dir)
    if tok.vocab_size > config.vocab_size:
        raise UsageError(f"the tokenizer {s.tokenizer} has {tok.vocab_size} tokens but the model's vocab_size "
                          f"is {config.vocab_size}: use --vocab_size={tok.vocab_size} or another tokenizer")
    if s.check_memory:
        check_memory(s, config, procs)
    set_threads(s.threads, procs.dev, n_params(config))
    on_rank0(lambda: check_out_dir(out_dir), procs)

    # --- the model, the optimizer, the data -----------------------------------------------------------
    torch.manual_seed(s.seed)  # the same initial weights in every process
    use_bf16 = s.dtype == "bfloat16" or (s.dtype == "auto" and procs.device_type == "cuda")
    raw_model, no_decay = build(config, s, procs, use_bf16)
    if not s.resume and procs.master and (out_dir / WEIGHTS).exists():
        log(f"note: {out_dir} holds a checkpoint; this new run overwrites it (--resume continues it instead)")
    n = raw_model.count_params()
    log(f"model {config.name}: {n.total / 1e6:.2f}M parameters, {n.active / 1e6:.2f}M active per token")
    model = distribute(raw_model, s, procs)
    optimizer = torch.optim.AdamW(param_groups(raw_model, s.weight_decay, no_decay), lr=s.lr, betas=(s.beta1, s.beta2),
                                  fused=procs.device_type == "cuda")
    start_step = resume_from(out_dir, state, raw_model, optimizer, s, procs) if s.resume else 0
    if s.resume:
        log(f"resuming {out_dir} at step {start_step}" if start_step < s.max_steps else
            f"the run in {out_dir} is at step {start_step} >= max_steps: raise --max_steps to train further")
    folder = on_rank0(lambda: prepare(tok, tok_spec, s, log), procs)
    folder = prepare(tok, tok_spec, s, log) if procs.distributed else folder  # the other ranks find rank 0's cache
    train_data, val_data = (Batches(folder, split, s.seq_len, s.seed) for split in ("train", "val"))
    autocast = torch.autocast(procs.device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    metrics = out_dir / "metrics.jsonl"
    if procs.master:
        start_metrics(metrics, s.resume, start_step)

    # --- the loop ---------------------------------------------------------------------------------------
    tokens_per_step = s.batch_size * s.grad_accum * procs.world * s.seq_len
    ckpt_every = s.ckpt_interval or s.eval_interval
    model.train()
    val = None
    if start_step == 0:  # the loss before training: about ln(vocab_size)
        val = evaluate(model, val_data, s, procs, autocast)
        record(metrics, procs, step=0, val_loss=val)
        log(f"step 0: val loss {val:.4f}")
    bar = tqdm(total=s.max_steps, initial=start_step, disable=None if procs.master and s.progress else True,
               dynamic_ncols=True, file=sys.stdout)  # disable=None: no bar when stdout is not a terminal
    t_start = time.perf_counter()
    saved_at = start_step if s.resume else None  # the step of this run's last checkpoint
    # --8<-- [start:loop]
    for step in range(start_step, s.max_steps):
        t0 = time.perf_counter()
        r, finite = train_step(model, raw_model, optimizer, train_data, step, s, procs, autocast)
        dt = time.perf_counter() - t0
        speed = dict(tokens_per_s=tokens_per_step / dt)
        if procs.device_type == "cuda":  # model FLOPs utilisation against --peak_tflops per GPU
            speed["mfu"] = mfu(config, s.seq_len, tokens_per_step / dt / procs.world, s.peak_tflops)
        record(metrics, procs, **r, **speed, skipped=not finite, elapsed_s=time.perf_counter() - t_start)
        if not finite and s.on_nonfinite == "stop":
            raise diverged(step + 1, f"the loss is {r['loss']} and the gradient norm {r['grad_norm']}", out_dir, saved_at,
                           "lower --lr, or --on_nonfinite=skip to skip such batches")
        if not finite:
            log(f"step {step + 1}: loss {r['loss']}, gradient norm {r['grad_norm']}: batch skipped")
        if (step + 1) % s.eval_interval == 0 or step + 1 == s.max_steps:
            val = evaluate(model, val_data, s, procs, autocast)
            record(metrics, procs, step=step + 1, val_loss=val)
            if not math.isfinite(val):
                raise diverged(step + 1, f"the validation loss is {val}", out_dir, saved_at, "lower --lr")
            bar.write(f"step {step + 1}: train loss {r['loss']:.4f}, val loss {val:.4f}") if procs.master else None
        if bar.disable and procs.master and (step + 1) % s.log_interval == 0:
            shown_mfu = f", MFU {speed['mfu']:.1%}" if "mfu" in speed else ""
            log(f"step {step + 1}/{s.max_steps}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, "
                f"{tokens_per_step / dt:.0f} tokens/s{shown_mfu}", flush=True)
        bar.set_postfix(loss=f"{r['loss']:.3f}", val="-" if val is None else f"{val:.3f}", lr=f"{r['lr']:.1e}", refresh=False)
        bar.update(1)
        if (step + 1) % ckpt_every == 0 or step + 1 == s.max_steps:
            save(out_dir, raw_model, optimizer, config, s, model_overrides, tok_spec, step + 1, procs,
                 last=step + 1 == s.max_steps)
            saved_at = step + 1
    # --8<-- [end:loop]
    bar.close()
    log(f"checkpoint in {out_dir}/ (sample with: python sample.py {out_dir})")
    if procs.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], "train.py", USAGE_ERRORS, ERRORS))
