"""Compile-time checks of fast/'s Triton kernels, without a GPU: tooling, not kernels.

    launch_capture.py   records every launch the fast ops make, run on meta tensors
    check.py            compiles each recorded variant for sm_80 / sm_90 and checks it fits

``python -m minimamba_moe.fast.aot [--quick] [80 90]`` runs the check; tests/test_aot_compile.py,
tests/test_offsets.py and benchmarks/gpu_check.py use it. The kernels it checks are one folder up.
"""
