"""Sample text from a minimamba-moe checkpoint, or from Zyphra's released BlackMamba weights.

    python sample.py                                    # the checkpoint `python train.py` wrote
    python sample.py out-big --prompt "Once upon a time" --max_new_tokens 200
    echo "The meaning of life is" | python sample.py --temperature 0.7 --top_k 50
    python sample.py --zyphra BlackMamba-1.5B/pytorch_model.bin --tokenizer gpt-neox-20b/tokenizer.json

How it generates (minimamba_moe/generate.py): one forward pass over the prompt fills the recurrent
state (each Mamba layer's conv tail and last SSM state; the KV cache of attention layers), then
``Model.step`` feeds one token at a time. A Mamba/MoE model's state has a fixed size, so the
1000th token costs what the 10th did; a Transformer baseline's KV cache fills up to max_seq_len.
Text is printed as it is produced; at the end the prefill and decode speeds go to stderr.

Errors (missing or damaged checkpoint, config and weights that disagree, a prompt longer than a
Transformer's context, ...) print one line to stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from minimamba_moe.checkpoint import DEFAULT_OUT_DIR, CheckpointError, load_model, save_model
from minimamba_moe.config import BACKENDS, ConfigError
from minimamba_moe.convert import ACTIVATIONS, DEFAULT_ACTIVATION, load_zyphra, stored_tokenizer_spec
from minimamba_moe.generate import StreamDecoder, generate_tokens
from minimamba_moe.tokenizer import TokenizerError, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SampleError(ValueError):
    """Bad arguments or input; the message says what to change."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_argument_group("model")
    src.add_argument("ckpt_dir", nargs="?", metavar="CKPT", help="checkpoint folder, same as --ckpt")
    src.add_argument("--ckpt", default=DEFAULT_OUT_DIR, help=f"checkpoint folder (default: {DEFAULT_OUT_DIR})")
    src.add_argument("--zyphra", metavar="PATH", help="Zyphra's pytorch_model.bin instead of --ckpt")
    src.add_argument("--tokenizer", help="tokenizer spec (bytes, gpt2, *.tiktoken, tokenizer.json); "
                     "default: the checkpoint's; required with --zyphra")
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
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is often "
                   "fastest for small models on a busy machine)")
    r.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype (default: bfloat16 on a GPU or with --zyphra, else float32)")
    args = ap.parse_args(argv)
    args.ckpt = args.ckpt_dir or args.ckpt
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise SampleError("--num_samples and --max_new_tokens must be at least 1.")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise SampleError("Need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0.")
    if args.prompt is not None and args.prompt_file is not None:
        raise SampleError("Give --prompt or --prompt_file, not both.")
    return args


def pick_device_dtype(args) -> tuple[torch.device, torch.dtype]:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SampleError(f"--device {args.device} is not a device name (cpu, cuda, cuda:1, ...).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu.")
    if args.dtype != "auto":
        return device, DTYPES[args.dtype]
    return device, torch.bfloat16 if (device.type == "cuda" or args.zyphra) else torch.float32


def load(args, device, dtype):
    """(model in eval mode on device, tokenizer)."""
    if args.zyphra:
        if not args.tokenizer:
            raise SampleError("--zyphra needs --tokenizer PATH/tokenizer.json (GPT-NeoX's, from EleutherAI/gpt-neox-20b).")
        tok = load_tokenizer(args.tokenizer)
        model = load_zyphra(args.zyphra, args.activation, tok, dtype).to(device)
        n = model.count_params()
        print(f"{args.zyphra}: BlackMamba preset {model.config.name}, {model.config.mlp_activation} experts, "
              f"{n.total / 1e6:.1f}M params ({n.active / 1e6:.1f}M active)", file=sys.stderr)
        if args.save_converted:
            save_model(model, args.save_converted, tokenizer=stored_tokenizer_spec(args.tokenizer))
            print(f"saved the converted checkpoint to {args.save_converted}", file=sys.stderr)
    else:
        model, extra = load_model(args.ckpt, device, dtype)
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
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SampleError(f"Cannot read --prompt_file {args.prompt_file}: {e.strerror}.") from None
    return "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()


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
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device_dtype(args)
    model, tok = load(args, device, dtype)

    text = read_prompt(args)
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
                                     args.top_p if args.top_p < 1 else None, gen)
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
    rate = lambda n, s: f"{n / s:.1f} tokens/s" if s > 0 else "n/a"  # noqa: E731
    report = f"prefill: {n_prefill} tokens in {prefill_s:.3f} s ({rate(n_prefill, prefill_s)})"
    report += f" | decode: {n_decode} tokens in {decode_s:.3f} s ({rate(n_decode, decode_s)}"
    report += f", {1000 * decode_s / n_decode:.2f} ms/token)" if n_decode else ")"
    print(report, file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (SampleError, CheckpointError, ConfigError, TokenizerError) as e:
        sys.exit(f"sample.py: error: {e}")
