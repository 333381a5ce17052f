"""The fused per-layer norm + clip pass against torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch import norms
from gradwatch.layers import LayerIndex


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 3)  # receives no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _inputs(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(model[0] if isinstance(model, nn.Sequential) else None, nn.Conv2d):
        return torch.randn(5, 2, 6, 6, dtype=dtype)
    return torch.randn(5, 8, dtype=dtype)


MODELS = {"mlp": _mlp, "conv": _conv, "unused": _WithUnused}


def _model_with_grads(factory, dtype: torch.dtype, scale: float) -> nn.Module:
    torch.manual_seed(1)
    model = factory().to(dtype)
    (model(_inputs(model, dtype)) * scale).pow(2).sum().backward()
    return model


def _grads_for(factory, dtype: torch.dtype, scale: float) -> tuple[nn.Module, nn.Module]:
    """Two identical models with identical gradients (built twice from one seed)."""
    return _model_with_grads(factory, dtype, scale), _model_with_grads(factory, dtype, scale)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.5])
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e9])
def test_matches_clip_grad_norm(name: str, dtype: torch.dtype, norm_type: float, max_norm: float | None) -> None:
    ours, ref = _grads_for(MODELS[name], dtype, scale=3.0)
    index = LayerIndex(ours)
    grads = [p.grad for p in index.params]
    assert any(g is None for g in grads) == (name == "unused")

    layer_norms, total, coef = norms.per_layer_grad_norms_(grads, index.param_layer, len(index), max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm if max_norm is not None else math.inf, norm_type)

    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
        if p_ref.grad is None:
            assert p_ours.grad is None
            continue
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-6, atol=0)
    # Per-layer norms are the norms of each layer's own gradients, before clipping.
    _, unclipped = _grads_for(MODELS[name], dtype, scale=3.0)
    for slot, layer in enumerate(index.measured_layers):
        own = [unclipped.get_parameter(n).grad for n in layer.param_names]
        own = [g for g in own if g is not None]
        want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in own]), norm_type) if own else torch.tensor(0.0)
        assert layer_norms[slot].item() == pytest.approx(want.item(), rel=1e-6, abs=1e-30)
    assert (coef.item() < 1.0) == (max_norm is not None and expected.item() > max_norm)


def test_hand_worked_example_from_theory() -> None:
    """THEORY.md: gradients (3, 0) and (0, 4) with max_norm 1 -> returns 5.0, post-clip norm 0.9999998."""
    g = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]
    layer_norms, total, coef = norms.per_layer_grad_norms_(g, [0, 1], 2, max_norm=1.0)
    assert total.item() == 5.0
    assert layer_norms.tolist() == [3.0, 4.0]
    post = math.hypot(g[0][0].item(), g[1][1].item())
    assert post == pytest.approx(0.9999998, abs=1e-7)
    assert coef.item() == pytest.approx(1.0 / (5.0 + 1e-6))


def test_layers_sharing_slots_sum_squares() -> None:
    g = [torch.tensor([1.0, 2.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    layer_norms, total, _ = norms.per_layer_grad_norms_(g, [0, 0, 1], 2)
    assert layer_norms.tolist() == pytest.approx([3.0, 4.0])
    assert total.item() == pytest.approx(5.0)


def test_mixed_dtypes_accumulate_in_float64() -> None:
    g = [torch.tensor([3.0], dtype=torch.float32), torch.tensor([4.0], dtype=torch.float64)]
    layer_norms, total, _ = norms.per_layer_grad_norms_(g, [0, 1], 2)
    assert layer_norms.dtype == torch.float64
    assert total.item() == 5.0


def test_no_gradients_at_all_gives_zero() -> None:
    layer_norms, total, coef = norms.per_layer_grad_norms_([None, None], [0, 1], 2, max_norm=1.0)
    assert layer_norms.tolist() == [0.0, 0.0]
    assert total.item() == 0.0
    assert coef.item() == 1.0


def test_nonfinite_gradient_poisons_total_and_its_layer_only() -> None:
    g = [torch.tensor([1.0, float("nan")]), torch.tensor([2.0]), torch.tensor([float("inf")])]
    layer_norms, total, _ = norms.per_layer_grad_norms_(g, [0, 1, 2], 3)
    assert math.isnan(layer_norms[0].item())
    assert layer_norms[1].item() == 2.0
    assert math.isinf(layer_norms[2].item())
    assert not math.isfinite(total.item())


def test_measure_plan_fused_and_general_paths_agree() -> None:
    model = _model_with_grads(_mlp, torch.float32, 2.0)
    index = LayerIndex(model)
    plan = norms.MeasurePlan(index.params, index.param_layer, len(index))
    grads = [p.grad for p in index.params]
    _, fused_g, fused_w = plan.measure(grads)  # every gradient present: fused path
    general = norms.group_tensors(grads, index.param_layer)
    want_g = norms.layer_powers(general, len(index), 2.0)
    want_w = norms.layer_powers(norms.group_tensors(list(index.params), index.param_layer), len(index), 2.0)
    torch.testing.assert_close(fused_g, want_g)
    torch.testing.assert_close(fused_w, want_w)
    grads[0] = None  # a missing gradient takes the general path, with the same weights
    _, g2, w2 = plan.measure(grads)
    torch.testing.assert_close(w2, want_w)
    assert g2[0].item() == pytest.approx(grads[1].norm().item() ** 2, rel=1e-6)  # layer 0 keeps only its bias


def _fast(plan: norms.MeasurePlan, grads: list) -> np.ndarray:
    """The fast path's numbers, transfer included: [layer grad norms, layer weight norms, total]."""
    with torch.no_grad():  # as the Watch measures
        _, tensor_norms, on_host = plan.tensor_norms2(grads)
        return on_host(torch.stack(tensor_norms).double().numpy())


@pytest.mark.parametrize("few", [True, False], ids=["python-sums", "numpy-sums"])
@pytest.mark.parametrize("weights_on_host", [True, False])
def test_fast_path_equals_clip_grad_norm_and_the_general_path(weights_on_host: bool, few: bool) -> None:
    model = _model_with_grads(_mlp, torch.float32, 2.0)
    index = LayerIndex(model)
    plan = norms.MeasurePlan(index.params, index.param_layer, len(index))
    assert plan._few and plan.on_cpu  # a few CPU tensors: per-layer sums in plain Python, values read in place
    plan._few = few  # many tensors: numpy sums them
    assert (plan.host is not None) is True  # float32 CPU weights: numpy reads them in place
    if not weights_on_host:
        plan.host = None  # the foreach path over gradients and weights (CUDA, half precision, ...)
    grads = [p.grad for p in index.params]
    with torch.no_grad():
        _, want_g, want_w = plan.measure(grads)
    vec = _fast(plan, grads)
    n = len(index)
    np.testing.assert_allclose(vec[:n], want_g.sqrt().numpy(), rtol=1e-6)
    np.testing.assert_allclose(vec[n : 2 * n], want_w.sqrt().numpy(), rtol=1e-6)
    reference = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # measures, clips nothing
    assert vec[2 * n] == pytest.approx(reference.item(), rel=1e-6)
    grads[0] = None  # a missing gradient: not the fast path's business
    assert plan.tensor_norms2(grads) is None


@pytest.mark.parametrize("few", [True, False], ids=["python-sums", "numpy-sums"])
@pytest.mark.parametrize("weights_on_host", [True, False])
def test_fast_path_without_weights_reads_no_weight_and_gives_the_same_gradient_norms(weights_on_host: bool,
                                                                                      few: bool) -> None:
    model = _model_with_grads(_mlp, torch.float32, 2.0)
    index = LayerIndex(model)
    plan = norms.MeasurePlan(index.params, index.param_layer, len(index))
    plan._few = few
    if not weights_on_host:
        plan.host = None
    grads = [p.grad for p in index.params]
    read: list[int] = []
    if plan.host is not None:
        plan.host.squares = lambda: read.append(1) or []  # any read of the weights would show here
    with torch.no_grad():
        _, tensor_norms, on_host = plan.tensor_norms2(grads, weights=False)
        vec = on_host(torch.stack(tensor_norms).double().numpy())
    n = len(index)
    assert len(tensor_norms) == len(grads) and not read  # one norm per gradient: no weight went to the kernel
    per_layer = np.zeros(n)
    for g, slot in zip(grads, index.param_layer):  # by hand, in float64
        per_layer[slot] += g.double().pow(2).sum().item()
    np.testing.assert_allclose(vec[:n], np.sqrt(per_layer), rtol=1e-6)
    assert np.isnan(vec[n : 2 * n]).all()
    reference = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    assert vec[2 * n] == pytest.approx(reference.item(), rel=1e-6)


def test_fast_path_over_several_dtype_groups_equals_the_general_path() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5))]
    grads = [torch.randn_like(p) for p in params]
    slots = [0, 0, 1]
    plan = norms.MeasurePlan(params, slots, 2)
    vec = _fast(plan, grads)
    want_g = norms.layer_powers(norms.group_tensors(grads, slots), 2, 2.0).sqrt()
    want_w = norms.layer_powers(norms.group_tensors([p.detach() for p in params], slots), 2, 2.0).sqrt()
    np.testing.assert_allclose(vec[:2], want_g.numpy(), rtol=1e-6)
    np.testing.assert_allclose(vec[2:4], want_w.numpy(), rtol=1e-6)
    assert vec[4] == pytest.approx(math.sqrt(sum(g.double().norm().item() ** 2 for g in grads)), rel=1e-7)


def test_host_weights_follow_the_parameters_and_refuse_what_numpy_cannot_read_in_place() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    host = norms.HostWeights.of(params)
    want = [p.detach().double().pow(2).sum().item() for p in params]
    assert [float(v) for v in host.squares()] == pytest.approx(want, rel=1e-6)
    with torch.no_grad():
        params[0].mul_(3.0)  # in place: the same memory
        params[1].data = torch.arange(5.0, dtype=torch.float64)  # a new storage: rebound on the next check
    assert host.current()
    assert [float(v) for v in host.squares()] == pytest.approx([9 * want[0], 30.0], rel=1e-6)
    before = host.copy_into(None)
    with torch.no_grad():
        params[0].add_(1.0)
    assert host.delta_squares(before) == pytest.approx([30.0, 0.0], rel=1e-6)  # 30 elements moved by 1
    assert host.copy_into(before) is before  # the buffers are reused
    params[1].data = params[1].data.to(torch.float16)  # no longer readable by numpy in place
    assert not host.current()
    assert norms.HostWeights.of([torch.nn.Parameter(torch.randn(4, 3).t())]) is None  # not contiguous
    assert norms.HostWeights.of([torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]) is None
    huge = norms.HostWeights.of([torch.nn.Parameter(torch.full((4,), 1e20))])
    assert math.isinf(huge.squares()[0])  # inf, as torch.linalg.vector_norm gives, and no warning (an error here)
