"""Ahead-of-time compile what fast/'s Triton launchers launch, for sm_80 and sm_90, and check it fits.

    python -m minimamba_moe.fast.aot              # every captured variant, sm_80 and sm_90
    python -m minimamba_moe.fast.aot 90           # only sm_90 (the test runs one process per arch)
    python -m minimamba_moe.fast.aot --quick 90   # one variant per kernel, dtype and constexprs

fast/aot/launch_capture.py runs every fast op on meta tensors at gpu_check's shapes (small ones and
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
printed gives a variant's shared memory, its registers per thread and spill bytes (stores, loads:
local memory traffic when 255 registers are not enough) as ``ptxas -v`` reports them for that arch,
reported, not checked (the scan backward spills today), and compile seconds: the GPU run JIT-compiles the same
variants on first use, so their sum estimates that cost. ``--quick`` compiles one variant per
(kernel, pointer dtypes, constexprs, options) and the rest by their launches' grid and size checks
only; the test suite uses it to stay within its time (the full run is for before a GPU session).
The test runs this module in a subprocess: the interpreter, chosen at import, cannot compile.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
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


def ptxas_usage(ptx: str, arch: int, fp_fusion=True) -> dict:
    """Registers per thread and spill bytes of ``ptx`` for sm_<arch> as ``ptxas -v`` reports them:
    -> {regs, spill_stores, spill_loads}. Triton's own ptxas run (make_cubin) passes -v too but
    keeps the log only when it compiles (not on a cache hit), so this runs the same bundled ptxas
    again on the PTX Triton produced, with make_cubin's flags that change the allocation: the
    --gpu-name (sm_90a for 90), --fmad=false without fp fusion, and --regAllocOptLevel=2 where the
    installed Triton passes it (a ptxas 13 workaround; it moves the scan backward's spills by ~7 %)."""
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):  # Triton >= 3.5: a per-arch ptxas (the Blackwell one for >= 90)
        ptxas = nv.get_ptxas(arch).path
    elif hasattr(nv, "knobs"):  # Triton 3.3, 3.4
        ptxas = nv.knobs.nvidia.ptxas.path
    else:  # Triton 3.2
        ptxas = nv._path_to_binary("ptxas")[0]
    gpu = nv.sm_arch_from_capability(arch) if hasattr(nv, "sm_arch_from_capability") else f"sm_{arch}"
    flags = ["-lineinfo", "-v"] + ([] if fp_fusion else ["--fmad=false"])
    flags += ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin) else []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, *flags, f"--gpu-name={gpu}", src, "-o", src + ".o"], capture_output=True,
                             text=True, check=True).stderr
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    """``ptxas -v``'s "N bytes spill stores, M bytes spill loads" and "Used R registers" -> dict."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v printed no register or spill figures:\n{log[-2000:]}")
    return dict(regs=int(regs[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]))


def compile_variant(launch: Launch, arch: int) -> tuple[int, float, dict]:
    """Compile for sm_<arch> -> (shared memory bytes, seconds, ptxas_usage); raises if no cubin comes out."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    compiled = triton.compile(source(launch), target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    seconds = time.perf_counter() - t0
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{launch.name}: no cubin for sm_{arch}")
    fp_fusion = getattr(compiled.metadata, "enable_fp_fusion", True)
    return int(compiled.metadata.shared), seconds, ptxas_usage(compiled.asm["ptx"], arch, fp_fusion)


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
                shared, seconds, use = compile_variant(launch, arch)
            except Exception as e:  # a compiler error is a finding, not a crash of the check
                problems.append(f"{describe(launch)} sm_{arch}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            total += seconds
            if (p := shared_problem(launch.name, shared, arch)) is not None:
                problems.append(f"{p} ({describe(launch)})")
            numel = max((n for g in group for n in g.numel.values()), default=0)
            grid = tuple(max(g.grid[i] for g in group) for i in range(3))
            print(f"sm_{arch} {describe(launch)} | shared {shared} B of {SHARED_LIMIT[arch]} | regs {use['regs']}, "
                  f"spill stores {use['spill_stores']} B, loads {use['spill_loads']} B | {seconds:.2f} s | "
                  f"{len(group)} launches, grid max {grid}, numel max {numel} | e.g. {launch.op}", file=out, flush=True)
    print(f"{len(launches)} launches, {len(groups)} variants x {len(archs)} archs compiled in {total:.1f} s; "
          f"{len(problems)} problems", file=sys.stderr)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile and check every captured Triton launch of fast/.")
    parser.add_argument("archs", nargs="*", type=int, choices=ARCHS, help="compute capabilities (default: all)")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel, dtype and constexprs")
    args = parser.parse_args()
    found = run(tuple(args.archs) or ARCHS, quick=args.quick)
    for problem in found:
        print("PROBLEM", problem, file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
