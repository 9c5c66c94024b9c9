"""Shared test settings.

Hypothesis profiles, picked with the environment variable ``HYPOTHESIS_PROFILE``:

- ``ci`` (default): derandomized, few examples per property, so the suite stays fast and repeatable.
- ``thorough``: many random examples, for a deep run before a release
  (``HYPOTHESIS_PROFILE=thorough pytest -m "slow or not slow"``).

Optional extras: a test that needs one is marked ``@pytest.mark.needs_extra("plots")`` (several names:
all of them). Where an extra is not installed (the README's set-up installs only ``dev``), the test is
skipped with one line naming the extra and its install command; with MINIMAMBA_REQUIRE_EXTRAS=1 (as
``.ci/run`` sets once it has installed them) that skip is a failure. Tests never importorskip an extra's
module themselves (tests/test_readme.py holds that), so no skip of theirs can hide a failure. A test
marked ``with_extra("plots")`` asserts one thing without the extra and more with it; it is never skipped,
and ``.ci/run`` runs it again once the extras are installed.
"""

import os

# Without a GPU, Triton kernels can only run in its interpreter, which must be chosen before
# triton is first imported. (fast/aot/check.py compiles the same kernels for real GPUs in a subprocess.)
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.helpers import EXTRAS, missing_from_extra  # noqa: E402

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


def why_not_here(item) -> str | None:
    """Why a test marked needs_extra cannot run here (the first extra not installed), or None."""
    for mark in item.iter_markers("needs_extra"):
        for extra in mark.args:
            missing = missing_from_extra(extra)
            if missing:
                return f"needs the `{extra}` extra ({', '.join(missing)}): pip install -e '.[{extra}]'"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in [*item.iter_markers("needs_extra"), *item.iter_markers("with_extra")]:
            unknown = [e for e in mark.args if e not in EXTRAS]
            if not mark.args or unknown:
                raise pytest.UsageError(f"{item.nodeid}: {mark.name} names no extra or an unknown one {unknown}; "
                                        f"the extras are {sorted(EXTRAS)}")
    if os.environ.get("MINIMAMBA_REQUIRE_EXTRAS") == "1":
        return  # pytest_runtest_setup fails them instead
    for item in items:
        why = why_not_here(item)
        if why:
            item.add_marker(pytest.mark.skip(reason=why))  # reported at the test's own line


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test is set up
def pytest_runtest_setup(item):
    why = os.environ.get("MINIMAMBA_REQUIRE_EXTRAS") == "1" and why_not_here(item)
    if why:  # otherwise the test was marked skip at collection
        pytest.fail(f"MINIMAMBA_REQUIRE_EXTRAS=1 but this test {why}", pytrace=False)


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
