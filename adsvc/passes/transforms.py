"""Function transformations that work inside traces: grad, value_and_grad, jvp, vjp,
jacobian, hessian — nested to any depth, in any mix of modes.

Each transformation traces the function on fresh inputs (one per argument, typed like
the argument and named uniquely, so an inner derivative can never be confused with an
outer one, even through values the function closes over), differentiates that graph
with the ordinary passes, and inlines the result on the actual arguments (`inline`).
So the result is a set of nodes of the enclosing trace — itself differentiable — and
there is no second AD implementation. Called on plain numbers or arrays, the result
is still a node (constant-folded where small).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, input_node, lift, make
from adsvc.passes.inline import inline
from adsvc.passes.pipeline import differentiate, signature
from adsvc_protocol import dtypes, names
from adsvc_protocol.errors import InvalidRequestError
from adsvc_protocol.recipes import scalar_output

_FRESH = itertools.count()


def named_outputs(result) -> list[tuple[str, Node]]:
    """A traced function's result as named outputs: one value -> "out", a tuple/list ->
    "out0", "out1", ..., a dict -> its keys."""
    if isinstance(result, dict):
        items = list(result.items())
    elif isinstance(result, (tuple, list)):
        items = [(f"out{i}", v) for i, v in enumerate(result)]
    else:
        items = [("out", result)]
    for name, v in items:
        names.check_user_name(name, "output")
        if isinstance(v, (tuple, list, dict)):
            raise TypeError(f"output {name!r} is a {type(v).__name__}: return a value, a "
                            "tuple/list of values or a dict of them (not nested)")
    return [(name, lift(v)) for name, v in items]


def _rebuild(result, values: list):
    """`values` (one per output, in order) in the structure of `result`."""
    if isinstance(result, dict):
        return dict(zip(result, values))
    if isinstance(result, (tuple, list)):
        return type(result)(values)
    return values[0]


@dataclass
class _Traced:
    graph: Graph  # fn on fresh inputs
    fresh: dict[str, str]  # parameter -> its fresh input's name
    bound: dict[str, Node]  # fresh input name -> the argument's node
    result: object  # fn's result, for its structure


def _trace_at(fn: Callable, args, kwargs) -> _Traced:
    """`fn` traced on one fresh input per argument that is a node, number or array."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    call_args, fresh, binding, inputs = {}, {}, {}, []
    for p, v in bound.arguments.items():
        if not isinstance(v, (Node, int, float, np.ndarray, np.number)) or isinstance(v, bool):
            call_args[p] = v  # a static argument: passed through as it is
            continue
        node = lift(v)
        name = f"{p}#{next(_FRESH)}"
        x = input_node(name, node.dtype, node.shape)
        call_args[p], fresh[p], binding[name] = x, name, node
        inputs.append(x)
    result = fn(**call_args)
    graph = Graph(inputs, named_outputs(result), getattr(fn, "__name__", ""))
    return _Traced(graph, fresh, binding, result)


def _wrt(t: _Traced, wrt, fn) -> list[str]:
    """The parameters to differentiate with respect to (default: the first one)."""
    params = [wrt] if isinstance(wrt, str) else list(wrt) if wrt is not None else None
    if params is None:
        params = list(t.fresh)[:1]
    for p in params:
        if p not in t.fresh:
            raise InvalidRequestError(
                f"{getattr(fn, '__name__', 'the function')} has no array argument {p!r} to "
                f"differentiate with respect to (arguments: {', '.join(t.fresh)})",
                field=f"wrt.{p}")
    return params


def _pick(values: list, wrt) -> object:
    return values[0] if wrt is None or isinstance(wrt, str) else tuple(values)


def value_and_grad(fn: Callable, wrt: str | Sequence[str] | None = None) -> Callable:
    """`fn` -> a function returning (fn's value, its gradient) with respect to the
    parameters `wrt` (default: the first; a name gives one gradient, a sequence a
    tuple). `fn` must return one scalar float."""
    @functools.wraps(fn)
    def transformed(*args, **kwargs):
        t = _trace_at(fn, args, kwargs)
        params = _wrt(t, wrt, fn)
        out = scalar_output(signature(t.graph)[1], primal_only=False)
        dg = differentiate(t.graph, "reverse", [t.fresh[p] for p in params], seed=True)
        res = inline(dg, t.bound)
        return res[out], _pick([res[names.grad(t.fresh[p])] for p in params], wrt)
    return transformed


def grad(fn: Callable, wrt: str | Sequence[str] | None = None) -> Callable:
    """`fn` -> a function returning its gradient with respect to `wrt` (see
    value_and_grad): nodes of the trace it is called in."""
    vg = value_and_grad(fn, wrt)

    @functools.wraps(fn)
    def transformed(*args, **kwargs):
        return vg(*args, **kwargs)[1]
    return transformed


def jvp(fn: Callable, primals: Sequence, tangents: Sequence):
    """(fn(*primals), J·tangents): forward mode along `tangents`, one per positional
    argument (None: no tangent); results in the structure of fn's result (None for
    outputs that are not float)."""
    t = _trace_at(fn, tuple(primals), {})
    seeds = {p: v for p, v in zip(t.fresh, tangents) if v is not None}
    dg = differentiate(t.graph, "forward", [t.fresh[p] for p in seeds])
    binding = dict(t.bound)
    for p, v in seeds.items():
        x = t.graph.input(t.fresh[p])
        binding[names.tangent(x.name)] = _like(v, x)
    res = inline(dg, binding)
    outs = t.graph.output_names
    return (_rebuild(t.result, [res[o] for o in outs]),
            _rebuild(t.result, [res.get(names.tangent(o)) for o in outs]))


def vjp(fn: Callable, *primals):
    """(fn(*primals), vjp_fn): `vjp_fn(cotangents)` (in the structure of fn's result;
    None for a zero cotangent) returns the tuple of J^T·cotangents, one per argument
    (None for arguments that are not float)."""
    t = _trace_at(fn, primals, {})
    floats = [p for p, n in t.fresh.items() if dtypes.is_float(t.graph.input(n).dtype)]
    dg = differentiate(t.graph, "reverse", [t.fresh[p] for p in floats])
    outs = t.graph.output_names
    res0 = inline(t.graph, t.bound)

    def vjp_fn(cotangents):
        if isinstance(t.result, dict):
            cts = [cotangents.get(o) for o in outs]
        elif isinstance(t.result, (tuple, list)):
            cts = list(cotangents)
        else:
            cts = [cotangents]
        binding = dict(t.bound)
        for o, ct in zip(outs, cts):
            name = names.cotangent(o)
            if name in dg.input_names:
                binding[name] = _like(0.0 if ct is None else ct, dg.input(name))
        res = inline(dg, binding)
        return tuple(res[names.grad(t.fresh[p])] if p in floats else None for p in t.fresh)
    return _rebuild(t.result, [res0[o] for o in outs]), vjp_fn


def _like(v, x: Node) -> Node:
    """`v` as a node of x's dtype and shape (numbers broadcast)."""
    node = lift(v, x)
    if node.dtype != x.dtype:
        node = make("cast", (node,), {"dtype": x.dtype})
    return node if node.shape == x.shape else make("broadcast_to", (node,), {"shape": x.shape})


def _one_hot(x: Node, e: int) -> Node:
    a = np.zeros(x.shape, dtype=dtypes.to_numpy(x.dtype))
    a.reshape(-1)[e] = 1
    return constant(a)


def jacobian(fn: Callable, wrt: str | Sequence[str] | None = None,
             mode: str = "forward") -> Callable:
    """`fn` -> a function returning d outputs / d `wrt` (each of shape out.shape +
    in.shape): one sweep per element of the inputs (forward) or of the outputs
    (reverse), each inlined into the trace. A tuple over outputs when fn returns a
    tuple, and (per output) over `wrt` when it is a sequence."""
    @functools.wraps(fn)
    def transformed(*args, **kwargs):
        t = _trace_at(fn, args, kwargs)
        params = _wrt(t, wrt, fn)
        xs = [t.graph.input(t.fresh[p]) for p in params]
        outs = [o for o, n in t.graph.outputs if dtypes.is_float(n.dtype)]
        blocks = (_forward_blocks if mode == "forward" else _reverse_blocks)(t, xs, outs)
        per_out = [_pick([blocks[o][x.name] for x in xs], wrt) for o in outs]
        return _rebuild(t.result, per_out) if isinstance(t.result, (tuple, list, dict)) \
            else per_out[0]
    if mode not in ("forward", "reverse"):
        raise InvalidRequestError(f"unknown mode {mode!r} (use 'forward' or 'reverse')",
                                  field="mode")
    return transformed


def _forward_blocks(t: _Traced, xs: list[Node], outs: list[str]):
    dg = differentiate(t.graph, "forward", [x.name for x in xs])
    zero = {names.tangent(x.name): _like(0.0, x) for x in xs}
    cols = {o: {x.name: [] for x in xs} for o in outs}
    for x in xs:
        for e in range(x.size):
            res = inline(dg, {**t.bound, **zero, names.tangent(x.name): _one_hot(x, e)})
            for o in outs:
                cols[o][x.name].append(res[names.tangent(o)])
    return {o: {x.name: _stack(cols[o][x.name], t.graph.output(o).shape, x.shape, -1)
                for x in xs} for o in outs}


def _reverse_blocks(t: _Traced, xs: list[Node], outs: list[str]):
    dg = differentiate(t.graph, "reverse", [x.name for x in xs])
    zero = {names.cotangent(o): _like(0.0, t.graph.output(o)) for o in outs}
    rows = {o: {x.name: [] for x in xs} for o in outs}
    for o in outs:
        y = t.graph.output(o)
        for e in range(y.size):
            res = inline(dg, {**t.bound, **zero, names.cotangent(o): _one_hot(y, e)})
            for x in xs:
                rows[o][x.name].append(res[names.grad(x.name)])
    return {o: {x.name: _stack(rows[o][x.name], t.graph.output(o).shape, x.shape, 0)
                for x in xs} for o in outs}


def _stack(parts: list[Node], out_shape, in_shape, axis: int) -> Node:
    """The Jacobian block out_shape + in_shape from its columns (axis -1: one per input
    element) or rows (axis 0: one per output element)."""
    shape = tuple(out_shape) + tuple(in_shape)
    if not parts:  # an empty input or output: an empty block
        return make("broadcast_to", (constant(np.zeros((), np.float64)),), {"shape": shape})
    unit = (1,) if axis == 0 else ()
    cols = [make("reshape", (p,), {"shape": unit + p.shape + ((1,) if axis else ())})
            for p in parts]
    joined = cols[0] if len(cols) == 1 else make("concat", tuple(cols), {"axis": axis})
    return make("reshape", (joined,), {"shape": shape})


def hessian(fn: Callable, wrt: str | Sequence[str] | None = None) -> Callable:
    """`fn` -> a function returning its Hessian with respect to `wrt` (forward over
    reverse: the Jacobian of the gradient): shape x.shape + x.shape; for a sequence
    `wrt`, a tuple of tuples H[i][j]."""
    return jacobian(grad(fn, wrt), wrt, mode="forward")
