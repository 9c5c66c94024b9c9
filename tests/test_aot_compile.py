"""What fast/'s launchers launch compiles ahead of time for sm_80 and sm_90 and fits (see fast/aot/check.py).

The launches are captured on meta tensors (fast/aot/launch_capture.py); the compile runs in
subprocesses without TRITON_INTERPRET (the interpreter, chosen at import, cannot compile). The
checker itself is held to planted violations, and the capture's specialisation rules to Triton's.
"""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from minimamba_moe.fast.aot import check as aot  # noqa: E402
from minimamba_moe.fast.aot.launch_capture import Arg, Launch, capture, kernels, specialize, step_case  # noqa: E402


@pytest.fixture(scope="module")
def launches():
    return capture()


def test_every_kernel_of_fast_is_captured(launches):
    captured = {launch.name for launch in launches}
    missing = set(kernels()) - captured
    assert not missing, f"kernels of fast/ that no capture case launches: {sorted(missing)}"
    assert len(kernels()) >= 8, sorted(kernels())  # scan fwd/bwd, step, MoE x4, Sinkhorn


def test_a_case_that_reads_a_result_back_keeps_what_it_launched():
    """.item() cannot run on meta tensors: the case stops there, its launches so far are kept."""
    def reads_back():
        step_case(2, 40, torch.float32)
        torch.empty(1, device="meta").item()

    assert [launch.name for launch in capture([("reads back", reads_back, ())])] == ["_state_update_kernel"]
    with pytest.raises(ValueError):  # any other error still surfaces
        capture([("fails", lambda: int("x"), ())])


def test_captured_launches_are_within_grid_and_offset_limits(launches):
    problems = [p for launch in launches for p in aot.launch_problems(launch)]
    assert not problems, "\n".join(problems)
    assert any(launch.grid[0] >= 256 for launch in launches), "no paper-size launch captured"


def test_captured_launches_compile_for_sm80_and_sm90(launches):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-m", "minimamba_moe.fast.aot", "--quick", str(arch)], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in aot.ARCHS]  # one process per arch: the compiles run in parallel
    outputs = [p.communicate(timeout=900) for p in procs]
    expected = len(aot.variants(launches, quick=True))
    for arch, p, (out, err) in zip(aot.ARCHS, procs, outputs):
        assert p.returncode == 0, f"AOT check for sm_{arch} failed:\n{out}\n{err[-6000:]}"
        lines = out.strip().splitlines()
        assert len(lines) == expected and all(f"sm_{arch} " in line for line in lines), out
        # ptxas -v's figures for every variant: registers > 0, spills integers >= 0 (reported, not bounded)
        usage = [re.search(r"\| regs (\d+), spill stores (\d+) B, loads (\d+) B \|", line) for line in lines]
        assert all(u is not None and int(u[1]) > 0 for u in usage), out


def fake(grid=(1, 1, 1), numel=None):
    return Launch(kernel=SimpleNamespace(fn=SimpleNamespace(__name__="_fake_kernel", __module__="fake")),
                  args=(Arg("x_ptr", "*fp32", False, None, True),), options={"num_warps": 4}, grid=grid,
                  numel=numel or {"x_ptr": 10}, op="planted")


@pytest.mark.parametrize("grid", [(2**31, 1, 1), (1, 70000, 1), (1, 1, 65536)])
def test_checker_flags_a_grid_over_cuda_limits(grid):
    assert len(aot.launch_problems(fake(grid))) == 1
    assert not aot.launch_problems(fake((2**31 - 1, 65535, 65535)))


def test_checker_flags_tensors_needing_64_bit_offsets():
    assert len(aot.launch_problems(fake(numel={"x_ptr": 2**31}))) == 1
    assert not aot.launch_problems(fake(numel={"x_ptr": 2**31 - 1}))


@pytest.mark.parametrize("arch,limit", [(80, 166912), (90, 232448)])
def test_checker_flags_shared_memory_over_the_opt_in_limit(arch, limit):
    assert aot.shared_problem("k", limit + 1, arch) is not None
    assert aot.shared_problem("k", limit, arch) is None


def test_run_reports_planted_violations(monkeypatch):
    """run() wires the checks: a planted grid and a planted shared-memory figure both come out."""
    monkeypatch.setattr(aot, "capture", lambda: [fake((1, 70000, 1))])
    monkeypatch.setattr(aot, "compile_variant",
                        lambda launch, arch: (300000, 0.01, dict(regs=40, spill_stores=0, spill_loads=0)))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lines = []
    problems = aot.run((80, 90), out=SimpleNamespace(write=lines.append, flush=lambda: None))
    assert sum("70000" in p for p in problems) == 1, problems
    assert sum("300000 B" in p for p in problems) == 2, problems  # one per arch
    assert sum("sm_" in line for line in lines) == 2, lines


def test_ptxas_log_is_parsed():
    log = ("ptxas info    : Compiling entry function '_scan_bwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _scan_bwd_kernel\n"
           "    1560 bytes stack frame, 1596 bytes spill stores, 1540 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1560 bytes cumulative stack size\n")
    assert aot.parse_ptxas_log(log) == dict(regs=255, spill_stores=1596, spill_loads=1540)
    with pytest.raises(RuntimeError, match="no register"):
        aot.parse_ptxas_log("ptxas fatal : unknown option")


def _kernel(x_ptr, n, s, BLOCK: tl.constexpr):
    pass


def test_specialisation_matches_triton():
    """The capture's Arg for each value agrees with the installed Triton's own specialisation."""
    base = torch.empty(64, device="meta")
    values = [1, 0, 16, 17, -5, 2**31, 2**40, 2**63, 1.5, base, base[1:], base[4:],
              torch.empty(8, dtype=torch.bfloat16, device="meta")[8:], torch.empty(3, dtype=torch.int64, device="meta")]
    try:
        from triton._C.libtriton import native_specialize_impl  # Triton >= 3.4
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        backend = type(make_backend(GPUTarget("cuda", 90, 32)))

        def triton_spec(v):
            ty, key = native_specialize_impl(backend, v, False, True, True)
            return (ty, key) if ty != "constexpr" else ("const", 1)
    except ImportError:  # Triton 3.2: the divisibility / equal-to-1 keys of AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor
        from triton.runtime.jit import mangle_type

        def triton_spec(v):
            key = AttrsDescriptor.get_property_key(v, True)
            return ("const", 1) if key == "1" else (mangle_type(v), "D" if key == "D" else "")
    for v in values:
        _, (arg, *_), _ = specialize(SimpleNamespace(fn=_kernel), (v, 3, 5), {"BLOCK": 4})
        mine = ("const", 1) if arg.const else (arg.type, "D" if arg.aligned else "")
        want = triton_spec(v)
        want = (want[0], want[1] or "") if want[0] != "fp32" else ("fp32", "")
        assert mine == want, f"{v!r}: capture says {mine}, Triton {want}"
