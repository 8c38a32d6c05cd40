"""Immutable, interned IR nodes.

Building a node that already exists returns the existing object (hash-consing), so
common subexpressions are shared for free and identity comparison means "same value".
(A node's label is part of its identity, so one caller's labels never show up on
another caller's graph.)
A node's dtype and shape are computed by its op's shape rule when it is built, so an
ill-typed node can never exist.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from adsvc_protocol import dtypes

Attrs = tuple[tuple[str, Any], ...]

_TABLE: weakref.WeakValueDictionary[tuple, Node] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


class Node:
    """One SSA value: an op applied to operand nodes. Never mutate; build with `make`."""

    __slots__ = ("op", "inputs", "attrs", "dtype", "shape", "value", "name", "label",
                 "__weakref__")

    op: str
    inputs: tuple[Node, ...]
    attrs: Attrs
    dtype: str
    shape: tuple[int, ...]
    value: np.ndarray | None
    name: str | None
    label: str

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        what = self.name if self.op == "input" else self.op
        return f"<Node {what} {self.dtype}{list(self.shape)}>"

    # Arithmetic operators are attached by adsvc.ops.api (so rules and the tracer share them).


def _freeze(v: Any) -> Any:
    """Hashable attribute value: sequences become tuples, numpy integers Python ints
    (anything else is kept as given, for the op's attribute check to accept or reject)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _typed(attrs: Attrs) -> tuple:
    """Attributes with their value types, for interning keys (True must not match 1)."""
    return tuple((k, type(v), v) for k, v in attrs)


def _intern(key: tuple, build) -> Node:
    with _LOCK:
        node = _TABLE.get(key)
        if node is None:
            node = build()
            _TABLE[key] = node
        return node


def _new(op, inputs, attrs, dtype, shape, value=None, name=None, label="") -> Node:
    n = object.__new__(Node)
    for k, v in (("op", op), ("inputs", inputs), ("attrs", attrs), ("dtype", dtype),
                 ("shape", shape), ("value", value), ("name", name), ("label", label)):
        object.__setattr__(n, k, v)
    return n


def make(op: str, inputs: tuple[Node, ...] | list[Node], attrs: dict | None = None,
         label: str = "") -> Node:
    """Return the node `op(inputs, attrs)`, building it (and checking it) only if new."""
    from adsvc.ops.registry import check_and_infer

    inputs = tuple(inputs)
    frozen: Attrs = tuple(sorted((k, _freeze(v)) for k, v in (attrs or {}).items()))
    key = (op, inputs, _typed(frozen), label)  # the label is part of identity: no leaks
    node = _TABLE.get(key)
    if node is None:
        dtype, shape, frozen = check_and_infer(op, inputs, frozen)
        node = _intern((op, inputs, _typed(frozen), label),
                       lambda: _new(op, inputs, frozen, dtype, tuple(shape), label=label))
    return node if REWRITE is None else REWRITE(node)


# Exact algebraic rewrites applied as nodes are built (installed by passes.simplify), so
# graphs -- derivative graphs above all -- come out simplified instead of being rebuilt
# by a later pass.
REWRITE: Callable[[Node], Node] | None = None


def input_node(name: str, dtype: str, shape: tuple[int, ...]) -> Node:
    """The graph input called `name` with the given type."""
    shape = tuple(int(d) for d in shape)
    return _intern(("input", name, dtype, shape),
                   lambda: _new("input", (), (), dtype, shape, name=name))


def constant(value, dtype: str | None = None) -> Node:
    """A constant node holding a copy of `value` (numpy array or Python scalar)."""
    arr = np.asarray(value, dtype=dtypes.to_numpy(dtype) if dtype else None)
    if dtype is None:
        arr = arr.astype(dtypes.to_numpy(dtypes.from_numpy(arr.dtype)), copy=False)
    arr = np.array(arr, order="C", copy=True)
    arr.setflags(write=False)
    dt = dtypes.from_numpy(arr.dtype)
    key = ("constant", dt, arr.shape, arr.tobytes())
    return _intern(key, lambda: _new("constant", (), (), dt, arr.shape, value=arr))
