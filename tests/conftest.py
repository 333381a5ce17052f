"""Shared test settings: small thread count, deterministic seeds."""

from __future__ import annotations

try:  # setuptools before anything imports distutils: inductor imports setuptools later, which then fails
    import setuptools  # noqa: F401  (its distutils shim asserts when distutils came first)
except ImportError:  # pragma: no cover
    pass

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GRADWATCH_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide AcceleratorState: a test's Accelerator(mixed_precision=...) must not
    meet the one an earlier test (a README example) made. Reset after each test that imported accelerate."""
    yield
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
