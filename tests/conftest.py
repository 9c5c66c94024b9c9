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


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Small models and single-token steps: on a shared 2-core machine, intra-op threads only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory):
    """A small trained byte-level checkpoint (tests/helpers.py train_tiny), shared by the evaluation tests."""
    from tests.helpers import train_tiny

    path = tmp_path_factory.mktemp("trained") / "ckpt"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the one_thread fixture
        with torch.random.fork_rng():
            train_tiny(path)
    finally:
        torch.set_num_threads(threads)
    return path
