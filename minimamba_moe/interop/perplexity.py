"""Loss, perplexity and bits per byte of a model on any local text: a file, or every file of a folder.

    python -m minimamba_moe.interop.perplexity out --data notes.txt
    python -m minimamba_moe.interop.perplexity Zyphra/BlackMamba-1.5B --data corpus/ --device cuda --batch_size 16

The model is named as the harness's ``pretrained`` is: a checkpoint folder, a BlackMamba hub id, or a
pytorch_model.bin with ``--tokenizer``. Each file is one document: its tokens follow the end-of-text
token (a newline for the byte tokenizer), so the first token is predicted too. Windows of
``--context`` tokens (default: the model's max_seq_len) slide over each document by ``--stride``
tokens (default: half the context); the first window scores all its tokens, each later one only the
``stride`` tokens it adds, so every token is scored once and sees at least ``context - stride``
tokens before it (all of them near the start). ``--stride`` equal to ``--context`` gives disjoint
windows, the fastest and the least context; a stride of 1 gives every token the full context, one
window per token. Windows from all documents go through the model ``--batch_size`` at a time, under a
progress bar counting tokens.

    loss            mean negative log-likelihood per token, in nats
    perplexity      exp(loss)
    bits per byte   the summed negative log-likelihood in bits over the UTF-8 bytes of the text: unlike
                    the two above, comparable between tokenizers

Errors (a missing file, text that is not UTF-8, a stride larger than the context) print one line and
exit with status 2 for a bad argument, 1 for anything else. Nothing is written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimamba_moe.config import ConfigError
from minimamba_moe.run.checkpoint import CheckpointError
from minimamba_moe.run.cli import run_main
from minimamba_moe.run.memory import MemoryCheckError
from minimamba_moe.run.tokenizer import TokenizerError
from minimamba_moe.interop.hub import SettingError, load_pretrained, pick_device, pick_dtype

PROG = "python -m minimamba_moe.interop.perplexity"


class PerplexityError(ValueError):
    """Text that cannot be read; the message names the file."""


class UsageError(PerplexityError):
    """A bad command-line argument."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def text_files(data: str) -> list[Path]:
    """The file, or every regular file under the folder (hidden ones left out), in sorted order."""
    path = Path(data)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PerplexityError(f"--data {data}: no such file or folder.")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise PerplexityError(f"--data {data}: the folder holds no files.")
    return files


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise PerplexityError(f"Cannot read {path}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise PerplexityError(f"{path} is not UTF-8 text (byte {e.start}); convert it, or leave it out.") from None


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored_from) over a document of ``n`` tokens after its prefix token: the window feeds
    inputs begin..end-1 (position 0 is the prefix token) and scores targets scored_from+1..end."""
    begin = scored = 0
    while scored < n:
        end = min(begin + context, n)
        if end > scored:
            yield begin, end, scored
            scored = end
        begin += stride


def evaluate(model, tok, texts: list[str], context: int, stride: int, batch_size: int, device,
             progress: bool = True) -> dict:
    """Sum the negative log-likelihood of every token of ``texts`` over sliding windows; the three metrics."""
    prefix = tok.eot_token if tok.eot_token is not None else tok.encode("\n")[0]
    docs = [[prefix] + tok.encode(t) for t in texts]
    n_tokens = sum(len(d) - 1 for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_tokens == 0:
        raise PerplexityError("The text is empty: no token to score.")
    jobs = ((d, w) for d in docs for w in windows(len(d) - 1, context, stride))
    nll, n_windows = 0.0, 0
    bar = tqdm(total=n_tokens, unit="tok", disable=not progress, desc="perplexity", file=sys.stderr)
    with torch.no_grad():
        while batch := [job for _, job in zip(range(batch_size), jobs)]:
            width = max(end - begin for _, (begin, end, _) in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            for i, (doc, (begin, end, _)) in enumerate(batch):
                ids[i, :end - begin] = torch.tensor(doc[begin:end], dtype=torch.long)
            logits = model(ids).logits
            for i, (doc, (begin, end, scored)) in enumerate(batch):
                target = torch.tensor(doc[scored + 1:end + 1], dtype=torch.long, device=device)
                logp = F.log_softmax(logits[i, scored - begin:end - begin].float(), dim=-1)
                nll -= float(logp.gather(-1, target[:, None]).sum())
                bar.update(end - scored)
            n_windows += len(batch)
    bar.close()
    loss = nll / n_tokens
    return {"tokens": n_tokens, "bytes": n_bytes, "windows": n_windows, "nll": nll, "loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / n_bytes}


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("model", metavar="CKPT", help="checkpoint folder, BlackMamba hub id, or pytorch_model.bin")
    ap.add_argument("--data", required=True, help="a UTF-8 text file, or a folder of them (each file a document)")
    ap.add_argument("--context", type=int, default=0, help="tokens per window (default 0: the model's max_seq_len)")
    ap.add_argument("--stride", type=int, default=0, help="tokens between windows (default 0: half the context)")
    ap.add_argument("--batch_size", type=int, default=8, help="windows per forward (default 8)")
    ap.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint's; GPT-NeoX's for a hub id)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, "
                    "bfloat16, float16")
    ap.add_argument("--progress", default="true", choices=["true", "false"], help="show the progress bar")
    args = ap.parse_args(argv)
    if args.context < 0 or args.stride < 0:
        raise UsageError("--context and --stride must be positive (or 0 for their defaults).")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: expected at least 1.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
    except SettingError as e:
        raise UsageError(f"--{e}") from None
    files = text_files(args.data)
    texts = [read_text(f) for f in files]  # every file checked before the model is loaded
    model, tok = load_pretrained(args.model, device, dtype, args.tokenizer)
    context = args.context or model.config.max_seq_len
    if "attention" in model.config.layer_kinds and context > model.config.max_seq_len:
        raise UsageError(f"--context {context}: this model has attention layers, which see at most "
                         f"max_seq_len={model.config.max_seq_len} tokens.")
    stride = args.stride or max(1, context // 2)
    if stride > context:
        raise UsageError(f"--stride {stride} is larger than --context {context}: tokens between windows would "
                         "never be scored.")
    r = evaluate(model, tok, texts, context, stride, args.batch_size, device, progress=args.progress == "true")
    print(f"{args.data}: {len(files)} file{'s' * (len(files) != 1)}, {r['tokens']} tokens, {r['bytes']} bytes; "
          f"{r['windows']} window{'s' * (r['windows'] != 1)} of {context} tokens, stride {stride}")
    print(f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.4f} | bits per byte {r['bits_per_byte']:.4f}")


ERRORS = (PerplexityError, CheckpointError, ConfigError, TokenizerError, MemoryCheckError)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_main(main, sys.argv[1:], PROG, (UsageError,), ERRORS))
