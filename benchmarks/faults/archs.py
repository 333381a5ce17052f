"""The five architecture families of the fault benchmark, tiny enough for 2 CPU cores.

- ``mlp``: ``nn.Sequential`` of Linear + activation (ReLU, GELU, sigmoid, tanh,
  none), optional LayerNorm, on flat digits.
- ``cnn``: 3x3 convolutions on 8x8 digits, with or without BatchNorm, global
  average pooling, a linear head.
- ``gpt``: :class:`benchmarks.models.GPT` (pre-LN, or post-LN with
  ``pre_ln=False``) on the ``arith`` sequences; :class:`ManualAttnGPT` swaps in
  a hand-written masked softmax attention (a submodule ``blocks.N.core``).
- ``rnn``: LSTM / GRU (``nn.LSTM`` / ``nn.GRU``) on one-hot ``arith`` sequences.
- ``resnet``: residual MLP blocks ``x + branch(x)`` (optional LayerNorm), and a
  residual CNN with BatchNorm.

Module names are stable (``features.3``, ``blocks.2.branch.0``): scenarios
name the module a finding must point at.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks import models

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "linear": nn.Identity,
}


# ----- initialization helpers ----------------------------------------------------------
def init_linear_(model: nn.Module, how: str, gain: float = 1.0) -> nn.Module:
    """Re-initialize every Linear/Conv weight: ``"kaiming"``, ``"xavier"``, ``"orthogonal"``, or ``"default"``; then x gain."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            with torch.no_grad():
                if how == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif how == "xavier":
                    nn.init.xavier_normal_(m.weight)
                elif how == "orthogonal":
                    nn.init.orthogonal_(m.weight)
                if m.bias is not None and how != "default":
                    m.bias.zero_()
                m.weight.mul_(gain)
    return model


# ----- mlp ----------------------------------------------------------------------------
class NaiveSoftplus(nn.Module):
    """``log(1 + exp(x))`` written by hand: exp overflows float32 above x ~ 88.7 (F.softplus does not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(1 + torch.exp(x))


def mlp(depth: int, width: int = 32, act: str = "relu", norm: bool = False, in_dim: int = 64, out: int = 10,
        make_act: Callable[[], nn.Module] | None = None) -> nn.Sequential:
    """``depth`` hidden Linear layers (+ LayerNorm) + activation, then a Linear head.

    Module names: hidden layer i is ``str(k*i)`` (k = 2, or 3 with LayerNorm), its
    activation the next index; the head is the last index.
    """
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        mods.append(nn.Linear(d, width))
        if norm:
            mods.append(nn.LayerNorm(width))
        mods.append(make_act() if make_act is not None else ACTIVATIONS[act]())
        d = width
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


class GroupNormFeature(nn.Module):
    """Adds the L2 norm of a learned projection of a pixel group as a feature, written ``sqrt(sum(z**2))``.

    For a blank group z = 0: the forward is 0 (finite) but sqrt's derivative is
    inf and pow's is 0, so the backward makes 0 * inf = NaN (``torch.linalg.vector_norm``
    guards this case; the hand-written norm does not).
    """

    def __init__(self, start: int, stop: int, dim: int = 8) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.proj = nn.Linear(stop - start, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 65)
        z = self.proj(x[:, self.start:self.stop])  # (B, dim)
        energy = torch.sqrt(z.pow(2).sum(-1, keepdim=True))
        return torch.cat([x, energy], dim=-1)


class WithAux(nn.Module):
    """A body MLP plus an auxiliary head whose output is detached: ``aux`` never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(3, 32, "relu", out=32)
        self.aux = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        hint = self.aux(x).detach()  # the bug: meant to train aux jointly
        return self.head(F.relu(h + 0.1 * hint))


class Standardize(nn.Module):
    """Per-example standardization ``(x - mean) / std`` with no epsilon: a blank input is 0/0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(1, keepdim=True)
        std = flat.std(1, keepdim=True)
        return ((flat - mean) / std).view_as(x)


class BatchStandardize(nn.Module):
    """Standardize each feature over the batch, ``(x - mean_0) / std_0``, with no epsilon.

    A batch whose examples are all identical (a loader that repeats one sample)
    has std 0 in every feature: 0/0.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True)


# ----- cnn ----------------------------------------------------------------------------
class CNN(nn.Module):
    """``depth`` 3x3 convs (+ BatchNorm) + activation on (B, 1, 8, 8), global average pooling, a Linear head."""

    def __init__(self, depth: int = 3, channels: int = 8, bn: bool = True, act: str = "relu", standardize: bool = False,
                 side_branch: bool = False) -> None:
        super().__init__()
        mods: list[nn.Module] = [Standardize()] if standardize else []
        c = 1
        for _ in range(depth):
            mods.append(nn.Conv2d(c, channels, 3, padding=1))
            if bn:
                mods.append(nn.BatchNorm2d(channels))
            mods.append(ACTIVATIONS[act]())
            c = channels
        self.features = nn.Sequential(*mods)
        self.side = nn.Conv2d(1, channels, 3, padding=1) if side_branch else None
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, C, 8, 8)
        if self.side is not None:
            with torch.no_grad():  # the bug: a trainable branch computed under no_grad
                side = self.side(x)
            h = h + 0.1 * side
        return self.head(h.mean((2, 3)))


# ----- gpt ----------------------------------------------------------------------------
def gpt(layers: int = 2, pre_ln: bool = True, d: int = 32, heads: int = 2, vocab: int = 16, seq: int = 16) -> models.GPT:
    return models.GPT(vocab=vocab, d=d, heads=heads, layers=layers, seq=seq, pre_ln=pre_ln)


class CausalSoftmax(nn.Module):
    """Hand-written causal attention ``softmax(q k^T / sqrt(d) masked) v``.

    ``diagonal`` is the first masked diagonal of ``torch.triu``: 1 is correct
    (a query sees itself); 0 is the classic off-by-one that masks the diagonal
    too, so the first query sees no key at all: softmax over a row of -inf is NaN.
    """

    def __init__(self, diagonal: int = 1) -> None:
        super().__init__()
        self.diagonal = diagonal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, H, T, C/H)
        T = q.size(-2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, T)
        masked = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=self.diagonal)
        scores = scores.masked_fill(masked, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class ManualAttnBlock(models.Block):
    def __init__(self, d: int, heads: int, diagonal: int) -> None:
        super().__init__(d, heads, pre_ln=True)
        self.core = CausalSoftmax(diagonal)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = self.core(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ManualAttnGPT(models.GPT):
    """:class:`benchmarks.models.GPT` with :class:`CausalSoftmax` attention (module ``blocks.N.core``)."""

    def __init__(self, layers: int = 2, diagonal: int = 1, d: int = 32, heads: int = 2, vocab: int = 16, seq: int = 16) -> None:
        super().__init__(vocab=vocab, d=d, heads=heads, layers=layers, seq=seq)
        self.blocks = nn.ModuleList(ManualAttnBlock(d, heads, diagonal) for _ in range(layers))


class ValueHeadGPT(models.GPT):
    """GPT with a value head that is built but never called in forward: ``value_head`` never gets a gradient."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.value_head = nn.Linear(kwargs.get("d", 256), 1)  # the bug: forgotten in forward


class DetachedPosGPT(models.GPT):
    """GPT whose positional embedding is added detached: ``pos`` never receives a gradient."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device)).detach()  # the bug
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ----- rnn ----------------------------------------------------------------------------
class SeqRNN(nn.Module):
    """One-hot inputs (B, T, V) -> ``nn.LSTM``/``nn.GRU`` -> optional tanh projection -> logits (B, T, V).

    ``encoder=True`` stacks a first recurrent layer (``encoder``) whose output is
    detached before the second (the truncated-BPTT-across-modules bug).
    """

    def __init__(self, kind: str = "lstm", vocab: int = 16, hidden: int = 32, proj_tanh: bool = False,
                 encoder: bool = False) -> None:
        super().__init__()
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.encoder = cell(vocab, hidden, batch_first=True) if encoder else None
        self.rnn = cell(hidden if encoder else vocab, hidden, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if proj_tanh else None
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            x, _ = self.encoder(x)
            x = x.detach()  # the bug
        h, _ = self.rnn(x)  # (B, T, H)
        if self.proj is not None:
            h = self.proj(h)
        return self.head(h)


# ----- resnet -------------------------------------------------------------------------
class LogIntensity(nn.Module):
    """Log-intensity features ``where(h > 0, log(h), 0)`` of ``h = gain * x`` (a learnable per-pixel gain).

    The forward is finite (blank pixels give 0), but the masked branch still
    runs: log's backward divides its (zero) incoming gradient by h = 0, 0/0 =
    NaN, and the gain's gradient becomes NaN - the ``torch.where`` NaN-gradient trap.
    """

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.gain
        return torch.where(h > 0, torch.log(h), torch.zeros_like(h))


class Residual(nn.Module):
    def __init__(self, width: int, norm: bool, act: str = "relu", detach: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(width)] if norm else []
        layers += [nn.Linear(width, width), ACTIVATIONS[act](), nn.Linear(width, width)]
        self.branch = nn.Sequential(*layers)
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        return x + (y.detach() if self.detach else y)


class ResMLP(nn.Module):
    """Optional input module ``pre``, ``stem`` Linear, ``blocks`` residual blocks, final LayerNorm (when ``norm``), ``head``."""

    def __init__(self, blocks: int = 4, width: int = 32, norm: bool = True, detach_block: int | None = None,
                 pre: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = pre
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Residual(width, norm, detach=(i == detach_block)) for i in range(blocks))
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.pre(x) if self.pre is not None else x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class ResCNNBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    """A small ResNet on (B, 1, 8, 8): stem conv + BN, ``blocks`` basic blocks, pooling, head."""

    def __init__(self, blocks: int = 3, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*(ResCNNBlock(c) for _ in range(blocks)))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))
