"""gradwatch.compat: the multi-tensor kernel chain and the sampling modes' bookkeeping."""

from __future__ import annotations

from typing import Any

import torch

from gradwatch import compat


def test_foreach_chain_equals_the_per_tensor_ops() -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    ys = [torch.rand(5, 3, generator=gen) + 0.5, torch.rand(7, generator=gen) + 0.5]
    before = [x.clone() for x in xs]
    got = compat.foreach_chain([("mul", (xs, ys)), ("add_", (..., [1.0, 2.0])), ("norm", (...,))])
    want = [torch.linalg.vector_norm(x * y + c) for x, y, c in zip(xs, ys, (1.0, 2.0))]
    assert [float(g) for g in got] == [float(w) for w in want]
    assert all(torch.equal(x, b) for x, b in zip(xs, before))  # mul is out of place: the inputs are left alone


def test_foreach_chain_says_none_where_a_kernel_is_missing_or_refuses() -> None:
    assert compat.foreach_chain([("no_such_kernel", ([torch.ones(2)],))]) is None
    a, b = [torch.ones(3)], [torch.ones(4)]  # mismatched shapes: the kernel raises
    assert compat.foreach_chain([("mul", (a, b))]) is None


class _Counting(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


class _OwnCounting(compat.OwnMode, _Counting):
    pass


def test_own_ops_hide_gradwatch_calls_from_its_own_modes_only() -> None:
    x = torch.ones(3)
    with _OwnCounting() as mode:
        assert compat.in_own_mode()
        _ = x + 1  # the model's call: seen
        seen = mode.calls
        with compat.own_ops():
            _ = x.numel(), x * 2, x.detach()  # gradwatch's calls inside a hook: unseen
        assert mode.calls == seen == 1
    assert not compat.in_own_mode()
    with _Counting() as user_mode:  # a user's mode, none of gradwatch's on: own_ops changes nothing
        with compat.own_ops():
            _ = x * 2
    assert user_mode.calls == 1


def test_own_mode_depth_survives_nesting_and_errors() -> None:
    try:
        with _OwnCounting():
            with _OwnCounting():
                assert compat.in_own_mode()
            assert compat.in_own_mode()
            raise KeyError("the user's own error")
    except KeyError:
        pass
    assert not compat.in_own_mode()
