"""Workload models shared by the benchmarks (and usable from tests).

``gpt(...)``: a GPT-style decoder (pre-LayerNorm blocks, causal self-attention,
GELU MLP, tied embeddings) - the overhead benchmark's default is 6 blocks,
d=256, 4 heads, sequence 128, vocab 256. ``mlp(...)``: Linear+ReLU layers.
``init_mlp(...)``: a stack with a chosen activation and initialization (the
diagnosis benchmarks and tests).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d: int, heads: int, pre_ln: bool = True) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    """A small GPT-style language model; ``forward(idx) -> logits (B, T, vocab)``."""

    def __init__(self, vocab: int = 256, d: int = 256, heads: int = 4, layers: int = 6, seq: int = 128, pre_ln: bool = True) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, pre_ln) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(**kwargs: int) -> GPT:
    return GPT(**kwargs)


def gpt_batch(batch: int = 8, seq: int = 128, vocab: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def gpt_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def mlp(width: int = 128, layers: int = 7, out: int = 10) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def init_mlp(depth: int, act: str, init: str, width: int = 64, ln: bool = False, scale: float = 1.0,
             out: int = 10, fan_in: int = 64) -> nn.Sequential:
    """``depth`` Linear layers with ``act`` ("relu", "sigmoid", "tanh") and LayerNorm (``ln``) after all but the last.

    ``init``: "xavier" or "kaiming" (normal, zero biases) or anything else for PyTorch's default;
    ``scale`` multiplies the hidden weights after it.
    """
    mods: list[nn.Module] = []
    fan = fan_in
    for _ in range(depth - 1):
        lin = nn.Linear(fan, width)
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        elif init == "kaiming":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            lin.weight.mul_(scale)
        mods.append(lin)
        if ln:
            mods.append(nn.LayerNorm(width))
        mods.append({"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[act])
        fan = width
    mods.append(nn.Linear(fan, out))
    return nn.Sequential(*mods)
