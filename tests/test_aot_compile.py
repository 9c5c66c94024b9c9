"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (see fast/aot.py)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    from minimamba_moe.fast import aot

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-m", "minimamba_moe.fast.aot", str(arch)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in aot.ARCHS]  # one process per arch: the compiles run in parallel
    outputs = [p.communicate(timeout=600) for p in procs]
    for arch, p, (out, err) in zip(aot.ARCHS, procs, outputs):
        assert p.returncode == 0, f"AOT compile for sm_{arch} failed:\n{out}\n{err[-4000:]}"
    stdout = "".join(out for out, _ in outputs)
    compiled = stdout.strip().splitlines()
    expected = sum(len(__import__(f"minimamba_moe.fast.{m}", fromlist=["AOT_SPECS"]).AOT_SPECS)
                   for m in aot.KERNEL_MODULES) * len(aot.ARCHS)
    assert expected > 0, "no kernel registered in fast/aot.py KERNEL_MODULES"
    assert len(compiled) == expected, f"compiled {len(compiled)} of {expected} kernel variants:\n{stdout}"
