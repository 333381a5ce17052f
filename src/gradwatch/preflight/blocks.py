"""Blocks: the top-level stages whose Jacobians the probe estimates.

Automatic choice, in order:

1. the model is (or its largest stage is) an ``nn.Sequential``: its children,
   grouped so that each group starts at a child holding weights (a Linear, a
   Conv, a sub-block) and takes along the parameter-free or normalization
   children after it (``Linear, ReLU`` is one block; ``Linear, BatchNorm, ReLU`` too);
2. otherwise the ``nn.ModuleList`` (or Sequential) anywhere in the model whose
   children hold the most parameters (a transformer's ``blocks``/``layers``/``h``).

``blocks=`` overrides it: a list of module names (or modules) of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .trace import NORM_MODULES


@dataclass
class BlockSpec:
    """One block: consecutive modules applied in order (usually just one)."""

    name: str
    modules: list[nn.Module]
    names: list[str]

    @property
    def first(self) -> nn.Module:
        return self.modules[0]

    @property
    def last(self) -> nn.Module:
        return self.modules[-1]


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_main(module: nn.Module) -> bool:
    """A child that opens a new group: it holds parameters and is not a normalization layer."""
    return _n_params(module) > 0 and not isinstance(module, NORM_MODULES)


def group_sequential(seq: nn.Sequential, prefix: str) -> list[BlockSpec]:
    """Group a Sequential's children into blocks (see module docstring)."""
    groups: list[BlockSpec] = []
    pending: list[tuple[str, nn.Module]] = []  # leading parameter-free children
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if _is_main(child) or not groups:
            if _is_main(child):
                items = pending + [(full, child)]
                pending = []
                groups.append(BlockSpec(full, [m for _, m in items], [n for n, _ in items]))
            else:
                pending.append((full, child))
            continue
        groups[-1].modules.append(child)
        groups[-1].names.append(full)
    if pending and groups:  # only possible when no main child came after them
        groups[-1].modules.extend(m for _, m in pending)
        groups[-1].names.extend(n for n, _ in pending)
    for g in groups:
        g.name = g.names[0] if len(g.names) == 1 else f"{g.names[0]}..{g.names[-1].rpartition('.')[2]}"
    return groups


def detect_blocks(model: nn.Module) -> list[BlockSpec]:
    """Automatic blocks of ``model`` (possibly empty when nothing fits).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> [b.names for b in detect_blocks(m)]
        [['0', '1'], ['2', '3'], ['4']]
    """
    if isinstance(model, nn.Sequential):
        return group_sequential(model, "")
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or module is model:
            continue
        children = list(module.children())
        if len(children) < 2:
            continue
        total = sum(_n_params(c) for c in children)
        if best is None or total > best[0]:
            best = (total, name, module)
    if best is None or best[0] == 0:
        return []
    _, name, container = best
    if isinstance(container, nn.Sequential):
        return group_sequential(container, name)
    return [BlockSpec(f"{name}.{i}", [c], [f"{name}.{i}"]) for i, c in enumerate(container.children()) if _n_params(c) > 0]


def resolve_blocks(model: nn.Module, blocks: Sequence[Any] | None) -> list[BlockSpec]:
    """``blocks=`` as given by a user (names or modules), or the automatic choice.

    Raises ValueError naming an unknown module.
    """
    if blocks is None:
        return detect_blocks(model)
    if isinstance(blocks, (str, nn.Module)) or not isinstance(blocks, Sequence):
        raise TypeError("blocks must be a list of module names or modules of the model, e.g. blocks=['layers.0', 'layers.1']")
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    out: list[BlockSpec] = []
    for item in blocks:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"blocks: {item!r} is not a module of the model; names look like {list(named)[1:4]}")
            out.append(BlockSpec(item, [named[item]], [item]))
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"blocks: a {type(item).__name__} that is not part of the model was given")
            name = by_id[id(item)] or "(root)"
            out.append(BlockSpec(name, [item], [name]))
        else:
            raise TypeError(f"blocks entries must be module names or modules, got {type(item).__name__}")
    return out
