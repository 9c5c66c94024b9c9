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
    proc = subprocess.run(
        [sys.executable, "-m", "minimamba_moe.fast.aot"], cwd=root, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    compiled = proc.stdout.strip().splitlines()
    expected = sum(len(__import__(f"minimamba_moe.fast.{m}", fromlist=["AOT_SPECS"]).AOT_SPECS)
                   for m in aot.KERNEL_MODULES) * len(aot.ARCHS)
    assert expected > 0, "no kernel registered in fast/aot.py KERNEL_MODULES"
    assert len(compiled) == expected, f"compiled {len(compiled)} of {expected} kernel variants:\n{proc.stdout}"
