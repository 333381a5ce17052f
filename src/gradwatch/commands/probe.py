"""``gradwatch probe MODULE:FACTORY``: the pre-flight check from the command line.

``FACTORY`` is a function in ``MODULE`` (a dotted import path or a ``.py`` file)
that returns ``(model, batch)`` or ``(model, batch, loss_fn)``. Prints the
per-layer table, predicted vs measured attenuation and the findings (or, with
``--json``, one JSON object). Exit code 1 when an error-level finding was
raised, 2 on bad input (one line on stderr), 0 otherwise. An exception raised by
the user's own code (importing ``MODULE``, the factory, the model's forward or
the loss) is one line naming it; ``gradwatch --debug probe ...`` (or
``GRADWATCH_DEBUG=1``) prints its traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..cli import UserCodeError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe",
        help="pre-flight check: predict vanishing/exploding gradients before training",
        description="Probe a model on one batch before training. FACTORY returns (model, batch) or (model, batch, loss_fn).",
    )
    p.add_argument("target", metavar="MODULE:FACTORY", help="e.g. mypkg.models:make or path/to/file.py:make")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--probes", type=int, default=8, help="random probes per block (default: 8)")
    p.add_argument("--power-iters", type=int, default=5, help="power iterations per block (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe vectors (default: 0)")
    return p


def _load_module(spec: str) -> Any:
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {spec}")
        module_spec = importlib.util.spec_from_file_location(f"_gradwatch_probe_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot load {spec} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses and pickling look their module up here
        sys.path.insert(0, str(path.resolve().parent))
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(spec)


def load_factory(target: str) -> Callable[[], Any]:
    """``MODULE:FACTORY`` -> the factory function.

    Raises:
        ValueError: ``target`` is not ``MODULE:FACTORY``, the module cannot be found or has no such function.
        FileNotFoundError: ``MODULE`` names a ``.py`` file that does not exist.
        UserCodeError: importing ``MODULE`` raised (the cause is the user's exception).

    Example:
        >>> load_factory("gradwatch.theory:depth_scale").__name__
        'depth_scale'
    """
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mypkg.models:make or model.py:make), got {target!r}")
    try:
        module = _load_module(module_part)
    except (FileNotFoundError, ValueError):
        raise
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_part!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise UserCodeError(f"importing {module_part!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{module_part!r} has no callable {attr!r}")
    return factory


def _unpack(result: Any, target: str) -> tuple[Any, Any, Any]:
    from torch import nn

    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ValueError(f"{target} must return (model, batch) or (model, batch, loss_fn), got {type(result).__name__}")
    model, batch = result[0], result[1]
    loss_fn = result[2] if len(result) == 3 else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target} returned a {type(model).__name__} as the model; expected a torch.nn.Module")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"{target} returned a non-callable loss_fn ({type(loss_fn).__name__})")
    return model, batch, loss_fn


def run(args: argparse.Namespace) -> int:
    from ..preflight import probe

    factory = load_factory(args.target)
    try:
        made = factory()
    except Exception as exc:
        raise UserCodeError(f"{args.target}() failed: {type(exc).__name__}: {exc}") from exc
    model, batch, loss_fn = _unpack(made, args.target)
    try:
        result = probe(model, batch, loss_fn, probes=args.probes, power_iters=args.power_iters, seed=args.seed)
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # the model's own forward or loss failed
        raise UserCodeError(f"probing {args.target} failed: {type(exc).__name__}: {exc}") from exc
    if args.json:
        print(json.dumps(result.to_dict(), indent=None))
    else:
        print(result.table())
    return 1 if result.has_error else 0
