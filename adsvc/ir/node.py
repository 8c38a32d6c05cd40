"""Immutable, interned IR nodes and the builder that makes them.

Building a node that already exists returns the existing object (hash-consing), so
common subexpressions are shared for free and identity comparison means "same value".
(A node's label is part of its identity, so one caller's labels never show up on
another caller's graph.) Each node carries a structural `digest`, computed once when
it is interned from its op, attributes, type, label and its operands' digests (like
tinygrad's `UOp.key`): equal digests mean equal graphs, in any process, which is what
cache keys are made of.

A node's dtype and shape are computed by its op's shape rule when the `Builder` makes
it, so an ill-typed node can never exist; the builder then applies its rewriter (the
exact simplifications of `ir.rewrites`). `make`, `lift`, `constant` and `input_node`
are those of the default builder.
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from adsvc.ir.opdef import check_and_infer
from adsvc.ir.operators import NodeOperators
from adsvc.ir.rewrites import Rewriter
from adsvc_protocol import dtypes
from adsvc_protocol.dims import as_dim
from adsvc_protocol.errors import DTypeError

Attrs = tuple[tuple[str, Any], ...]

_TABLE: weakref.WeakValueDictionary[tuple, Node] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()
_CREATED = threading.local()  # nodes this thread has interned: what a compile grows by


def nodes_created() -> int:
    """How many new nodes this thread has made so far (a compile's growth is the
    difference of two readings)."""
    return getattr(_CREATED, "n", 0)


class Node(NodeOperators):
    """One SSA value: an op applied to operand nodes. Never mutate; build with `make`."""

    __slots__ = ("op", "inputs", "attrs", "dtype", "shape", "value", "name", "label",
                 "digest", "types", "_rewritten", "__weakref__")

    op: str
    inputs: tuple[Node, ...]
    attrs: Attrs
    dtype: str
    shape: tuple[int, ...]
    value: np.ndarray | None
    name: str | None
    label: str
    digest: bytes  # structural hash of the node and everything it depends on
    types: tuple | None  # a node with several results (dtype "tuple"): their (dtype, shape)

    def attr(self, key: str, default: Any = None) -> Any:
        """The value of attribute `key`, or `default` if the node has no such attribute."""
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def ndim(self) -> int:
        """The number of axes (0 for a scalar)."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        what = self.name if self.op == "input" else self.op
        return f"<Node {what} {self.dtype}[{', '.join(map(str, self.shape))}]>"

    # what the operators of NodeOperators build with
    def _apply(self, op: str, attrs: dict | None = None) -> Node:
        return make(op, (self,), attrs)

    def _binary(self, op: str, a, b) -> Node:
        return BUILDER.binary(op, a, b)


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


def _digest(fields: dict, value_bytes) -> bytes:
    """Structural hash: op, type, attributes with their value types, input name, label,
    the operands' digests and a constant's bytes."""
    head = repr((fields["op"], fields["dtype"], fields["shape"],
                 tuple((k, type(v).__name__, _attr_identity(v)) for k, v in fields["attrs"]),
                 fields["name"], fields["label"]))
    h = hashlib.blake2b(head.encode("utf-8", "surrogatepass"), digest_size=20)
    for i in fields["inputs"]:
        h.update(i.digest)
    if value_bytes is not None:
        h.update(value_bytes)
    return h.digest()


def _attr_identity(v: Any) -> Any:
    """What an attribute contributes to a digest: its value, a sub-graph its key."""
    if isinstance(v, tuple):
        return tuple(_attr_identity(x) for x in v)
    key = getattr(v, "key", None)
    return key.hex() if isinstance(key, bytes) else v


def _intern(key: tuple, fields: dict, value_bytes=None, digest: bytes | None = None) -> Node:
    """The node for `key`, built from `fields` the first time."""
    with _LOCK:
        node = _TABLE.get(key)
        if node is None:
            node = object.__new__(Node)
            fields["digest"] = digest or _digest(fields, value_bytes)
            _CREATED.n = getattr(_CREATED, "n", 0) + 1
            for k, v in fields.items():
                object.__setattr__(node, k, v)
            _TABLE[key] = node
        return node


def _fields(op, inputs=(), attrs=(), dtype="float64", shape=(), value=None, name=None,
            label="", types=None) -> dict:
    return {"op": op, "inputs": inputs, "attrs": attrs, "dtype": dtype, "shape": shape,
            "value": value, "name": name, "label": label, "types": types}


def input_node(name: str, dtype: str, shape: tuple[int, ...]) -> Node:
    """The graph input called `name` with the given type."""
    shape = tuple(as_dim(d) for d in shape)
    return _intern(("input", name, dtype, shape),
                   _fields("input", dtype=dtype, shape=shape, name=name))


def constant(value, dtype: str | None = None) -> Node:
    """A constant node holding a copy of `value` (numpy array or Python scalar)."""
    arr = np.asarray(value, dtype=dtypes.to_numpy(dtype) if dtype else None)
    if dtype is None:
        arr = arr.astype(dtypes.to_numpy(dtypes.from_numpy(arr.dtype)), copy=False)
    arr = np.array(arr, order="C", copy=True)
    arr.setflags(write=False)
    dt = dtypes.from_numpy(arr.dtype)
    # Interned by the digest of its bytes (hashed in place: no copy of the data is kept
    # in the table's key), the bytes compared on a digest match to be exact.
    fields = _fields("constant", dtype=dt, shape=arr.shape, value=arr)
    raw = arr.reshape(-1).view(np.uint8)
    digest = _digest(fields, raw)
    key = ("constant", dt, arr.shape, digest)
    node = _TABLE.get(key)
    if node is not None and not np.array_equal(node.value.reshape(-1).view(np.uint8), raw):
        key = ("constant", dt, arr.shape, digest, raw.tobytes())  # a collision: by bytes
    return _intern(key, fields, raw, digest)


class Builder:
    """Makes nodes: checks each against the op table, interns it, then rewrites it.

    `rewriter(node, builder)` returns the node to use instead (`ir.rewrites.Rewriter`
    for exact simplification; None builds nodes exactly as asked).
    """

    def __init__(self, rewriter: Callable[[Node, Builder], Node] | None = None):
        self.rewriter = rewriter

    def make(self, op: str, inputs, attrs: dict | None = None, label: str = "") -> Node:
        """The node `op(inputs, attrs)`, built (and checked) only if new, then rewritten."""
        inputs = tuple(inputs)
        if attrs:
            frozen: Attrs = tuple(sorted((k, _freeze(v)) for k, v in attrs.items()))
            typed = _typed(frozen)
        else:
            frozen = typed = ()
        node = _TABLE.get((op, inputs, typed, label))
        if node is None:
            dtype, shape, frozen, types = check_and_infer(op, inputs, frozen)
            node = _intern((op, inputs, _typed(frozen), label),
                           _fields(op, inputs, frozen, dtype, tuple(shape), label=label,
                                   types=types))
        if self.rewriter is None:
            return node
        # what the default rewriter made of the node is kept on it (rules are pure): a
        # node built again (derivative rules rebuild the same products) is not rewritten
        # again; itself is kept as None (no reference cycle)
        if self.rewriter is _DEFAULT_REWRITER:
            done = getattr(node, "_rewritten", _UNSET)
            if done is _UNSET:
                done = self.rewriter(node, self)
                object.__setattr__(node, "_rewritten", None if done is node else done)
            return node if done is None else done
        return self.rewriter(node, self)

    def constant(self, value, dtype: str | None = None) -> Node:
        """The constant node of `value`, as the module's `constant` (not rewritten), for
        rules that build through the builder they are given."""
        return constant(value, dtype)

    def lift(self, v, like: Node | None = None) -> Node:
        """`v` as a node: nodes pass through; numbers become constants of `like`'s dtype
        (exactly, or DTypeError), arrays constants of their own."""
        if isinstance(v, Node):
            return v
        if like is not None and isinstance(v, (int, float, bool, np.number)):
            value = np.asarray(v)
            converted = value.astype(like.dtype)
            if like.dtype not in ("float64", "float32") and not (
                    np.isfinite(value) and converted == value):
                raise DTypeError(f"the number {v!r} is not exactly a {like.dtype}: cast the "
                                 f"{like.dtype} operand first (adsvc.cast(x, 'float64'))")
            return constant(converted)
        return constant(v)

    def binary(self, op: str, a, b) -> Node:
        """`op(a, b)` with a Python number on either side lifted to the other's dtype."""
        if not isinstance(a, Node):  # a number takes the other side's dtype (node or array)
            a = self.lift(a, b if hasattr(b, "dtype") else None)
        return self.make(op, (a, self.lift(b, a)))


_UNSET = object()
_DEFAULT_REWRITER = Rewriter()
BUILDER = Builder(_DEFAULT_REWRITER)  # the default builder: exact simplification as made
make = BUILDER.make
lift = BUILDER.lift
