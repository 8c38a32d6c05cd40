"""Loops in the IR: the `scan` and `while_loop` ops, whose bodies are graphs.

scan  operands [count?] carries… xs… consts…; body (c…, x_t…, k…) -> (c'…, y_t…)
      results  final carries…, ys… stacked on a leading axis of `length`, and with
               `save` = s > 0 the carry entering step t for every t divisible by s.
      `reverse` runs t = n-1 … 0; `counted` takes the trip count n <= length from the
      int operand in front (ys rows past n are zero).
while_loop operands carries… consts…; cond (c…, k…) -> bool, body (c…, k…) -> (c'…)
      results  final carries…, and with `save` the trip count and the carry entering
               every iteration (max_iters rows). More than `max_iters` iterations is an
               evaluation error.

Derivatives are passes over the bodies (`loop_rules`): the JVP of a loop is a loop over
the body's JVP; its VJP stores the carries (or checkpoints) on a saving variant of the
loop and runs the body's VJP in a reverse scan. The evaluator gives the kernels a
runnable plan for each body (`Plan.run_values`), so this layer runs no graphs itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adsvc.interrupt import loop_checker
from adsvc.ir.node import Node
from adsvc.ir.opdef import TUPLE, Attr, OpDef, register
from adsvc.passes.bodies import free_inputs
from adsvc_protocol import dtypes
from adsvc_protocol.dims import Dim, known_le
from adsvc_protocol.errors import (
    AttributeError_,
    DTypeError,
    EvaluationError,
    InvalidGraphError,
    ShapeError,
)


def _desc(dt: str, sh) -> str:
    return f"{dt}{list(sh)}"


def check_binding(op: str, what: str, node: Node, dt: str, sh: tuple) -> None:
    """Typed error unless operand `node` has type (dt, sh), that of the body input."""
    if node.dtype != dt or node.shape != sh:
        cls = DTypeError if node.dtype != dt else ShapeError
        raise cls(f"op {op!r}: {what} is {_desc(node.dtype, node.shape)} but the body "
                  f"takes {_desc(dt, sh)}")


def check_arity(op: str, graph, n_in: int, n_out: int | None, what: str) -> None:
    """InvalidGraphError unless `graph` has `n_in` inputs (and `n_out` outputs)."""
    if len(graph.inputs) != n_in or (n_out is not None and len(graph.outputs) != n_out):
        want = f"{n_in} inputs" + ("" if n_out is None else f" and {n_out} outputs")
        raise InvalidGraphError(f"op {op!r}: the {what} has {len(graph.inputs)} inputs and "
                                f"{len(graph.outputs)} outputs; its operands need {want}")
    for _, n in graph.outputs:
        if n.dtype == TUPLE:
            raise InvalidGraphError(f"op {op!r}: an output of the {what} has several results")


def check_closed(op: str, graph, what: str) -> None:
    """InvalidGraphError if a body reads a value that is not one of its inputs."""
    free = free_inputs(graph)
    if free:
        raise InvalidGraphError(f"op {op!r}: the {what} reads {free[0].name!r}, which is not "
                                "one of its inputs (bind it as an operand)")


def check_carries_kept(op: str, graph, carries, what: str = "body") -> None:
    """Typed error naming the carry whose type the body changes."""
    for i, (c, (_, out)) in enumerate(zip(carries, graph.outputs)):
        if (out.dtype, out.shape) != (c.dtype, c.shape):
            cls = DTypeError if out.dtype != c.dtype else ShapeError
            raise cls(f"op {op!r}: the {what} changes carry {i} ({graph.inputs[i].name}) "
                      f"from {_desc(c.dtype, c.shape)} to {_desc(out.dtype, out.shape)}")


def check_count(op: str, n: Node) -> None:
    """A trip count is an integer scalar."""
    if n.dtype not in dtypes.INTS or n.shape != ():
        raise DTypeError(f"op {op!r}: the trip count must be an integer scalar, got "
                         f"{_desc(n.dtype, n.shape)}")


# -- scan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanParts:
    """A scan node's operands by role, and its attributes."""

    count: Node | None
    carries: tuple
    xs: tuple
    consts: tuple
    length: int
    reverse: bool
    save: int

    @property
    def offset(self) -> int:
        """Index of the first carry operand."""
        return 0 if self.count is None else 1


def scan_parts(inputs, attrs: dict) -> ScanParts:
    """Split a scan's operands by role (`attrs` as the op table fills them in)."""
    off = 1 if attrs.get("counted") else 0
    c, x = attrs["carries"], attrs["xs"]
    if c < 0 or x < 0 or off + c + x > len(inputs):
        raise AttributeError_(f"op 'scan': carries={c}, xs={x} do not fit its "
                              f"{len(inputs)} operands")
    return ScanParts(inputs[0] if off else None, tuple(inputs[off:off + c]),
                     tuple(inputs[off + c:off + c + x]), tuple(inputs[off + c + x:]),
                     attrs["length"], attrs.get("reverse", False), attrs.get("save", 0))


def saved_rows(length, save: int):
    """How many carries a scan with `save` = s stores (steps 0, s, 2s, …); a symbolic
    length is stored whole (save = 1: checkpoints need a known length)."""
    if not save:
        return 0
    if isinstance(length, Dim):
        if save != 1:
            raise AttributeError_(f"op 'scan': save={save} needs a known length, not {length}")
        return length
    return math.ceil(length / save)


def _scan_infer(ins, a):
    p = scan_parts(ins, a)
    body = a["body"]
    if known_le(0, p.length) is False or p.save < 0:
        raise AttributeError_("op 'scan': length and save must be >= 0")
    if p.count is not None:
        check_count("scan", p.count)
    n_c, n_x = len(p.carries), len(p.xs)
    check_arity("scan", body, n_c + n_x + len(p.consts), None, "body")
    if len(body.outputs) < n_c:
        raise InvalidGraphError(f"op 'scan': the body returns {len(body.outputs)} values, "
                                f"fewer than its {n_c} carries")
    check_closed("scan", body, "body")
    b_in = body.inputs
    for i, c in enumerate(p.carries):
        check_binding("scan", f"carry {i}", c, b_in[i].dtype, b_in[i].shape)
    for i, x in enumerate(p.xs):
        if x.ndim == 0 or x.shape[0] != p.length:
            raise ShapeError(f"op 'scan': xs operand {i} has shape {list(x.shape)}; its "
                             f"leading axis must be the length {p.length}")
        bi = b_in[n_c + i]
        check_binding("scan", f"a row of xs operand {i}", x, bi.dtype, (p.length, *bi.shape))
    for i, k in enumerate(p.consts):
        bi = b_in[n_c + n_x + i]
        check_binding("scan", f"const operand {i}", k, bi.dtype, bi.shape)
    check_carries_kept("scan", body, p.carries)
    outs = [n for _, n in body.outputs]
    types = [(c.dtype, c.shape) for c in p.carries]
    types += [(y.dtype, (p.length, *y.shape)) for y in outs[n_c:]]
    rows = saved_rows(p.length, p.save)
    types += [(c.dtype, (rows, *c.shape)) for c in p.carries] if p.save else []
    return TUPLE, types


def _zeros(types) -> list[np.ndarray]:
    return [np.zeros(sh, dtypes.to_numpy(dt)) for dt, sh in types]


def _scan_kernel(a):
    body, n_c, length, save = a["body"], a["carries"], a["length"], a.get("save", 0)

    def run(*args):
        p = scan_parts(args, a)
        n = length if p.count is None else int(p.count)
        if not 0 <= n <= length:
            raise EvaluationError(f"scan: the trip count {n} is outside 0..{length}")
        ys = _zeros([(dt, (length, *sh)) for dt, sh in body.output_types[n_c:]])
        saved = _zeros([(np.asarray(c).dtype.name, (saved_rows(length, save),
                                                     *np.shape(c))) for c in p.carries]
                       ) if save else []
        carries, tick = list(p.carries), loop_checker(body)
        for s in range(n):
            t = n - 1 - s if p.reverse else s
            if save and t % save == 0:
                for buf, c in zip(saved, carries):
                    buf[t // save] = c
            outs = body.run_values([*carries, *(x[t] for x in p.xs), *p.consts])
            carries = outs[:n_c]
            for buf, y in zip(ys, outs[n_c:]):
                buf[t] = y
            if tick is not None:
                tick()
        return tuple([np.asarray(c) for c in carries] + ys + saved)
    return run


def _scan_trips(node):
    n = node.attr("length")
    return {"body": n}


# -- while_loop -------------------------------------------------------------------------------
def _while_infer(ins, a):
    n_c, cond, body, m = a["carries"], a["cond"], a["body"], a["max_iters"]
    if not 0 <= n_c <= len(ins):
        raise AttributeError_(f"op 'while_loop': carries={n_c} does not fit its "
                              f"{len(ins)} operands")
    if m < 0:
        raise AttributeError_("op 'while_loop': max_iters must be >= 0")
    carries = ins[:n_c]
    check_arity("while_loop", cond, len(ins), 1, "condition")
    check_arity("while_loop", body, len(ins), n_c, "body")
    for what, g in (("condition", cond), ("body", body)):
        check_closed("while_loop", g, what)
        for i, (x, bi) in enumerate(zip(ins, g.inputs)):
            role = f"carry {i}" if i < n_c else f"const operand {i - n_c}"
            check_binding("while_loop", f"{role} (of the {what})", x, bi.dtype, bi.shape)
    pred = cond.outputs[0][1]
    if pred.dtype != dtypes.BOOL or pred.shape != ():
        raise DTypeError(f"op 'while_loop': the condition must return a bool scalar, got "
                         f"{_desc(pred.dtype, pred.shape)}")
    check_carries_kept("while_loop", body, carries)
    types = [(c.dtype, c.shape) for c in carries]
    if a.get("save"):
        types += [(dtypes.INT64, ())] + [(c.dtype, (m, *c.shape)) for c in carries]
    return TUPLE, types


def _while_kernel(a):
    cond, body, n_c, m, save = a["cond"], a["body"], a["carries"], a["max_iters"], a.get("save")

    def run(*args):
        carries, consts = list(args[:n_c]), list(args[n_c:])
        saved = _zeros([(np.asarray(c).dtype.name, (m, *np.shape(c))) for c in carries]
                       ) if save else []
        tick, n = loop_checker(body), 0
        while bool(cond.run_values([*carries, *consts])[0]):
            if n == m:
                raise EvaluationError(f"while_loop: the condition still holds after "
                                      f"max_iters={m} iterations; raise max_iters or check "
                                      "that the loop ends")
            for buf, c in zip(saved, carries):
                buf[n] = c
            carries = body.run_values([*carries, *consts])[:n_c]
            n += 1
            if tick is not None:
                tick()
        out = [np.asarray(c) for c in carries]
        return tuple(out + [np.asarray(n, np.int64)] + saved) if save else tuple(out)
    return run


def _while_trips(node):
    return {"cond": 1, "body": 1}  # a lower bound: the loop checks its deadline as it runs


def register_loops(scan_jvp, scan_vjp, while_jvp, while_vjp) -> None:
    """Declare scan and while_loop with their derivative rules (`loop_rules`)."""
    register(OpDef(
        "scan", None, _scan_infer, _scan_kernel, scan_jvp, scan_vjp, {
            "body": Attr("graph", doc="(carries, x rows, consts) -> (carries, y rows)"),
            "carries": Attr("int", doc="how many operands (after the count) are carries"),
            "xs": Attr("int", doc="how many operands after the carries are scanned over"),
            "length": Attr("int", doc="steps (the leading axis of xs and ys)"),
            "reverse": Attr("bool", False, "run the steps last to first"),
            "counted": Attr("bool", False, "the first operand is the trip count (<= length)"),
            "save": Attr("int", 0, "also return the carry entering every save-th step"),
            "checkpoint": Attr("int", 0, "reverse mode: 0 chooses by the memory budget, 1 "
                                         "stores every carry, k > 1 every k-th (recomputing)"),
        }, trips=_scan_trips, temporaries=0,
        doc="a loop over the leading axis of xs carrying state (its body is a graph)"))
    register(OpDef(
        "while_loop", None, _while_infer, _while_kernel, while_jvp, while_vjp, {
            "cond": Attr("graph", doc="(carries, consts) -> bool scalar: go on?"),
            "body": Attr("graph", doc="(carries, consts) -> carries"),
            "carries": Attr("int", doc="how many operands are carries (the rest: consts)"),
            "max_iters": Attr("int", doc="the most iterations allowed (an error beyond)"),
            "save": Attr("bool", False, "also return the trip count and every carry"),
        }, trips=_while_trips,
        doc="a loop while a condition holds, at most max_iters times (bodies are graphs)"))
