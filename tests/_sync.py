"""Counting device-to-host transfers in tests (the Watch's one-sync-per-step contract)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from gradwatch.norms import MeasurePlan

TRANSFERS = ("cpu", "item", "tolist", "numpy", "__bool__", "__float__")


@contextlib.contextmanager
def count_host_transfers(monkeypatch: pytest.MonkeyPatch, accelerator_path: bool = True) -> Iterator[dict[str, int]]:
    """Count calls of ``Tensor.cpu/item/tolist/numpy/__bool__/__float__`` inside the block.

    ``packed.cpu().numpy()`` counts 2 (one transfer, then a free view on the host).
    ``accelerator_path``: the Watch takes the one-transfer path of a model on an accelerator
    (on the CPU it otherwise reads each norm in place, where there is nothing to transfer).
    """
    calls = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in TRANSFERS}
    if accelerator_path:
        monkeypatch.setattr(MeasurePlan, "read_on_cpu", False)

    def counting(name: str):
        def wrapper(self, *args, **kwargs):
            calls["n"] += 1
            return originals[name](self, *args, **kwargs)

        return wrapper

    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        monkeypatch.undo()
