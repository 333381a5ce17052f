"""Pure checks of an input batch: non-finite values, all-zero tensors, constant or identical examples.

Every tensor in ``batch`` is checked, through nested tuples, lists and dicts
(any ``Mapping``, e.g. a Hugging Face ``BatchEncoding``). For each floating
tensor:

- NaN / +inf / -inf counts and the index of the first non-finite element,
  written as a path a person can paste, e.g. ``batch[0][3, 7]`` or
  ``batch['pixel_values'][0, 2, 5, 5]``;
- for tensors with features (``ndim >= 2``, more than one value per example): whether the tensor is
  all zeros, whether it is constant, and which examples (rows along dim 0) are
  constant along their features (``x / x.std()`` of such a row is 0/0).

A floating tensor holding only 0 and -inf is an additive attention mask (-inf
masks a position out, on purpose): it is marked ``additive_mask``, not a problem.
Integer tensors (token ids, labels) cannot hold NaN and are only counted. These
checks run only on a non-finite step (a few small reductions and one host sync
per tensor), never on healthy steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

MAX_TENSORS = 256  # a batch with more tensors than this is checked only in part
MAX_DEPTH = 8  # nesting deeper than this is not followed
MAX_ROWS_LISTED = 16  # constant examples listed by index (the count is always exact)


@dataclass
class TensorCheck:
    """What one tensor of the batch looks like (plain data)."""

    path: str
    shape: list[int]
    dtype: str
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    first_nonfinite: str | None = None
    all_zero: bool = False
    constant: bool = False
    constant_rows: list[int] = field(default_factory=list)
    n_constant_rows: int = 0
    n_rows: int = 0
    identical_rows: bool = False  # every example is the same (statistics over the batch, x.std(0), are 0)
    additive_mask: bool = False  # only 0 and -inf: an additive attention mask (-inf = masked out), on purpose

    @property
    def nonfinite(self) -> int:
        """Non-finite values that are a problem (the -inf of an additive mask are not)."""
        return 0 if self.additive_mask else self.nan + self.posinf + self.neginf

    @property
    def degenerate(self) -> bool:
        return self.nonfinite > 0 or self.all_zero or self.constant or self.n_constant_rows > 0 or self.identical_rows

    @property
    def whole(self) -> bool:
        """True when the whole tensor is unusable (not just some examples)."""
        return (self.all_zero or self.constant or self.identical_rows
                or (self.n_rows > 0 and self.n_constant_rows == self.n_rows))

    def describe(self) -> str:
        """One phrase: ``3 NaN values at batch[0][3, 7] (first)``, ``batch[0] is all zeros``."""
        if self.nonfinite:
            kinds = [f"{n} {name}" for n, name in ((self.nan, "NaN"), (self.posinf, "+inf"), (self.neginf, "-inf")) if n]
            plural = "s" if self.nonfinite > 1 else ""
            return f"{' and '.join(kinds)} value{plural} in {self.path}, first at {self.first_nonfinite}"
        if self.all_zero:
            return f"{self.path} {tuple(self.shape)} is all zeros"
        if self.constant:
            return f"{self.path} {tuple(self.shape)} is constant"
        if self.n_constant_rows:
            listed = ", ".join(str(r) for r in self.constant_rows)
            more = ", ..." if self.n_constant_rows > len(self.constant_rows) else ""
            return (f"{self.n_constant_rows} of {self.n_rows} examples of {self.path} are constant along their "
                    f"features (rows {listed}{more})")
        if self.identical_rows:
            return (f"all {self.n_rows} examples of {self.path} are identical: every feature is constant across the "
                    "batch (a loader that repeats one sample)")
        return f"{self.path} looks fine"


@dataclass
class BatchReport:
    """The checks of every tensor in a batch.

    Attributes:
        tensors: one :class:`TensorCheck` per floating tensor.
        n_tensors: number of tensors seen (integer ones included).
        truncated: True when the batch held more than ``MAX_TENSORS`` tensors.
    """

    tensors: list[TensorCheck]
    n_tensors: int
    truncated: bool = False

    @property
    def nonfinite(self) -> list[TensorCheck]:
        """Tensors holding NaN or inf."""
        return [t for t in self.tensors if t.nonfinite]

    @property
    def degenerate(self) -> list[TensorCheck]:
        """Tensors with any problem (non-finite, all zeros, constant, constant examples)."""
        return [t for t in self.tensors if t.degenerate]

    @property
    def constant_rows(self) -> set[int]:
        """Indices (along dim 0) of the examples that are constant in some feature tensor."""
        return {r for t in self.tensors for r in t.constant_rows}

    def summary(self) -> str:
        """One sentence on the worst problems, or ``"the batch looks fine"``."""
        bad = self.nonfinite or self.degenerate
        if not bad:
            return "the batch looks fine"
        return "; ".join(t.describe() for t in bad[:3]) + ("; ..." if len(bad) > 3 else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_tensors": self.n_tensors,
            "truncated": self.truncated,
            "problems": [asdict(t) for t in self.degenerate],
        }


def _leaves(obj: Any, path: str, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth >= MAX_DEPTH or isinstance(obj, (str, bytes)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}[{key!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]", depth + 1)


def _index(flat_index: int, shape: torch.Size) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat_index % size)
        flat_index //= size
    return list(reversed(out))


def _check_tensor(path: str, tensor: torch.Tensor) -> TensorCheck:
    t = tensor.detach()
    check = TensorCheck(path=path, shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""))
    if t.numel() == 0:
        return check
    flat = t.reshape(-1)
    nan = torch.isnan(flat)
    posinf = torch.isposinf(flat)
    neginf = torch.isneginf(flat)
    bad = nan | posinf | neginf
    counts = torch.stack([nan.sum(), posinf.sum(), neginf.sum()]).tolist()  # one host sync
    check.nan, check.posinf, check.neginf = (int(c) for c in counts)
    if check.neginf and not check.nan and not check.posinf:
        check.additive_mask = bool((flat[~neginf] == 0).all())  # 0 = attend, -inf = masked: an attention mask
        if check.additive_mask:
            return check
    if check.nonfinite:
        first = int(torch.argmax(bad.to(torch.uint8)))
        check.first_nonfinite = f"{path}[{', '.join(str(i) for i in _index(first, t.shape))}]"
        return check  # the structural checks below mean nothing once values are NaN
    if t.ndim < 2 or t[0].numel() < 2:
        return check  # labels, per-example scalars: no feature dimension to be constant along
    rows = t.reshape(t.shape[0], -1)  # (N, features)
    check.n_rows = rows.shape[0]
    check.all_zero = bool((flat == 0).all())
    check.constant = not check.all_zero and flat.numel() > 1 and bool((flat == flat[0]).all())
    if not (check.all_zero or check.constant):
        const = (rows == rows[:, :1]).all(dim=1)
        idx = torch.nonzero(const).reshape(-1)
        check.n_constant_rows = int(idx.numel())
        check.constant_rows = idx[:MAX_ROWS_LISTED].tolist()
        check.identical_rows = rows.shape[0] > 1 and bool((rows == rows[:1]).all())
    elif check.all_zero or check.constant:
        check.n_constant_rows = check.n_rows
        check.constant_rows = list(range(min(check.n_rows, MAX_ROWS_LISTED)))
    return check


def check_batch(batch: Any, name: str = "batch") -> BatchReport:
    """Check every tensor of a (nested) batch for NaN/inf, all zeros and constant examples.

    Args:
        batch: a tensor, or tuples/lists/dicts of them (other leaves are ignored).
        name: the name used at the root of each path. Default: ``"batch"``.

    Returns:
        a :class:`BatchReport`.

    Example:
        >>> x = torch.randn(4, 8); x[3, 7] = float("nan")
        >>> report = check_batch((x, torch.tensor([0, 1, 1, 0])))
        >>> report.nonfinite[0].first_nonfinite
        'batch[0][3, 7]'
        >>> check_batch({"x": torch.zeros(2, 3)}).summary()
        "batch['x'] (2, 3) is all zeros"
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    checks: list[TensorCheck] = []
    seen = 0
    truncated = False
    with torch.no_grad():
        for path, tensor in _leaves(batch, name, 0):
            seen += 1
            if seen > MAX_TENSORS:
                truncated = True
                break
            if tensor.is_floating_point():
                checks.append(_check_tensor(path, tensor))
    return BatchReport(tensors=checks, n_tensors=min(seen, MAX_TENSORS), truncated=truncated)
