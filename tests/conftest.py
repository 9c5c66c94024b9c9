"""Shared test settings.

Hypothesis profiles, picked with the environment variable ``HYPOTHESIS_PROFILE``:

- ``ci`` (default): derandomized, few examples per property, so the suite stays fast and repeatable.
- ``thorough``: many random examples, for a deep run before a release
  (``HYPOTHESIS_PROFILE=thorough pytest -m "slow or not slow"``).
"""

import os

# Without a GPU, Triton kernels can only run in its interpreter, which must be chosen before
# triton is first imported. (fast/aot/check.py compiles the same kernels for real GPUs in a subprocess.)
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(min(2, torch.get_num_threads()))
