"""Ahead-of-time compile what fast/'s Triton launchers launch, for sm_80 and sm_90, and check it fits.

    python -m minimamba_moe.fast.aot              # every captured variant, sm_80 and sm_90
    python -m minimamba_moe.fast.aot 90           # only sm_90 (the test runs one process per arch)
    python -m minimamba_moe.fast.aot --quick 90   # one variant per kernel, dtype and constexprs

fast/launch_capture.py runs every fast op on meta tensors at gpu_check's shapes (small ones and
the papers' sizes) and as the model calls them, recording each ``kernel[grid](...)`` with its
arguments specialised as Triton's JIT does. Launches that compile identically (same kernel,
signature, constants, divisibility hints and options) are one variant; each is compiled here with
``triton.compile`` for each arch (no GPU needed) and checked for the failures the interpreter, which
the tests use on CPU, cannot show:

    compile   a cubin comes out (code the interpreter accepts and the compiler rejects cannot land)
    shared    the kernel's shared memory <= the arch's per-block opt-in maximum, 166912 B (163 KiB)
              on sm_80 and 232448 B (227 KiB) on sm_90 (CUDA C++ Programming Guide, technical
              specifications per compute capability); above it the first launch raises OutOfResources
    grid      x <= 2^31 - 1, y and z <= 65535 (the same table); above them the launch fails
    offsets   no tensor argument has 2^31 elements or more: the kernels compute offsets in int32
              (program ids times i32 sizes and strides), which would wrap past that

Registers need no check: at num_warps <= 8 even 255 registers a thread fit an SM's 64K. Each line
printed gives a variant's shared memory and compile seconds: the GPU run JIT-compiles the same
variants on first use, so their sum estimates that cost. ``--quick`` compiles one variant per
(kernel, pointer dtypes, constexprs, options) and the rest by their launches' grid and size checks
only; the test suite uses it to stay within its time (the full run is for before a GPU session).
The test runs this module in a subprocess: the interpreter, chosen at import, cannot compile.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

from .launch_capture import Launch, capture

ARCHS = (80, 90)
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes per block, opt-in maximum
GRID_LIMIT = (2**31 - 1, 65535, 65535)
MAX_NUMEL = 2**31 - 1  # int32 offsets


def launch_problems(launch: Launch) -> list[str]:
    """What would fail at this launch before any code runs: grid limits, 32-bit offsets."""
    out = [f"grid {axis} = {g} > {lim}" for axis, g, lim in zip("xyz", launch.grid, GRID_LIMIT) if g > lim]
    out += [f"{name} has {n} elements: int32 offsets wrap" for name, n in launch.numel.items() if n > MAX_NUMEL]
    return [f"{launch.name} ({launch.op}): {p}" for p in out]


def shared_problem(name: str, shared: int, arch: int) -> str | None:
    limit = SHARED_LIMIT[arch]
    return f"{name} sm_{arch}: {shared} B of shared memory > {limit}" if shared > limit else None


def variants(launches: list[Launch], quick=False) -> dict:
    """Distinct compiles -> their launches, the one to compile first. quick: one per (kernel, pointer
    dtypes, constexprs, options), ignoring which ints are 1 or divisible by 16 and which pointers are
    aligned; its largest launch (the papers' sizes) is compiled."""
    out: dict = {}
    for launch in launches:
        key = launch.key()
        if quick:
            kept = tuple((a.name, a.type, a.value) for a in launch.args if a.type[0] == "*" or a.type == "constexpr")
            key = (*key[:2], kept, key[3])
        out.setdefault(key, []).append(launch)
    for group in out.values():
        group.sort(key=lambda g: -max(g.numel.values(), default=0))
    return out


def source(launch: Launch):
    """The ASTSource Triton's JIT would build for this launch, for the installed Triton."""
    from triton.compiler import ASTSource

    args = launch.args
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # Triton >= 3.3
        signature = {a.name: "constexpr" if a.const else a.type for a in args}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args) if a.aligned}
        return ASTSource(launch.kernel, signature, constexprs={a.name: a.value for a in args if a.const}, attrs=attrs)
    from triton.backends.compiler import AttrsDescriptor  # Triton 3.2: constants leave the signature

    signature = {a.name: "*i8" if a.type == "none" else a.type for a in args if a.type != "constexpr"}
    hints = {i: 16 if a.aligned else 1 for i, a in enumerate(args) if a.aligned or (a.const and a.value == 1)}
    return ASTSource(launch.kernel, signature, {a.name: a.value for a in args if a.const},
                     AttrsDescriptor.from_hints(hints))


def compile_variant(launch: Launch, arch: int) -> tuple[int, float]:
    """Compile for sm_<arch> -> (shared memory bytes, seconds); raises if no cubin comes out."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    compiled = triton.compile(source(launch), target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    seconds = time.perf_counter() - t0
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{launch.name}: no cubin for sm_{arch}")
    return int(compiled.metadata.shared), seconds


def describe(launch: Launch) -> str:
    dtypes = "/".join(sorted({a.type[1:] for a in launch.args if a.type.startswith("*")}))
    consts = " ".join(f"{a.name}={a.value}" for a in launch.args if a.const)
    opts = " ".join(f"{k}={v}" for k, v in sorted(launch.options.items()))
    return f"{launch.name} [{dtypes}] {consts} {opts}"


def run(archs=ARCHS, quick=False, out=None) -> list[str]:
    """Capture, check every launch, compile every variant; prints one line per compiled variant and
    returns the problems found (empty: all good)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("Unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled.")
    out = out or sys.stdout
    launches = capture()
    problems = [p for launch in launches for p in launch_problems(launch)]
    groups = variants(launches, quick)
    total = 0.0
    for arch in archs:
        for group in groups.values():
            launch = group[0]
            try:
                shared, seconds = compile_variant(launch, arch)
            except Exception as e:  # a compiler error is a finding, not a crash of the check
                problems.append(f"{describe(launch)} sm_{arch}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            total += seconds
            if (p := shared_problem(launch.name, shared, arch)) is not None:
                problems.append(f"{p} ({describe(launch)})")
            numel = max((n for g in group for n in g.numel.values()), default=0)
            grid = tuple(max(g.grid[i] for g in group) for i in range(3))
            print(f"sm_{arch} {describe(launch)} | shared {shared} B of {SHARED_LIMIT[arch]} | {seconds:.2f} s | "
                  f"{len(group)} launches, grid max {grid}, numel max {numel} | e.g. {launch.op}", file=out, flush=True)
    print(f"{len(launches)} launches, {len(groups)} variants x {len(archs)} archs compiled in {total:.1f} s; "
          f"{len(problems)} problems", file=sys.stderr)
    return problems


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Compile and check every captured Triton launch of fast/.")
    parser.add_argument("archs", nargs="*", type=int, choices=ARCHS, help="compute capabilities (default: all)")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel, dtype and constexprs")
    args = parser.parse_args()
    found = run(tuple(args.archs) or ARCHS, quick=args.quick)
    for problem in found:
        print("PROBLEM", problem, file=sys.stderr)
    sys.exit(1 if found else 0)
