"""Trace Python functions into graphs: `trace(fn, x=f64(), y=f32(3, 4))`.

The function is called once with input nodes; operators and the functions of
`adsvc` (adsvc.exp, adsvc.sum, ...) build the graph. It may return one value (output
"out"), a tuple/list (outputs "out0", "out1", ...) or a dict (outputs named by its keys).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from adsvc.ir.graph import Graph
from adsvc.ir.node import input_node
from adsvc.passes.transforms import named_outputs
from adsvc_protocol import dtypes
from adsvc_protocol.dims import as_dim
from adsvc_protocol.names import check_user_name


@dataclass(frozen=True)
class Spec:
    """The declared type of a traced input. A dimension given by name ("n") is
    symbolic: the graph works for every size, bound by the feeds at evaluation."""

    dtype: str
    shape: tuple = ()


def _shape(shape) -> tuple:
    return tuple(as_dim(d) for d in shape)


def f64(*shape) -> Spec:
    """The type of a float64 input of `shape` (none: a scalar; a name such as "n": a
    symbolic dimension), for `trace`: `f64(3, 4)`, `f64("n")`, `f64("n", 3)`."""
    return Spec(dtypes.FLOAT64, _shape(shape))


def f32(*shape) -> Spec:
    """The type of a float32 input of `shape` (names: symbolic dimensions), for `trace`."""
    return Spec(dtypes.FLOAT32, _shape(shape))


def i64(*shape) -> Spec:
    """The type of an int64 input of `shape` (names: symbolic dimensions), for `trace`."""
    return Spec(dtypes.INT64, _shape(shape))


def i32(*shape) -> Spec:
    """The type of an int32 input of `shape` (names: symbolic dimensions), for `trace`."""
    return Spec(dtypes.INT32, _shape(shape))


def boolean(*shape) -> Spec:
    """The type of a bool input of `shape` (names: symbolic dimensions), for `trace`."""
    return Spec(dtypes.BOOL, _shape(shape))


def trace(fn: Callable, name: str | None = None, **specs: Spec) -> Graph:
    """Graph of `fn`, with one input per keyword in `specs` (default: every parameter of
    `fn` a float64 scalar)."""
    if not specs:
        specs = {p: f64() for p in inspect.signature(fn).parameters}
    for k, s in specs.items():
        check_user_name(k, "input")
        if not isinstance(s, Spec):
            raise TypeError(f"input {k!r}: give a type such as adsvc.f64() or adsvc.f32(3, 4)")
    inputs = {k: input_node(k, s.dtype, s.shape) for k, s in specs.items()}
    result = fn(**inputs)
    return Graph(list(inputs.values()), named_outputs(result),
                 name or getattr(fn, "__name__", "") .replace("<lambda>", "lambda"))
