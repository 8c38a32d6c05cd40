"""The op table: one declaration per op.

An `OpDef` holds everything adsvc knows about an op: arity, attributes, the
shape/dtype rule, the numpy kernel, the JVP and VJP rules, and what kind of derivative
it has (`derivative`: a rule, identically zero, or none), and which operand elements
each output element depends on (`sparsity`, read by the sparsity pass). Rules are
written with the graph builder (they emit nodes) and return None for a symbolic zero
derivative. The declarations live in `adsvc.ops` (one module per family) and register
themselves here; the builder, the decoder, the passes, the plan, the op docs and
GetServerInfo all read this one table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adsvc_protocol import dtypes
from adsvc_protocol.dims import Dim, as_dim
from adsvc_protocol.errors import ArityError, AttributeError_, ShapeError, UnknownOpError

REQUIRED = object()

# What differentiating through an op means (OpDef.derivative):
RULE = "rule"  # JVP and VJP rules give the derivative
ZERO = "zero"  # the derivative is identically zero (sign, stop_gradient): cuts the path
NONE = "none"  # no derivative: no operands (constant) or a bool result (comparisons)
DERIVATIVES = (RULE, ZERO, NONE)
BILINEAR = "bilinear"  # OpDef.linear of a product: linear in each operand separately


@dataclass(frozen=True)
class Attr:
    """Declaration of an op attribute: its kind, its default (REQUIRED; None: optional
    and left absent) and its documentation."""

    kind: str  # "int", "float", "str", "bool", "ints", "dtype", "graph" or "graphs"
    default: Any = REQUIRED
    doc: str = ""


@dataclass(frozen=True)
class OpDef:
    """Declaration of one op. See the module docstring."""

    name: str
    arity: int | None  # None: one or more operands (variadic)
    infer: Callable  # (inputs: tuple[Node], attrs: dict) -> (dtype, shape)
    kernel: Callable  # (attrs: dict) -> fn(*arrays) -> array
    jvp: Callable | None = None  # (node, tangents: list[Node|None]) -> Node|None
    vjp: Callable | None = None  # (node, ct: Node) -> list[Node|None], one per operand
    attrs: dict[str, Attr] = field(default_factory=dict)
    doc: str = ""
    derivative: str = RULE
    # What evaluating it costs (the plan's memory budget and deadline checks read these):
    view: bool = False  # the kernel returns a view of operand 0 (no new memory)
    # buffers the kernel allocates while it runs, each as large as its largest operand or
    # result (at their full, broadcast shapes): counted in the plan's peak memory
    temporaries: float = 0
    # linear in its differentiable operands: its derivative is the same op on the tangent
    # (or its transpose), so differentiating it adds about one node and never compounds;
    # BILINEAR: linear in each operand (mul, matmul), so linear where one is active
    linear: bool | str = False
    flops: Callable | None = None  # node -> arithmetic operations; None: one per element
    # Which operand elements each output element depends on: a rule of adsvc.ops.patterns
    # (node -> one boolean pattern per operand); None: the conservative "dense" fallback.
    sparsity: Callable | None = None
    # Ops with sub-graphs (loop bodies, branches): node -> {attribute: how many times
    # that graph runs per evaluation (an estimate for while loops)}; the cost model
    # multiplies each sub-graph's cost by it.
    trips: Callable | None = None

    def __post_init__(self):
        if self.derivative not in DERIVATIVES:
            raise ValueError(f"op {self.name!r}: derivative must be one of {DERIVATIVES}")
        has_rules = self.jvp is not None and self.vjp is not None
        if has_rules != (self.derivative == RULE):
            raise ValueError(f"op {self.name!r}: derivative={self.derivative!r} needs "
                             + ("JVP and VJP rules" if self.derivative == RULE else "no rules"))


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Add `op` to the op table and return it; ValueError if the name is taken."""
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} declared twice")
    OPS[op.name] = op
    return op


def get(name: str) -> OpDef:
    """The declaration of op `name`; UnknownOpError if the table has none."""
    try:
        return OPS[name]
    except KeyError:
        raise UnknownOpError(f"unknown op {name!r}") from None


def _check_attr(op: str, key: str, spec: Attr, v: Any) -> Any:
    kind = spec.kind
    ok = {
        "int": lambda: (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, Dim),
        "float": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda: isinstance(v, str),
        "bool": lambda: isinstance(v, bool),
        "ints": lambda: isinstance(v, tuple) and all(
            (isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, Dim) for x in v),
        "dtype": lambda: v in dtypes.DTYPES,
        "graph": lambda: _is_graph(v),
        "graphs": lambda: isinstance(v, tuple) and len(v) > 0 and all(map(_is_graph, v)),
    }[kind]()
    if not ok:
        raise AttributeError_(f"op {op!r}: attribute {key!r} must be {kind}, got {v!r}")
    return float(v) if kind == "float" else v


def _is_graph(v) -> bool:
    """Is `v` an IR graph (`adsvc.ir.graph.Graph`, which imports this module: recognised
    by what it has)?"""
    return all(hasattr(v, a) for a in ("inputs", "outputs", "key", "nodes"))


TUPLE = "tuple"  # the dtype of a node with several results (a loop, a branch); its
# results, typed by Node.types, are read by "element" nodes


def check_and_infer(op: str, inputs: tuple, attrs: tuple) -> tuple[str, tuple, tuple]:
    """Check arity and attributes, apply defaults, run the shape rule.

    Returns (dtype, shape, attrs with defaults filled in, sorted, result types): the
    types are None, or for an op with several results (dtype TUPLE, shape ()) the
    (dtype, shape) of each, which a shape rule returns as `(TUPLE, types)`.
    """
    d = get(op)
    if d.arity is None:
        if not inputs:
            raise ArityError(f"op {op!r} takes one or more operands, got 0")
    elif len(inputs) != d.arity:
        raise ArityError(f"op {op!r} takes {d.arity} operand(s), got {len(inputs)}")
    given = dict(attrs)
    for key in given:
        if key not in d.attrs:
            known = ", ".join(d.attrs) or "none"
            raise AttributeError_(f"op {op!r} has no attribute {key!r} (known: {known})")
    full = {}
    for key, spec in d.attrs.items():
        if key in given:
            full[key] = _check_attr(op, key, spec, given[key])
        elif spec.default is REQUIRED:
            raise AttributeError_(f"op {op!r} requires attribute {key!r} ({spec.kind})")
        elif spec.default is not None:
            full[key] = spec.default
    dtype, shape = d.infer(inputs, full)
    types = None
    if dtype == TUPLE:
        types = tuple((dt, tuple(as_dim(x) for x in sh)) for dt, sh in shape)
        for _, sh in types:
            check_shape(op, sh)
        shape = ()
    shape = tuple(as_dim(s) for s in shape)
    check_shape(op, shape)
    return dtype, shape, tuple(sorted(full.items())), types


MAX_ELEMENTS = 2**62  # beyond this, element counts and byte sizes overflow int64


def check_shape(what: str, shape: tuple) -> None:
    """Every dimension >= 0 and the element count representable (exact Python ints);
    symbolic dimensions are checked when they are bound."""
    fixed = [d for d in shape if not isinstance(d, Dim)]
    if any(d < 0 for d in fixed):
        raise ShapeError(f"{what}: negative dimension in {list(shape)}")
    if math.prod(fixed) >= MAX_ELEMENTS or any(d >= MAX_ELEMENTS for d in fixed):
        raise ShapeError(f"{what}: shape {list(shape)} has too many elements")
