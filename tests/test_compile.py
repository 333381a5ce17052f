"""A torch.compile'd model under the Watch: the same per-layer numbers as eager, no recompiles per step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch._inductor.*")

STEPS = 12  # past the first sampled diagnosis step (every 10)


def _inductor_available() -> bool:
    try:
        from torch._inductor import cpp_builder  # noqa: F401
        import shutil

        return shutil.which("g++") is not None or shutil.which("c++") is not None or shutil.which("gcc") is not None
    except Exception:
        return False


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.inp(x)))
        return self.out(torch.tanh(self.hidden(h)))


def _run(model: nn.Module, module_for_opt: nn.Module) -> tuple[gw.Watch, list]:
    opt = torch.optim.SGD(module_for_opt.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=0.5)  # default plugins too: their hooks must not recompile
    g = torch.Generator().manual_seed(1)
    results = []
    for _ in range(STEPS):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        results.append(watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y)))
    watch.close()
    return watch, results


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_gives_eager_per_layer_norms_without_recompiling(backend):
    if backend == "inductor" and not _inductor_available():
        pytest.skip("inductor needs a C++ compiler")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Net()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend)
    eager_watch, eager_results = _run(eager, eager)

    from torch._dynamo.utils import counters

    counters.clear()
    watch, results = _run(compiled, twin)
    assert watch.layers == eager_watch.layers == ["inp", "norm", "hidden", "out"]  # no "_orig_mod." prefix
    for ours, ref in zip(results, eager_results):
        assert not ours.skipped
        for name in watch.layers:
            assert ours.layer_grad_norms[name] == pytest.approx(ref.layer_grad_norms[name], rel=1e-5)
        assert ours.grad_norm == pytest.approx(ref.grad_norm, rel=1e-5)
    # the Watch's first-step layer-order hooks cost at most one recompile; later steps reuse the graph
    frames = counters["stats"]["unique_graphs"]
    assert frames <= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(eager.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
