"""Sample text from a minimamba-moe checkpoint, or from Zyphra's released BlackMamba weights.

    python sample.py                                    # the checkpoint `python train.py` wrote
    python sample.py out-big --prompt "Once upon a time" --max_new_tokens 200
    echo "The meaning of life is" | python sample.py --temperature 0.7 --top_k 50
    python sample.py --zyphra Zyphra/BlackMamba-1.5B                # fetched into the Hugging Face hub cache
    python sample.py --zyphra BlackMamba-1.5B/pytorch_model.bin --tokenizer gpt-neox-20b/tokenizer.json

How it generates (minimamba_moe/generate.py): one forward pass over the prompt fills the recurrent
state (each Mamba layer's conv tail and last SSM state; the KV cache of attention layers), then
``Model.step`` feeds one token at a time. A Mamba/MoE model's state has a fixed size, so the
1000th token costs what the 10th did; a Transformer baseline's KV cache fills up to max_seq_len.
Text is printed as it is produced; at the end the prefill and decode speeds go to stderr.

Errors print one line to stderr (--debug or MINIMAMBA_DEBUG=1: the traceback) and exit with status
2 for a bad argument, 1 for anything else (missing or damaged checkpoint, config and weights that
disagree, a model too big for this machine, a prompt longer than a Transformer's context, ...).
An interrupted training save in the folder is undone first, as train.py --resume does.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from minimamba_moe.config import BACKENDS, ConfigError
from minimamba_moe.run.checkpoint import DEFAULT_OUT_DIR, CheckpointError, load_model, read_config, recover_interrupted_save
from minimamba_moe.run.cli import MAX_THREADS, run_main, set_threads
from minimamba_moe.interop.convert import ACTIVATIONS, DEFAULT_ACTIVATION, check_out_dir, save_converted, stored_tokenizer_spec
from minimamba_moe.interop.hub import BLACKMAMBA_REPOS, TOKENIZER_REPO, is_hub_id, load_blackmamba
from minimamba_moe.generate import generate_tokens
from minimamba_moe.run.memory import MemoryCheckError, check_fits, inference_memory
from minimamba_moe.run.tokenizer import StreamDecoder, TokenizerError, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SampleError(ValueError):
    """Bad input (a prompt, a checkpoint's contents); the message says what to change."""


class UsageError(SampleError):
    """A bad command-line argument."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised (not printed with the usage and exited)
        raise UsageError(message)


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    src = ap.add_argument_group("model")
    src.add_argument("ckpt_dir", nargs="?", metavar="CKPT", help="checkpoint folder, same as --ckpt")
    src.add_argument("--ckpt", default=DEFAULT_OUT_DIR, help=f"checkpoint folder (default: {DEFAULT_OUT_DIR})")
    src.add_argument("--zyphra", metavar="ID_OR_PATH", help=f"Zyphra's released BlackMamba instead of --ckpt: a hub "
                     f"id ({', '.join(BLACKMAMBA_REPOS)}; fetched with huggingface_hub, the `hf` extra) or a "
                     "downloaded pytorch_model.bin")
    src.add_argument("--tokenizer", help="tokenizer spec (bytes, gpt2, *.tiktoken, tokenizer.json); "
                     f"default: the checkpoint's, or {TOKENIZER_REPO}'s for a --zyphra hub id; "
                     "required with a --zyphra path")
    src.add_argument("--activation", choices=ACTIVATIONS, default=DEFAULT_ACTIVATION,
                     help="--zyphra expert gate: geglu (default, what the released code runs) or swiglu (the paper)")
    src.add_argument("--save_converted", metavar="DIR", help="--zyphra: also save the converted model as a checkpoint")
    p = ap.add_argument_group("prompt (default: standard input when it is not a terminal, else empty)")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt_file", help="read the prompt from this file")
    s = ap.add_argument_group("sampling")
    s.add_argument("--num_samples", type=int, default=1)
    s.add_argument("--max_new_tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to mass p")
    s.add_argument("--seed", type=int, default=1337)
    r = ap.add_argument_group("runtime")
    r.add_argument("--backend", choices=BACKENDS, help="kernels (default: the checkpoint's)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0 = auto, as train.py: "
                   "1 for a model under 100M parameters on the CPU, else torch's default)")
    r.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype (default: bfloat16 on a GPU or with --zyphra, else float32)")
    r.add_argument("--check_memory", type=_bool, default=True, metavar="BOOL",
                   help="refuse a model bigger than the memory this machine has (default: true)")
    r.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    args.ckpt = args.ckpt_dir or args.ckpt
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UsageError("--num_samples and --max_new_tokens must be at least 1.")
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("Need a finite --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0.")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed}: expected an integer from 0 to 2**63 - 1 (as train.py takes).")
    if not 0 <= args.threads <= MAX_THREADS:
        raise UsageError(f"--threads {args.threads}: expected 0 (auto) or a number of threads up to {MAX_THREADS}.")
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("Give --prompt or --prompt_file, not both.")
    return args


def pick_device_dtype(args) -> tuple[torch.device, torch.dtype]:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device} is not a device name (cpu, cuda, cuda:1, ...).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu.")
    try:
        torch.empty(0, device=device)  # e.g. mps in a build without it, or cuda:7 on a machine with one GPU
    except (RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--device {args.device} is not available here ({first}); use --device cpu or cuda.") from None
    if args.dtype != "auto":
        return device, DTYPES[args.dtype]
    return device, torch.bfloat16 if (device.type == "cuda" or args.zyphra) else torch.float32


def load(args, device, dtype):
    """(model in eval mode on device, tokenizer)."""
    if args.zyphra:
        if not args.tokenizer and not is_hub_id(args.zyphra):
            raise UsageError(f"--zyphra with a file needs --tokenizer PATH/tokenizer.json (GPT-NeoX's, from "
                             f"{TOKENIZER_REPO}), or name a hub repository: --zyphra {BLACKMAMBA_REPOS[0]}.")
        if args.save_converted:
            check_out_dir(args.save_converted)  # before the minutes spent fetching and reading the weights
        model, tok, tok_spec = load_blackmamba(args.zyphra, args.tokenizer, args.activation, dtype)
        model = model.to(device)
        n = model.count_params()
        print(f"{args.zyphra}: BlackMamba preset {model.config.name}, {model.config.mlp_activation} experts, "
              f"{n.total / 1e6:.1f}M params ({n.active / 1e6:.1f}M active)", file=sys.stderr)
        if args.save_converted:
            save_converted(model, args.save_converted, tokenizer=stored_tokenizer_spec(tok_spec))
            print(f"saved the converted checkpoint to {args.save_converted}", file=sys.stderr)
    else:
        recover_interrupted_save(args.ckpt)  # before anything reads the folder
        config, _ = read_config(args.ckpt)
        if args.check_memory:
            check_fits(inference_memory(config, dtype), device, lower="this checkpoint's config.json describes a "
                       "model too big for this machine (--check_memory=false tries anyway)")
        model, extra = load_model(args.ckpt, device, dtype)  # (refuses weights holding a nan or inf)
        spec = args.tokenizer or extra.get("tokenizer")
        if spec is None:
            raise SampleError(f"{args.ckpt}/config.json names no tokenizer; pass --tokenizer (bytes, gpt2, ...).")
        tok = load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise SampleError(f"The tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}.")
    if args.backend:
        model.set_backend(args.backend)
    return model.eval(), tok


def read_prompt(args) -> str:
    """The prompt from --prompt, --prompt_file or standard input; UTF-8 only."""
    if args.prompt is not None:
        where, raw = "--prompt", args.prompt.encode("utf-8", errors="surrogateescape")  # argv's undecodable bytes
    elif args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                where, raw = f"--prompt_file {args.prompt_file}", f.read()
        except OSError as e:
            raise SampleError(f"Cannot read --prompt_file {args.prompt_file}: {e.strerror}.") from None
    elif sys.stdin is None or sys.stdin.isatty():
        return ""
    else:
        where, raw = "the standard input", sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SampleError(f"The prompt from {where} is not UTF-8 text; convert it to UTF-8.") from None


def fit_context(model, n_prompt: int, max_new_tokens: int) -> int:
    """Attention layers hold at most max_seq_len positions: refuse a longer prompt, shorten the output."""
    if "attention" not in model.config.layer_kinds:
        return max_new_tokens  # Mamba state: no limit
    ctx = model.config.max_seq_len
    if n_prompt > ctx:
        raise SampleError(f"The prompt is {n_prompt} tokens, longer than this Transformer's context of "
                          f"max_seq_len={ctx} tokens; shorten it.")
    room = ctx - n_prompt + 1  # the last generated token is never fed back, so it needs no cache slot
    if max_new_tokens > room:
        print(f"note: --max_new_tokens {max_new_tokens} lowered to {room} to fit max_seq_len={ctx}", file=sys.stderr)
    return min(max_new_tokens, room)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = pick_device_dtype(args)
    model, tok = load(args, device, dtype)
    set_threads(args.threads, device, model.count_params().total)  # the policy train.py follows too

    text = read_prompt(args)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets "?", not an error
        sys.stdout.reconfigure(errors="replace")
    ids = tok.encode(text)
    if not ids:  # start from end-of-text, or a newline for the byte tokenizer
        ids = [tok.eot_token] if tok.eot_token is not None else tok.encode("\n")
    max_new = fit_context(model, len(ids), args.max_new_tokens)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    prefill_s = decode_s = 0.0
    n_prefill = n_decode = 0
    try:
        for sample in range(args.num_samples):
            if sample:
                print("\n" + "-" * 40, flush=True)
            print(text, end="", flush=True)
            tokens = generate_tokens(model, prompt, max_new, args.temperature, args.top_k or None,
                                     args.top_p if args.top_p < 1 else None, gen, vocab_size=tok.vocab_size)
            stream = StreamDecoder(tok)
            for i in range(max_new):
                sync()
                t0 = time.perf_counter()
                token = next(tokens)  # the first one includes the prefill; every later one is one step
                sync()
                dt = time.perf_counter() - t0
                if i == 0:
                    prefill_s, n_prefill = prefill_s + dt, n_prefill + len(ids)
                else:
                    decode_s, n_decode = decode_s + dt, n_decode + 1
                t = int(token[0])
                if t == tok.eot_token:
                    break
                print(stream.push(t), end="", flush=True)
            tokens.close()
            print(stream.flush(), flush=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    except BrokenPipeError:  # the reader stopped (`python sample.py | head`): stop too, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return
    rate = lambda n, s: f"{n / s:.1f} tokens/s" if s > 0 else "n/a"  # noqa: E731
    report = f"prefill: {n_prefill} tokens in {prefill_s:.3f} s ({rate(n_prefill, prefill_s)})"
    report += f" | decode: {n_decode} tokens in {decode_s:.3f} s ({rate(n_decode, decode_s)}"
    report += f", {1000 * decode_s / n_decode:.2f} ms/token)" if n_decode else ")"
    print(report, file=sys.stderr)


ERRORS = (SampleError, CheckpointError, ConfigError, TokenizerError, MemoryCheckError)  # each reported in one line

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], "sample.py", (UsageError,), ERRORS))
