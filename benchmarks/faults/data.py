"""Tasks the benchmark trains on: small, offline, and learnable in a few hundred steps.

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, shipped inside
  scikit-learn, no download), pixels scaled to [0, 1]; 1500 for training, the
  rest held out. Flat ``(B, 64)`` for MLPs, ``(B, 1, 8, 8)`` for CNNs.
- ``arith``: integer sequences ``x_t = (x_0 + k t) mod V`` with ``k`` drawn per
  sequence from {1, 2, 3}; next-token prediction needs two tokens of context
  (to read ``k``), so a GPT or an RNN must learn it; loss falls from ln V to near 0.

Every batch is a pure function of (seed, step): a replayed step sees the same
batch, and two runs of the benchmark see the same data.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

DIGITS_TRAIN = 1500


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def digits_batch(step: int, batch: int = 64, seed: int = 0, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch ``(x, y)``: x ``(B, 64)`` or ``(B, 1, 8, 8)``, y ``(B,)``."""
    x, y = _digits()
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(0, DIGITS_TRAIN, (batch,), generator=g)
    xb = x[idx]
    return (xb.view(-1, 1, 8, 8) if image else xb), y[idx]


def digits_test(image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits (297 images)."""
    x, y = _digits()
    xt = x[DIGITS_TRAIN:]
    return (xt.view(-1, 1, 8, 8) if image else xt), y[DIGITS_TRAIN:]


def arith_batch(step: int, batch: int = 32, seq: int = 16, vocab: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and next-token targets ``(B, T)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    x0 = torch.randint(0, vocab, (batch, 1), generator=g)
    k = torch.randint(1, 4, (batch, 1), generator=g)
    t = torch.arange(seq + 1).view(1, -1)
    idx = (x0 + k * t) % vocab  # (B, T+1)
    return idx[:, :-1], idx[:, 1:]


def one_hot(idx: torch.Tensor, vocab: int = 16) -> torch.Tensor:
    """Float one-hot inputs ``(B, T, V)`` (the RNN family reads floats, so a batch can hold NaN)."""
    return F.one_hot(idx, vocab).float()
