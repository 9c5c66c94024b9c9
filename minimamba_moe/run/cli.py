"""What train.py and sample.py share as command-line programs: one line per error, one thread policy.

    run_main(main, argv, prog, usage_errors, errors)   exit 0; 2 for a usage error, 1 for any other
                                                      failure, each with one line on stderr
    choose_threads(requested, device, n_params)       how many CPU threads torch should use
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

SMALL_MODEL = 100_000_000  # parameters: below this, one CPU thread is the fastest (see choose_threads)
MAX_THREADS = 1024  # torch.set_num_threads(50_000) crashes the process (segmentation fault) on a 2-core machine


def debug_requested(argv: list[str]) -> bool:
    """--debug (or --debug=true), or the environment variable MINIMAMBA_DEBUG=1: show tracebacks."""
    return os.environ.get("MINIMAMBA_DEBUG", "") not in ("", "0") or any(
        a in ("--debug", "--debug=true", "--debug=1") for a in argv)


def run_main(main, argv: list[str], prog: str, usage_errors: tuple, errors: tuple) -> int:
    """Run ``main(argv)``; turn an exception into one line on stderr (from rank 0 only under torchrun)
    and the exit status: 2 for ``usage_errors``, 1 for ``errors`` and anything unexpected, 130 for ^C.
    With --debug or MINIMAMBA_DEBUG=1 the traceback is printed instead (same exit status)."""
    try:
        main(argv)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug_requested(argv):
            traceback.print_exc()
        elif int(os.environ.get("RANK", "0")) == 0:
            known = isinstance(e, usage_errors + errors)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not known:
                message = f"{type(e).__name__}: {message} (--debug shows the traceback)"
            print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, usage_errors) else 1


def choose_threads(requested: int, device: torch.device | str, n_params: int) -> int | None:
    """One policy for training and sampling: ``requested`` if > 0; otherwise, on the CPU, 1 thread for a
    model under 100M parameters (its matrices are too small to share out: on a busy 2-core machine
    sampling ran 10-50x faster on 1 thread than on torch's default), else torch's default (None)."""
    if requested > 0:
        return requested
    if torch.device(device).type == "cpu" and n_params < SMALL_MODEL:
        return 1
    return None


def set_threads(requested: int, device, n_params: int) -> None:
    n = choose_threads(requested, device, n_params)
    if n is not None:
        torch.set_num_threads(n)
