"""Divergence caught early, healthy runs quiet (issue 17): steps to ``lr_too_high`` and false alarms.

Diverging runs: GPT-2 with Adam at lr 1.0 .. 0.01 on a learnable pattern (token
t+1 = token t + 1 mod V, random starts). Healthy runs at sane learning rates
(Adam 1e-3 / 3e-4, SGD 0.05): GPT-2, BERT (masked LM), Llama, an MLP on sklearn
digits, an LSTM language model. For each run the table gives the first step
``lr_too_high`` was raised (and by which signal), the first step the loss-trend
signal alone would have fired (``LossTrend`` over the run's losses: the update
ratio usually fires first), and the false alarms: findings of the codes this
issue changed (``lr_too_high``, ``exploding_gradients``, ``init_scale_too_large``)
on a run that should have none.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.divergence [--steps 150]
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnosis.trend import LossTrend

VOCAB, SEQ, BATCH = 100, 32, 8
CODES = ("lr_too_high", "exploding_gradients", "init_scale_too_large")


def pattern_batch(gen: torch.Generator) -> torch.Tensor:
    """(BATCH, SEQ) token ids counting up from a random start: a learnable next-token task."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    return (start + torch.arange(SEQ)) % VOCAB


def gpt2(layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=SEQ))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                      vocab_size=VOCAB, max_position_embeddings=SEQ))


class LstmLM(nn.Module):
    """Embedding -> 1-layer LSTM (or vanilla tanh RNN) -> Linear head over the vocabulary."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.lstm = cell(32, 64, batch_first=True)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(ids))[0])  # (B, T, V)


def lm_loss(model: nn.Module, kind: str, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The model's loss on one pattern batch (causal LM, masked LM, or a plain next-token head)."""
    if kind == "hf-causal":
        return model(input_ids=ids, labels=ids).loss
    if kind == "hf-masked":
        mask = torch.rand(ids.shape, generator=gen) < 0.15
        mask[:, 0] = True  # at least one masked token per row
        labels = ids.masked_fill(~mask, -100)
        return model(input_ids=ids.masked_fill(mask, 0), labels=labels).loss
    logits = model(ids[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def digits_mlp_run(opt_name: str, lr: float, steps: int) -> tuple[gw.Watch, list[float]]:
    """An MLP 64-128-128-10 on sklearn digits (standardized), minibatches of 64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    watch = gw.Watch(model, make_opt(opt_name, model, lr))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        watch.step(lambda: F.cross_entropy(model(x[idx]), y[idx]))
        losses.append(watch.history[-1].loss)
    watch.close()
    return watch, losses


def make_opt(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr) if name == "adam" else torch.optim.SGD(model.parameters(), lr=lr)


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "gpt2": (gpt2, "hf-causal"),
    "gpt2-4L": (lambda: gpt2(4), "hf-causal"),
    "llama": (llama, "hf-causal"),
    "bert": (bert, "hf-masked"),
    "lstm": (LstmLM, "plain"),
    "rnn-tanh": (lambda: LstmLM(nn.RNN), "plain"),
}


def lm_run(name: str, opt_name: str, lr: float, steps: int, seed: int = 0) -> tuple[gw.Watch, list[float]]:
    """Train ``name`` on the pattern task; (the closed Watch, the losses)."""
    torch.manual_seed(seed)
    build, kind = MODELS[name]
    model = build()
    watch = gw.Watch(model, make_opt(opt_name, model, lr))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = pattern_batch(gen)
        watch.step(lambda: lm_loss(model, kind, ids, gen))
        losses.append(watch.history[-1].loss)
    watch.close()
    return watch, losses


def trend_step(losses: list[float]) -> int | None:
    """The first step (1-based) on which the loss-trend signal alone holds."""
    trend = LossTrend()
    for step, loss in enumerate(losses, 1):
        if trend.observe(loss):
            return step
    return None


@dataclass
class Row:
    model: str
    opt: str
    lr: float
    diverging: bool
    first: int | None  # first lr_too_high step
    signal: str
    trend: int | None
    false_alarms: int
    loss_start: float
    loss_end: float


def measure(model: str, opt: str, lr: float, steps: int, diverging: bool) -> Row:
    """One run of the table."""
    watch, losses = digits_mlp_run(opt, lr, steps) if model == "mlp-digits" else lm_run(model, opt, lr, steps)
    ours = [f for f in watch.findings if f.code in CODES]
    lr_found = [f for f in ours if f.code == "lr_too_high"]
    first = lr_found[0] if lr_found else None
    tail = [v for v in losses[-10:] if math.isfinite(v)]
    return Row(model, opt, lr, diverging, first.step if first else None,
               first.evidence.get("signal", "?") if first else "-", trend_step(losses),
               0 if diverging else len(ours), losses[0], sum(tail) / len(tail) if tail else math.nan)


# "diverging" rows: lr far above the usual 1e-3 for Adam (the loss may still fall at 0.03, with updates that
# rewrite a third of the weights each step); lr_too_high is expected, the rows count no false alarms.
DIVERGING = [("gpt2", "adam", 1.0), ("gpt2-4L", "adam", 1.0), ("llama", "adam", 1.0), ("gpt2", "adam", 0.3),
             ("gpt2", "adam", 0.1), ("gpt2", "adam", 0.03), ("gpt2", "adam", 0.01)]
HEALTHY = [("gpt2", "adam", 1e-3), ("gpt2", "adam", 3e-4), ("gpt2-4L", "adam", 1e-3), ("bert", "adam", 1e-3),
           ("llama", "adam", 1e-3), ("llama", "adam", 3e-4), ("mlp-digits", "adam", 1e-3), ("mlp-digits", "sgd", 0.05),
           ("lstm", "adam", 1e-3), ("lstm", "adam", 3e-4), ("lstm", "sgd", 0.05),
           ("rnn-tanh", "adam", 1e-3), ("rnn-tanh", "sgd", 0.05)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per healthy run")
    parser.add_argument("--diverging-steps", type=int, default=40, help="steps per diverging run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("gradwatch").setLevel(logging.ERROR + 10)  # the table, not the findings' log lines
    print(f"{'model':<11} {'opt':<5} {'lr':>7}  {'kind':<9} {'lr_too_high':>11} {'signal':<13} {'trend':>5} "
          f"{'false':>5}  loss start -> end")
    for runs, diverging, steps in ((DIVERGING, True, args.diverging_steps), (HEALTHY, False, args.steps)):
        for model, opt, lr in runs:
            r = measure(model, opt, lr, steps, diverging)
            print(f"{r.model:<11} {r.opt:<5} {r.lr:>7g}  {'high lr' if diverging else 'healthy':<9} "
                  f"{r.first if r.first else '-':>11} {r.signal:<13} {r.trend if r.trend else '-':>5} "
                  f"{'-' if diverging else r.false_alarms:>5}  {r.loss_start:.3g} -> {r.loss_end:.3g}", flush=True)


if __name__ == "__main__":
    main()
