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


class _Checkpointed(nn.Module):
    """A frozen embedding, then a checkpointed block: with use_reentrant=True the block gets no gradient."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.emb.requires_grad_(False)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(torch.relu(checkpoint(self.block, self.emb(x), use_reentrant=self.reentrant)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns that no input requires grad: the bug itself
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_without_gradients_points_at_use_reentrant(reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    watch = gw.Watch(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    for _ in range(8):
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        watch.step(lambda: F.mse_loss(model(x), y))
    watch.close()
    missing = [f for f in watch.findings if f.code == "missing_gradients"]
    if not reentrant:
        assert missing == []
        return
    assert len(missing) == 1 and missing[0].evidence["layers"] == ["block"]
    assert missing[0].evidence["ran_forward"] == ["block"]
    assert "use_reentrant=False" in missing[0].fixes[0]


def test_an_unused_branch_is_still_called_unused():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Branchy()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(8):
        x = torch.randn(4, 4)
        watch.step(lambda: model(x).square().mean())
    watch.close()
    missing = next(f for f in watch.findings if f.code == "missing_gradients")
    assert missing.evidence["ran_forward"] == [] and "unused branch" in missing.message
    assert "use_reentrant" not in " ".join(missing.fixes)


class _PooledButIgnored(nn.Module):
    """An encoder that also runs a pooler (like ``ViTModel``/``BertModel`` by default); the head reads token 0."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.pooler = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        hidden = self.encoder(x)
        self.pooled = torch.tanh(self.pooler(hidden))  # computed with a graph, never used by the loss
        return self.head(hidden)


def test_a_module_that_ran_with_a_graph_but_whose_output_the_loss_ignores_is_named_unused_not_cut():
    torch.manual_seed(0)
    model = _PooledButIgnored()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(8):
        x = torch.randn(4, 4)
        watch.step(lambda: model(x).square().mean())
    watch.close()
    missing = next(f for f in watch.findings if f.code == "missing_gradients")
    # the pooler's output required grad (autograd says so), yet its weights got no gradient: unused, not cut
    assert missing.evidence["layers"] == ["pooler"] and missing.evidence["output_unused"] == ["pooler"]
    assert "does not depend on it" in missing.message and "use_reentrant" not in " ".join(missing.fixes)
    assert "add_pooling_layer=False" in missing.fixes[0]


def test_a_module_run_under_no_grad_is_still_named_cut():
    class NoGradBranch(_PooledButIgnored):
        def forward(self, x):
            hidden = self.encoder(x)
            with torch.no_grad():
                side = self.pooler(hidden)
            return self.head(hidden + side)

    torch.manual_seed(0)
    model = NoGradBranch()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(8):
        x = torch.randn(4, 4)
        watch.step(lambda: model(x).square().mean())
    watch.close()
    missing = next(f for f in watch.findings if f.code == "missing_gradients")
    assert missing.evidence["layers"] == ["pooler"] and missing.evidence["output_unused"] == []
    assert "cut from the graph" in missing.message


class _BatchStandardized(nn.Module):
    """Hand-written batch standardization with torch's default (Bessel-corrected) std, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.proj(x)
        return self.head((h - h.mean(0)) / h.std(0))


def test_a_std_over_a_batch_of_one_names_bessels_correction_and_drop_last():
    torch.manual_seed(0)
    model = _BatchStandardized()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
        assert not watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y)).skipped
    x, y = torch.randn(1, 8), torch.randint(0, 3, (1,))  # the epoch's last batch holds one example
    with pytest.warns(UserWarning, match="degrees of freedom"):  # torch's own warning: the premise
        assert torch.isnan(torch.randn(1, 4).std(0)).all()
    with pytest.warns(UserWarning, match="degrees of freedom"):
        result = watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y))
    watch.close()
    assert result.skipped
    finding = result.findings[0]
    assert finding.location["op"] == "aten.std"
    assert finding.evidence["localization"]["facts"] == {"too_few_for_variance": True, "count": 1,
                                                         "correction": 1.0, "dims": [0]}
    assert "of 1 value with Bessel's correction 1 divides by 1 - 1 = 0" in finding.message
    assert any("drop_last=True" in fix for fix in finding.fixes) and "add an eps" not in " ".join(finding.fixes)


def test_an_op_fed_huge_values_is_named_an_overflow_upstream_not_an_eps_problem():
    class Cubic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return h.pow(3)  # finite for sane inputs; 1e15^3 is out of float32's range

    torch.manual_seed(0)
    model = Cubic()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0))
    x = torch.randn(4, 4)
    assert not watch.step(lambda: model(x).mean(), batch=(x,)).skipped
    big = x * 1e15
    assert torch.isfinite(model.lin(big)).all() and torch.isinf(model(big)).any()  # the premise
    result = watch.step(lambda: model(big).mean(), batch=(big,))
    watch.close()
    finding = result.findings[0]
    assert finding.location["op"] == "aten.pow" and finding.evidence["localization"]["max_abs_input"] > 1e15
    assert "already huge" in finding.message and "root of a negative" not in finding.message
    assert "add an eps" not in " ".join(finding.fixes)
