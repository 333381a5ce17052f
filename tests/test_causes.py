"""Causes explained, not only located: the replay's facts turned into the message and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw


def test_a_batch_whose_every_target_is_ignored_is_named_with_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 8), torch.full((4,), -100)
    assert torch.isnan(F.cross_entropy(model(x), y))  # the premise: 0 / 0 valid targets
    result = watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y))
    watch.close()
    assert result.skipped
    finding = result.findings[0]
    assert finding.code == "loss_numerics"
    assert finding.evidence["localization"]["facts"] == {"all_targets_ignored": True, "ignore_index": -100, "targets": 4}
    assert "every one of the batch's 4 targets is ignore_index (-100)" in finding.message
    assert "add an eps" not in " ".join(finding.fixes)
    assert finding.fixes[0].startswith("skip such batches")


def test_a_batch_with_one_valid_target_is_finite_and_quiet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 8), torch.tensor([-100, -100, 3, -100])
    assert not watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y)).skipped
    watch.close()
    assert not watch.findings


def test_gpt2_with_every_label_masked():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    watch = gw.Watch(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.full_like(ids, -100)  # a truncated prompt: no answer token left
    result = watch.step(lambda: model(input_ids=ids, labels=labels).loss, batch={"input_ids": ids})
    watch.close()
    finding = result.findings[0]
    assert finding.code == "loss_numerics" and "ignore_index (-100)" in finding.message
