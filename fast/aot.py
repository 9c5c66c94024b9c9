"""Ahead-of-time compile every Triton kernel of fast/ for real GPUs, no GPU needed.

    python -m minimamba_moe.fast.aot            # compiles for sm_80 and sm_90, prints one line per kernel
    python -m minimamba_moe.fast.aot 90         # only sm_90 (the test runs one process per arch, in parallel)

Each kernel module lists what its launchers actually launch in ``AOT_SPECS``: tuples of
(kernel, signature, constexprs), where signature maps every argument to a Triton type
("*fp32", "*bf16", "i32", "fp32", "constexpr", ...) and constexprs holds the block sizes the
launcher uses. The test suite runs this module in a subprocess (the interpreter, which the tests
use for running kernels on CPU tensors, cannot compile), so code that the interpreter accepts but
the compiler rejects cannot land.
"""

from __future__ import annotations

import importlib
import os
import sys

# Modules of fast/ that define Triton kernels and an AOT_SPECS list.
KERNEL_MODULES: list[str] = [
    "sinkhorn_triton",  # fused Sinkhorn
    "moe_triton_fwd",  # MoE grouped GEMMs, forward
    "moe_triton_bwd",  # MoE grouped GEMMs, backward
    "scan_triton",  # selective scan, forward
    "scan_triton_bwd",  # selective scan, backward
    "state_update_triton",  # selective scan, decode step
]

ARCHS = (80, 90)


def compile_all(archs=ARCHS) -> list[str]:
    """Compile every registered kernel for each arch; returns one description per compiled kernel."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("Unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled.")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"minimamba_moe.fast.{name}")
        for kernel, signature, constexprs in module.AOT_SPECS:
            for arch in archs:
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                    target=GPUTarget("cuda", arch, 32),
                )
                assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin for sm_{arch}"
                consts = ", ".join(f"{k}={v}" for k, v in constexprs.items())
                done.append(f"{name}.{kernel.__name__} sm_{arch} [{consts}] ptx {len(compiled.asm['ptx'])} chars")
    return done


if __name__ == "__main__":
    lines = compile_all(tuple(int(a) for a in sys.argv[1:]) or ARCHS)
    print("\n".join(lines))
    print(f"compiled {len(lines)} kernel variants", file=sys.stderr)
