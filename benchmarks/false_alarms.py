"""Count false alarms (warning/error findings) on healthy small Hugging Face models.

Trains GPT-2 (NewGELU), BERT (GELU) and Llama (SiLU/SwiGLU) from random init on
random token batches with AdamW and ``watch.step(closure)``; every warning or
error finding on these runs is a false alarm. Also probes each model once
(``gw.probe``) and counts the probe's warnings.

Also a converged run: 30 decaying steps, then 200 steps at 0 (or 1e-9) with
3.7e-9 blips every 7 steps, with and without ``on_spike="skip"``: every
``loss_spike`` there is a false alarm.

Usage::

    python -m benchmarks.false_alarms --steps 100 [--sample-every 10]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

import gradwatch as gw


def gpt2(initializer_range: float = 0.02) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=64, n_head=2, vocab_size=100, n_positions=64,
                                      initializer_range=initializer_range))


def gpt2_wide_init() -> torch.nn.Module:
    """GPT-2 at 20x its init scale: its GELU inputs reach |x| ~ 2 (init_scale_too_large is right, saturation is not)."""
    return gpt2(initializer_range=0.4)


def bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=2,
                                      intermediate_size=128, vocab_size=100, max_position_embeddings=64))


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                        max_position_embeddings=64))


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"gpt2": gpt2, "bert": bert, "llama": llama,
                                                   "gpt2-wide-init": gpt2_wide_init}


def run(name: str, steps: int, sample_every: int, run_dir: Path) -> tuple[list[gw.Finding], list[gw.Finding]]:
    """Train ``name`` for ``steps`` steps; (warning/error findings of the Watch, of the probe)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 100, (8, 32), generator=gen)
    probe = gw.probe(model, {"input_ids": batch, "labels": batch}, loss_fn=lambda out: out.loss)
    watch = gw.Watch(model, opt, run_dir=run_dir, diagnosis=gw.DiagnosisConfig(sample_every=sample_every))
    for _ in range(steps):
        ids = torch.randint(0, 100, (8, 32), generator=gen)
        watch.step(lambda: model(input_ids=ids, labels=ids).loss)
    watch.close()
    warn = ("warning", "error")
    return ([f for f in watch.findings if f.severity in warn], [f for f in probe.findings if f.severity in warn])


def converged_blips(level: float, on_spike: str | None) -> list[gw.Finding]:
    """The loss_spike findings of a run that converged to ``level`` and blips to 3.7e-9."""
    import math

    model = torch.nn.Linear(4, 1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), on_spike=on_spike)
    x = torch.randn(8, 4)
    losses = [2.3 * math.exp(-k / 5) for k in range(30)] + [3.7e-9 if k % 7 == 3 else level for k in range(200)]
    for value in losses:
        watch.step(lambda: model(x).mean() * 0.0 + value)  # the loss is exactly `value`
    watch.close()
    return [f for f in watch.findings if f.code == "loss_spike"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):  # gpt2-wide-init: only activation findings are false alarms
            found, probed = run(name, args.steps, args.sample_every, Path(tmp) / name)
            counts = Counter(f.code for f in found)
            print(f"{name}: {len(found)} false alarms in {args.steps} steps {dict(counts)}; probe: {len(probed)} "
                  f"{dict(Counter(f.code for f in probed))}")
            for f in (found[:3] + probed[:2]):
                print("   ", f.code, "|", f.message[:160])
    for level in (0.0, 1e-9):
        for on_spike in (None, "skip"):
            spikes = converged_blips(level, on_spike)
            print(f"converged at {level:g}, on_spike={on_spike}: {len(spikes)} loss_spike in 230 steps"
                  + (f" ({spikes[0].message[:100]})" if spikes else ""))


if __name__ == "__main__":
    main()
