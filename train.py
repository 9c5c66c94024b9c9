"""Train a Mamba + Mixture-of-Experts language model: any preset, one CPU to many GPUs, exact resume.

    python train.py                                   # tiny preset, Python stdlib sources, bytes; no network
    python train.py --max_steps=1000 --d_model=256    # any setting below, and any ModelConfig field
    python train.py my_run.toml --lr=1e-3             # settings from a TOML/JSON file, then the command line
    python train.py --preset=moe-mamba-25m --dataset=allenai/c4 --dataset_config=en   # streamed from the hub
    python train.py --resume                          # continue the run in out_dir exactly where it stopped
    torchrun --nproc_per_node=8 train.py --preset=blackmamba-1.5b --fsdp ...          # DDP, or FSDP2 with --fsdp
    python train.py --help                            # every setting with its default

Writes into out_dir: model.safetensors + config.json (what sample.py reads), train_state.pt (optimizer,
step, RNG, settings: what --resume reads) and metrics.jsonl (one JSON record per step / evaluation).
"""

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from minimamba_moe import Model, ModelConfig
from minimamba_moe.checkpoint import (DEFAULT_OUT_DIR, CheckpointError, load_train_state, load_weights,
                                      read_config, recover_interrupted_save, save_checkpoint, WEIGHTS)
from minimamba_moe.config import PRESETS, ConfigError
from minimamba_moe.data import DEFAULT_CACHE_DIR, Batches, DataError, prepare_data
from minimamba_moe.tokenizer import TokenizerError, load_tokenizer

# ------------------------------------------------------------------------------------------------
# Settings. Each can be set with --key=value (or --key value; a bare --flag sets a bool to true), or in a
# config file (TOML or JSON) given as a positional argument. Every ModelConfig field (--d_model, --n_experts,
# --router, --backend, ...) can be set the same way; its default comes from --preset.
_NOT_SETTINGS = set(globals())  # every name from here to SETTINGS below is a setting
# output
out_dir = DEFAULT_OUT_DIR  # checkpoint and metrics.jsonl; sample.py reads the same folder by default
resume = False  # continue the run saved in out_dir (its settings, then yours on top)
# data
data = ""  # a local text file or folder of them; with neither data nor dataset: the Python stdlib's sources
dataset = ""  # a `datasets` hub name (streamed, needs the network) or a local .txt/.json/.jsonl/.csv/.parquet
dataset_config = ""  # the hub dataset's configuration (e.g. "en" for allenai/c4)
text_field = "text"  # the dataset column holding the text
tokenizer = "bytes"  # bytes | gpt2 | path/to/ranks.tiktoken | path/to/tokenizer.json
data_cache = DEFAULT_CACHE_DIR  # where tokenized corpora are kept (one folder per corpus + tokenizer)
max_data_tokens = 0  # stop tokenizing after this many tokens (0 = all); for large streamed datasets
val_every = 100  # every val_every-th document goes to the validation split
# model
preset = "tiny"  # tiny | blackmamba-1.5b | moe-mamba-25m | ... (see PRESETS); sets the model and the defaults below
# optimization
max_steps = 300  # optimizer steps
batch_size = 8  # sequences per micro-batch per process
seq_len = 128  # tokens per sequence
grad_accum = 1  # micro-batches per step: the global batch is batch_size * grad_accum * processes
lr = 3e-3  # peak learning rate
min_lr_ratio = 0.1  # the cosine decays to lr * min_lr_ratio
warmup_frac = 0.01  # fraction of decay_steps spent warming up linearly from 0
decay_steps = 0  # length of the warmup + cosine schedule (0 = max_steps); the lr stays at its floor after
weight_decay = 0.1  # AdamW, on matrices only: not on norms, biases, A_log, D, dt bias
beta1 = 0.9  # AdamW betas (MoE-Mamba: 0.9, 0.999)
beta2 = 0.999  # (a short run may prefer 0.99)
grad_clip = 0.5  # clip the global gradient norm to this (0 = off)
# evaluation, checkpoints
eval_interval = 25  # validation loss every this many steps (and at the start and the end)
eval_batches = 4  # validation micro-batches per evaluation (per process)
ckpt_interval = 0  # checkpoint every this many steps (0 = eval_interval); always at the end
# system
device = "auto"  # auto (cuda if present) | cpu | cuda | cuda:1 ...
dtype = "auto"  # auto (bfloat16 autocast on GPU, float32 on CPU) | float32 | bfloat16; weights stay fp32
compile = False  # torch.compile the model
fsdp = False  # under torchrun: shard with FSDP2 (fully_shard) instead of DDP
seed = 1337  # model init and data order
threads = 1  # CPU threads for torch (0 = its default); small models train fastest on 1, above all on a busy machine
progress = True  # show the tqdm progress bar
# ------------------------------------------------------------------------------------------------
SETTINGS = {k: v for k, v in dict(globals()).items() if k not in _NOT_SETTINGS and not k.startswith("_")}

# Training defaults per preset (SPEC §3, MoE-Mamba's recipe: GPT-2 tokens, context 1024, AdamW(0.9, 0.999),
# weight decay 0.1, clip 0.5, 1% warmup, cosine to 0.1; global batch 64 at 25M, 1024 at 100M: with N GPUs
# divide grad_accum by N). BlackMamba's optimizer settings are not in SPEC: it reuses MoE-Mamba's recipe.
_LARGE = dict(tokenizer="gpt2", eval_interval=1000, eval_batches=20, seq_len=1024, threads=0)
PRESET_TRAINING = {
    "tiny": {},
    "moe-mamba-25m": dict(_LARGE, lr=5e-4, batch_size=64, max_steps=150_000),
    "mamba-25m": dict(_LARGE, lr=1e-3, batch_size=64, max_steps=150_000),
    "transformer-25m": dict(_LARGE, lr=5e-4, batch_size=64, max_steps=150_000),  # not in SPEC: as its MoE twin
    "transformer-moe-25m": dict(_LARGE, lr=5e-4, batch_size=64, max_steps=150_000),
    "moe-mamba-100m": dict(_LARGE, lr=5e-4, batch_size=16, grad_accum=64, max_steps=30_000),
    "mamba-100m": dict(_LARGE, lr=1e-3, batch_size=16, grad_accum=64, max_steps=30_000),
    "transformer-moe-100m": dict(_LARGE, lr=2.5e-4, batch_size=16, grad_accum=64, max_steps=30_000),
    "blackmamba-1.5b": dict(_LARGE, lr=5e-4, batch_size=8, grad_accum=8, seq_len=2048, max_steps=100_000),
    "blackmamba-2.8b": dict(_LARGE, lr=5e-4, batch_size=4, grad_accum=16, seq_len=2048, max_steps=100_000),
}
# FSDP2 warns that the logits are a view (the padded vocab is sliced off); nothing here modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
MODEL_FIELDS = {f.name: f.type for f in dataclasses.fields(ModelConfig) if f.name != "name"}


class UsageError(ValueError):
    """A setting is unknown or has a value of the wrong type."""


ERRORS = (UsageError, ConfigError, DataError, TokenizerError, CheckpointError)  # reported in one line


# --- settings: defaults < preset < saved run (--resume) < config file < command line --------------
def parse_value(key, value, default, annotation=None, typed=False):
    """Convert a command-line string, or check a config file's typed value (typed=True), against the default's type."""
    kind = annotation or type(default).__name__
    if value is None or value in ("None", "none") and "None" in kind:
        if "None" in kind:
            return None
        raise UsageError(f"--{key} cannot be None")
    if "tuple" in kind:
        return tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else tuple(value)
    base = kind.split("|")[0].strip()
    if isinstance(value, str) and base != "str" and not typed:
        if base == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"--{key}={value}: expected true or false")
            return value.lower() in ("true", "1", "yes")
        try:
            number = float(value) if base == "float" else int(value) if value.lstrip("-").isdigit() else int(float(value))
            number = None if base == "int" and float(value) != number else number  # "1e6" is fine, "0.5" is not
        except ValueError:
            number = None
        if number is None:
            raise UsageError(f"--{key}={value}: expected {'a number' if base == 'float' else 'an integer'}")
        return number
    ok = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[base]
    if not isinstance(value, ok) or (isinstance(value, bool) and base != "bool"):
        raise UsageError(f"{key} = {value!r}: expected {base}")
    return float(value) if base == "float" else value


def read_command_line(argv):
    """argv -> (config file path or None, {key: string value or True})."""
    path, given, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if path is not None:
                raise UsageError(f"unexpected argument {arg!r} (settings are --key=value)")
            path, i = arg, i + 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        check_known(key)
        if not eq:
            if isinstance(SETTINGS.get(key), bool) or MODEL_FIELDS.get(key) == "bool":
                value = "true"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                raise UsageError(f"--{key} needs a value")
        given[key], i = value, i + 1
    return path, given


def check_known(key):
    if key not in SETTINGS and key not in MODEL_FIELDS:
        close = difflib.get_close_matches(key, list(SETTINGS) + list(MODEL_FIELDS), n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else " (see --help)"
        raise UsageError(f"unknown setting --{key}{hint}")


def read_config_file(path):
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist")
    text = Path(path).read_text()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import tomllib
            values = tomllib.loads(text)
    except ValueError as e:
        raise UsageError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}") from None
    for key in values:
        check_known(key)
    return values


def configure(argv):
    """The run's settings dict and the model config overrides it names."""
    path, given = read_command_line(argv)
    from_file = read_config_file(path) if path else {}
    given = {**from_file, **given}
    settings = dict(SETTINGS)
    out = str(given.get("out_dir", settings["out_dir"]))
    if str(given.get("resume", "false")).lower() in ("true", "1", "yes"):
        saved = json.loads(load_train_state(out)["settings"])  # the run's own settings, then the new ones on top
        saved.pop("model")  # on resume the model is the checkpoint's config.json
        settings.update(saved)
    else:
        name = str(given.get("preset", settings["preset"]))
        if name not in PRESETS:
            ModelConfig.from_preset(name)  # raises ConfigError naming the close matches
        settings.update(PRESET_TRAINING.get(name, {}))
    model_overrides = settings.pop("model", {})
    for key, value in given.items():
        typed = key in from_file and from_file[key] is value
        if key in SETTINGS:
            settings[key] = parse_value(key, value, SETTINGS[key], typed=typed)
        else:
            model_overrides[key] = parse_value(key, value, None, MODEL_FIELDS[key], typed=typed)
    return settings, model_overrides


def print_help(argv):
    """Every setting with its default; `--help --preset=NAME` shows that preset's defaults."""
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "tiny")
    config = ModelConfig.from_preset(preset)  # an unknown name: ConfigError with the close matches
    defaults = {**SETTINGS, **PRESET_TRAINING.get(preset, {})}
    print(__doc__)
    source = Path(__file__).read_text().split("# ----------")[1]  # the settings block at the top
    print("Settings (default, then what it does):")
    for line in source.splitlines()[4:]:
        m = re.match(r"^(\w+) = (.+?)(?:\s+# (.*))?$", line)
        if m and m.group(1) in SETTINGS:
            print(f"  {'--' + m.group(1) + '=' + str(defaults[m.group(1)]):<26} {m.group(3) or ''}")
        elif line.startswith("# "):
            print(f" {line[2:]}:")
    print(f"Model (any ModelConfig field; defaults of --preset={preset}; see minimamba_moe/config.py):")
    for key, kind in MODEL_FIELDS.items():
        value = getattr(config, key)
        value = ",".join(value) if isinstance(value, tuple) else value
        print(f"  {'--' + key + '=' + str(value):<34} ({kind})")


# --- the schedule -----------------------------------------------------------------------------------
def lr_at(step, cfg):
    """Linear warmup for warmup_frac of the schedule, then cosine from lr down to lr * min_lr_ratio."""
    total = cfg["decay_steps"] or cfg["max_steps"]
    warmup = max(1, round(cfg["warmup_frac"] * total))
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg["lr"] * cfg["min_lr_ratio"]
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - floor)


def main(argv):
    if "--help" in argv or "-h" in argv:
        return print_help(argv)
    cfg, model_overrides = configure(argv)

    # --- processes and devices: one process, or one per device under torchrun ----------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dev = cfg["device"] if cfg["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if distributed:
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        if dev.startswith("cuda"):
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    master = rank == 0
    device_type = "cuda" if dev.startswith("cuda") else "cpu"
    use_bf16 = cfg["dtype"] == "bfloat16" or (cfg["dtype"] == "auto" and device_type == "cuda")
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    log = print if master else (lambda *a, **k: None)

    def on_rank0(fn):
        """fn() on rank 0 only; if it fails, every process raises its error (so none waits for it forever)."""
        result, error = None, None
        if master:
            try:
                result = fn()
            except ERRORS as e:
                error = e
        if distributed:
            box = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(box, src=0)  # a class name and a message, from our own rank 0
            if box[0] is not None:
                raise {c.__name__: c for c in ERRORS}[box[0][0]](box[0][1])
        elif error is not None:
            raise error
        return result

    out_dir = Path(cfg["out_dir"])

    def check_out_dir():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / ".write_test").write_text("")
            (out_dir / ".write_test").unlink()
        except OSError as e:
            raise UsageError(f"cannot write to --out_dir={out_dir} ({e.strerror}): choose a folder you can write to")
        recover_interrupted_save(out_dir)
    on_rank0(check_out_dir)

    # --- the model: the preset with overrides, or on --resume the checkpoint's own config ---------------
    tok = load_tokenizer(cfg["tokenizer"])
    if cfg["resume"]:
        mconfig, _ = read_config(out_dir)
        saved = {"preset": mconfig.name, **mconfig.to_dict()}
        clash = [(k, v) for k, v in {"preset": cfg["preset"], **model_overrides}.items()
                 if k != "backend" and saved[k] != (list(v) if isinstance(v, tuple) else v)]
        if clash:
            (k, v), = clash[:1]
            raise CheckpointError(f"--{k}={v} does not match the checkpoint in {out_dir} ({k}={saved[k]!r}): "
                                  "a run resumes with its own model; drop the setting or use a fresh --out_dir")
        mconfig.backend = model_overrides.get("backend", mconfig.backend)
    else:
        if master and (out_dir / WEIGHTS).exists():
            log(f"note: {out_dir} holds a checkpoint; this new run overwrites it (--resume continues it instead)")
        if tok.vocab_size > PRESETS[cfg["preset"]]["vocab_size"] and "vocab_size" not in model_overrides:
            model_overrides["vocab_size"] = tok.vocab_size  # e.g. --tokenizer=gpt2 on the tiny preset
        mconfig = ModelConfig.from_preset(cfg["preset"], **model_overrides)
    if tok.vocab_size > mconfig.vocab_size:
        raise ConfigError(f"the tokenizer {cfg['tokenizer']} has {tok.vocab_size} tokens but the model's vocab_size "
                          f"is {mconfig.vocab_size}: use --vocab_size={tok.vocab_size} or another tokenizer")
    torch.manual_seed(cfg["seed"])  # the same initial weights in every process
    raw_model = Model(mconfig)
    if cfg["resume"]:
        load_weights(raw_model, out_dir / WEIGHTS)
    if not (distributed and cfg["fsdp"]):
        raw_model.to(dev)  # (under FSDP2, fully_shard moves each layer to the device as it shards it)
    no_decay = {n for n, p in raw_model.named_parameters() if p.ndim < 2 or getattr(p, "_no_weight_decay", False)}
    n = raw_model.count_params()
    log(f"model {mconfig.name}: {n.total / 1e6:.2f}M parameters, {n.active / 1e6:.2f}M active per token")
    model = raw_model
    if distributed and cfg["fsdp"]:  # FSDP2: each layer's parameters sharded over the processes
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device_type, (world,))
        for layer in raw_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(raw_model, mesh=mesh)
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[dev] if device_type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)

    # --- AdamW: weight decay on matrices only (fused kernel on CUDA) ------------------------------------
    params = dict(raw_model.named_parameters())
    groups = [{"params": [p for k, p in params.items() if k not in no_decay], "weight_decay": cfg["weight_decay"]},
              {"params": [p for k, p in params.items() if k in no_decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  fused=device_type == "cuda")
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start_step = 0
    if cfg["resume"]:
        state = load_train_state(out_dir)
        set_optimizer_state_dict(raw_model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(state["rng_cpu"])
        if device_type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_step = state["step"]
        log(f"resuming {out_dir} at step {start_step}" if start_step < cfg["max_steps"] else
            f"the run in {out_dir} is at step {start_step} = max_steps: raise --max_steps to train further")

    # --- data: tokenized once into data_cache (by rank 0), then random windows per step ---------------
    def prepare():
        return prepare_data(tok, tok_spec, cfg["data"], cfg["dataset"], cfg["dataset_config"], cfg["text_field"],
                            cfg["data_cache"], cfg["val_every"], cfg["max_data_tokens"], log=log)
    tok_spec = cfg["tokenizer"] if cfg["tokenizer"] in ("bytes", "gpt2") else os.path.abspath(cfg["tokenizer"])
    folder = on_rank0(prepare)
    if distributed:
        folder = prepare()  # finds rank 0's cache
    train_data = Batches(folder, "train", cfg["seq_len"], cfg["seed"])
    val_data = Batches(folder, "val", cfg["seq_len"], cfg["seed"])
    B, k = cfg["batch_size"], cfg["grad_accum"]
    tokens_per_step = B * k * world * cfg["seq_len"]

    def loss_fn(x, y):
        with autocast:
            out = model(x.to(dev))
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.to(dev).flatten())
        return ce, out

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = torch.stack([loss_fn(*val_data.get(i, B, 0, 1, rank, world))[0] for i in range(cfg["eval_batches"])])
        model.train()
        loss = losses.mean()
        if distributed:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item()

    def save(step):
        sd = get_model_state_dict(raw_model, options=full)  # gathered from every process under FSDP
        osd = get_optimizer_state_dict(raw_model, optimizer, options=full)
        if master:
            hang = os.environ.get("MINIMAMBA_TEST_HANG_IN_SAVE_AT_STEP")  # tests kill -9 the run here
            def before_rename():
                if hang and int(hang) == step:
                    print("checkpoint written to temporary files; hanging before the renames", file=sys.stderr, flush=True)
                    time.sleep(3600)
            settings = json.dumps({**cfg, "resume": False, "model": {**model_overrides}})
            state = {"optimizer": osd, "settings": settings, "rng_cpu": torch.get_rng_state()}
            if device_type == "cuda":
                state["rng_cuda"] = torch.cuda.get_rng_state()
            save_checkpoint(out_dir, sd, mconfig, state,
                            before_rename=before_rename, tokenizer=tok_spec, step=step)
        if distributed:
            dist.barrier()

    # --- metrics: one JSON line per step and per evaluation; on resume, later lines are dropped --------
    metrics_path = out_dir / "metrics.jsonl"
    if master:
        keep = [line for line in (metrics_path.read_text().splitlines() if cfg["resume"] and metrics_path.exists() else [])
                if json.loads(line)["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in keep))
    def record(**r):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(r) + "\n")

    # --- the loop ----------------------------------------------------------------------------------
    model.train()
    ckpt_every = cfg["ckpt_interval"] or cfg["eval_interval"]
    val = None
    if start_step == 0:  # the loss before training: about ln(vocab_size)
        val = evaluate()
        record(step=0, val_loss=val)
        log(f"step 0: val loss {val:.4f}")
    bar = tqdm(total=cfg["max_steps"], initial=start_step, disable=not (master and cfg["progress"]),
               dynamic_ncols=True, file=sys.stdout)
    t_start = time.perf_counter()
    for step in range(start_step, cfg["max_steps"]):
        t0 = time.perf_counter()
        lr_now = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss_sum, aux_sum, counts, dropped = 0.0, 0.0, 0, 0
        # Sinkhorn routing balances each process's micro-batch (as BlackMamba does per device), so with
        # the sinkhorn router, splitting a batch over micro-batches or processes changes the routing a little.
        for micro in range(k):
            last = micro == k - 1  # gradients are averaged over processes only after the last micro-batch
            if cfg["fsdp"] and distributed:
                raw_model.set_requires_gradient_sync(last)
            sync = model.no_sync() if distributed and not cfg["fsdp"] and not last else nullcontext()
            with sync:
                ce, out = loss_fn(*train_data.get(step, B, micro, k, rank, world))
                ((ce + out.aux_loss) / k).backward()
            loss_sum += ce.detach() / k
            aux_sum += out.aux_loss.detach() / k
            if out.router_stats:
                counts = counts + torch.stack([s.tokens_per_expert for s in out.router_stats])
                dropped = dropped + torch.stack([s.dropped for s in out.router_stats])
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        stats = torch.stack([torch.as_tensor(loss_sum, device=dev).float(), torch.as_tensor(aux_sum, device=dev).float()])
        if distributed:  # the global batch's mean loss, and every process's routing counts
            dist.all_reduce(stats, op=dist.ReduceOp.AVG)
            if out.router_stats:
                dist.all_reduce(counts)
                dist.all_reduce(dropped)
        loss, aux = stats.tolist()
        dt = time.perf_counter() - t0
        r = dict(step=step + 1, loss=loss, aux_loss=aux, lr=lr_now, grad_norm=grad_norm.item(),
                 tokens_per_s=tokens_per_step / dt, elapsed_s=time.perf_counter() - t_start)
        postfix = dict(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}", lr=f"{lr_now:.1e}")
        if out.router_stats:
            r.update(tokens_per_expert=counts.tolist(), dropped=dropped.tolist())
            c = counts.float()
            postfix["imbalance"] = f"{(c.max(1).values / c.mean(1)).mean():.2f}"  # 1.00 = perfectly balanced
        record(**r)
        if (step + 1) % cfg["eval_interval"] == 0 or step + 1 == cfg["max_steps"]:
            val = evaluate()
            record(step=step + 1, val_loss=val)
            bar.write(f"step {step + 1}: train loss {loss:.4f}, val loss {val:.4f}") if master else None
        if val is not None:
            postfix["val"] = f"{val:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if (step + 1) % ckpt_every == 0 or step + 1 == cfg["max_steps"]:
            save(step + 1)
    bar.close()
    log(f"checkpoint in {out_dir}/ (sample with: python sample.py {out_dir})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ERRORS as e:  # bad input: one line, no traceback (from rank 0 only under torchrun)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
