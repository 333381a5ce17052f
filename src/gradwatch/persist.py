"""Plain-data state of gradwatch's stateful objects, for ``Watch.state_dict`` and resuming.

A rule's or a plugin's decisions depend on what it has seen (windows of recent
losses, episodes, counters). :func:`object_state` turns an object's attributes
into nested dicts and lists of numbers and strings (what ``torch.save`` writes
and ``torch.load(weights_only=True)`` reads back); :func:`load_object_state`
puts them back into a freshly built object of the same kind. Attributes listed
in the object's ``TRANSIENT`` (caches that are rebuilt on demand) and
references to other objects (the sampler, the view) are left as the fresh
object has them.

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


class Unserializable(TypeError):
    """A value with no plain-data form (an object reference: kept as the fresh object has it)."""


def dump(value: Any) -> Any:
    """``value`` as plain data (tagged dicts for deques, sets, tuples, arrays, non-string keys)."""
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
    if hasattr(value, "__dict__") and getattr(type(value), "PERSIST", False):  # small records (Episode)
        return {"__object__": object_state(value)}
    raise Unserializable(type(value).__name__)


def undump(value: Any, like: Any = None) -> Any:
    """Inverse of :func:`dump`; ``like`` (the fresh object's attribute) receives nested object state."""
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
    if "__object__" in value:
        target = like if like is not None else None
        if target is None:
            raise Unserializable("nested object state needs the fresh object to load into")
        load_object_state(target, value["__object__"])
        return target
    return {k: undump(v, like.get(k) if isinstance(like, dict) else None) for k, v in value.items()}


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
    """Put :func:`object_state` back into a fresh object of the same kind (episodes loaded in place)."""
    current = vars(obj)
    for name, value in state.items():
        like = current.get(name)
        if isinstance(value, dict) and "__items__" in value and isinstance(like, dict):
            restored = {}
            for k, v in value["__items__"]:
                key = _hashable(undump(k))
                restored[key] = _load_nested(v, like.get(key), like)
            setattr(obj, name, restored)
            continue
        if isinstance(value, dict) and "__object__" in value:
            if like is None:
                continue
            load_object_state(like, value["__object__"])
            continue
        if isinstance(value, dict) and not any(k.startswith("__") for k in value) and isinstance(like, dict):
            setattr(obj, name, {k: _load_nested(v, like.get(k), like) for k, v in value.items()})
            continue
        setattr(obj, name, undump(value, like))


def _load_nested(value: Any, like: Any, siblings: dict[Any, Any]) -> Any:
    """A dict entry: nested object state goes into the fresh object, or a new one made like a sibling's."""
    if isinstance(value, dict) and "__object__" in value:
        target = like
        if target is None:
            template = next((v for v in siblings.values() if hasattr(v, "__dict__")), None)
            if template is None:
                raise Unserializable("no object to load nested state into")
            target = type(template).__new__(type(template))
        load_object_state(target, value["__object__"])
        return target
    return undump(value)
