"""``python -m minimamba_moe.fast.aot``: see check.py."""

from .check import main

main()
