"""Shared test settings: small thread count, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GRADWATCH_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
