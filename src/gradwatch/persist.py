"""Plain-data state of gradwatch's stateful objects, for ``Watch.state_dict`` and resuming.

A rule's or a plugin's decisions depend on what it has seen (windows of recent
losses, episodes, counters). :func:`object_state` turns an object's attributes
into nested dicts and lists of numbers and strings (what ``torch.save`` writes
and ``torch.load(weights_only=True)`` reads back); :func:`load_object_state`
puts them back into a freshly built object of the same kind. Attributes listed
in the object's ``TRANSIENT`` (caches that are rebuilt on demand) and
references to other objects (the sampler, the view) are left as the fresh
object has them; small records (``Episode``) are saved by value when their
class is marked with :func:`record_class`.

Example:
    >>> from collections import deque
    >>> class Rule:
    ...     TRANSIENT = ("_cache",)
    ...     def __init__(self): self.window, self.seen, self._cache = deque(maxlen=3), set(), None
    >>> r = Rule(); r.window.extend([1.0, 2.0]); r.seen.add("fc1")
    >>> fresh = Rule(); load_object_state(fresh, object_state(r))
    >>> list(fresh.window), fresh.window.maxlen, fresh.seen
    ([1.0, 2.0], 3, {'fc1'})
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

_PLAIN = (bool, int, float, str, type(None))

#: classes whose instances are saved by value inside a state (small records such as ``Episode``)
_RECORDS: dict[str, type] = {}


def record_class(cls: type) -> type:
    """Class decorator: instances of ``cls`` (plain attributes only) are saved by value in a state.

    Example:
        >>> @record_class
        ... class Counter2:
        ...     def __init__(self): self.n = 0
        >>> c = Counter2(); c.n = 3
        >>> undump(dump({"a": c}))["a"].n
        3
    """
    _RECORDS[cls.__qualname__] = cls
    return cls


class Unserializable(TypeError):
    """A value with no plain-data form (an object reference: kept as the fresh object has it)."""


def dump(value: Any) -> Any:
    """``value`` as plain data (tagged dicts for deques, sets, tuples, arrays, non-string keys, records)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__array__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, collections.Counter):
        return {"__counter__": [[dump(k), v] for k, v in value.items()]}
    if isinstance(value, collections.deque):
        return {"__deque__": [dump(v) for v in value], "maxlen": value.maxlen}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted((dump(v) for v in value), key=repr)}
    if isinstance(value, tuple):
        return {"__tuple__": [dump(v) for v in value]}
    if isinstance(value, list):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: dump(v) for k, v in value.items()}
        return {"__items__": [[dump(k), dump(v)] for k, v in value.items()]}
    name = type(value).__qualname__
    if _RECORDS.get(name) is type(value):
        return {"__record__": name, "state": {k: dump(v) for k, v in vars(value).items()}}
    raise Unserializable(name)


def undump(value: Any) -> Any:
    """Inverse of :func:`dump`."""
    if isinstance(value, list):
        return [undump(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__array__" in value:
        return np.asarray(value["__array__"], dtype=value.get("dtype", "float64"))
    if "__counter__" in value:
        return collections.Counter({_hashable(undump(k)): v for k, v in value["__counter__"]})
    if "__deque__" in value:
        return collections.deque((undump(v) for v in value["__deque__"]), maxlen=value.get("maxlen"))
    if "__set__" in value:
        return {_hashable(undump(v)) for v in value["__set__"]}
    if "__tuple__" in value:
        return tuple(undump(v) for v in value["__tuple__"])
    if "__items__" in value:
        return {_hashable(undump(k)): undump(v) for k, v in value["__items__"]}
    if "__record__" in value:
        cls = _RECORDS.get(value["__record__"])
        if cls is None:
            raise ValueError(f"state holds a {value['__record__']!r} record that this gradwatch does not know")
        obj = cls.__new__(cls)
        vars(obj).update({k: undump(v) for k, v in value["state"].items()})
        return obj
    return {k: undump(v) for k, v in value.items()}


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def object_state(obj: Any) -> dict[str, Any]:
    """The object's attributes as plain data, except its ``TRANSIENT`` ones and object references."""
    transient = set(getattr(type(obj), "TRANSIENT", ()))
    out: dict[str, Any] = {}
    for name, value in vars(obj).items():
        if name in transient:
            continue
        try:
            out[name] = dump(value)
        except Unserializable:
            continue  # a reference to another object (the sampler, the view): the fresh object's stays
    return out


def load_object_state(obj: Any, state: dict[str, Any]) -> None:
    """Put :func:`object_state` back into a fresh object of the same kind."""
    for name, value in state.items():
        setattr(obj, name, undump(value))
