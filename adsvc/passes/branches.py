"""Branches in the IR: the `cond` op, whose branches are graphs.

cond  operands index, operands…; branches (graphs, all taking the operands' types and
      returning the same types). Runs only branch `index` (a bool picks branch 0 for
      False, 1 for True; an int out of range is an evaluation error); its results are
      that branch's outputs.

Its derivatives are the derivatives of the taken branch: the JVP is a cond over each
branch's JVP, the VJP a cond over each branch's VJP (each recomputes the branch's inner
values it needs), both by the ordinary passes.
"""

from __future__ import annotations

import numpy as np

from adsvc.interrupt import compile_check
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, make
from adsvc.ir.opdef import TUPLE, Attr, OpDef, register
from adsvc.ops import api as A
from adsvc.passes.activity import active_nodes
from adsvc.passes.bodies import make_body, role_names
from adsvc.passes.forward import jvp_graph
from adsvc.passes.loop_rules import record_primal
from adsvc.passes.loops import check_arity, check_binding, check_closed
from adsvc.passes.reverse import vjp_graph
from adsvc_protocol import dtypes
from adsvc_protocol.errors import DTypeError, EvaluationError, InvalidGraphError, ShapeError


def _cond_infer(ins, a):
    if not ins:
        raise InvalidGraphError("op 'cond' needs the branch index as its first operand")
    index, operands = ins[0], ins[1:]
    if index.shape != () or index.dtype not in dtypes.INTS | {dtypes.BOOL}:
        raise DTypeError(f"op 'cond': the index must be a bool or integer scalar, got "
                         f"{index.dtype}{list(index.shape)}")
    branches = a["branches"]
    if index.dtype == dtypes.BOOL and len(branches) != 2:
        raise InvalidGraphError(f"op 'cond': a bool index needs 2 branches, got {len(branches)}")
    first = branches[0]
    for b, g in enumerate(branches):
        what = f"branch {b}"
        check_arity("cond", g, len(operands), len(first.outputs), what)
        check_closed("cond", g, what)
        for i, (x, gi) in enumerate(zip(operands, g.inputs)):
            check_binding("cond", f"operand {i} (of {what})", x, gi.dtype, gi.shape)
        for j, ((_, o), (_, o0)) in enumerate(zip(g.outputs, first.outputs)):
            if (o.dtype, o.shape) != (o0.dtype, o0.shape):
                raise (DTypeError if o.dtype != o0.dtype else ShapeError)(
                    f"op 'cond': result {j} of {what} is {o.dtype}{list(o.shape)} but of "
                    f"branch 0 {o0.dtype}{list(o0.shape)}: branches must return the same "
                    "types")
    return TUPLE, [(o.dtype, o.shape) for _, o in first.outputs]


def _cond_kernel(a):
    branches = a["branches"]

    def run(index, *operands):
        i = int(index)
        if not 0 <= i < len(branches):
            raise EvaluationError(f"cond: branch index {i} is outside 0..{len(branches) - 1}")
        return tuple(np.asarray(v) for v in branches[i].run_values(list(operands)))
    return run


def _outs(g: Graph) -> list[Node]:
    return [n for _, n in g.outputs]


def _floats(g: Graph) -> list[int]:
    return [j for j, o in enumerate(_outs(g)) if dtypes.is_float(o.dtype)]


def _cond_jvp(node: Node, ts):
    index, operands = node.inputs[0], node.inputs[1:]
    act = [i for i, t in enumerate(ts[1:]) if t is not None]
    branches = node.attr("branches")
    live = [j for j in _floats(branches[0])
            if any(id(_outs(g)[j]) in active_nodes(g, [g.inputs[i] for i in act], _outs(g))
                   for g in branches)]
    if not act or not live:
        return None
    new = []
    for g in branches:
        tg, _ = jvp_graph(g, [g.inputs[i] for i in act], [g.outputs[j][0] for j in live],
                          check=compile_check())
        n_out = len(g.outputs)
        new.append(make_body(tg.inputs, _outs(tg), role_names("a", len(tg.inputs)),
                             role_names("r", n_out + len(live)), g.name))
    tangents = [ts[1 + i] for i in act]
    t = make("cond", [index, *operands, *tangents], {"branches": tuple(new)})
    record_primal(t, node, {j: j for j in range(len(node.types))})
    out: list[Node | None] = [None] * len(node.types)
    for q, j in enumerate(live):
        out[j] = A.element(t, len(node.types) + q)
    return tuple(out)


def _cond_vjp(node: Node, ct):
    index, operands = node.inputs[0], node.inputs[1:]
    branches = node.attr("branches")
    wrt = [i for i, x in enumerate(operands) if dtypes.is_float(x.dtype) and x.op != "constant"]
    with_ct = [j for j, c in enumerate(ct) if c is not None]
    if not wrt or not with_ct:
        return [None] * len(node.inputs)
    new = []
    for g in branches:
        vg, _ = vjp_graph(g, [g.inputs[i] for i in wrt], [g.outputs[j][0] for j in with_ct],
                          check=compile_check())
        grads = _outs(vg)[len(g.outputs):]
        new.append(make_body(vg.inputs, grads, role_names("a", len(vg.inputs)),
                             role_names("r", len(grads)), g.name))
    b = make("cond", [index, *operands, *[ct[j] for j in with_ct]], {"branches": tuple(new)})
    res: list[Node | None] = [None] * len(node.inputs)
    for q, i in enumerate(wrt):
        res[1 + i] = A.element(b, q)
    return res


register(OpDef(
    "cond", None, _cond_infer, _cond_kernel, _cond_jvp, _cond_vjp,
    {"branches": Attr("graphs", doc="the branches: graphs over the operands, same results")},
    trips=lambda node: {"branches": 1},
    doc="run one of several branches (graphs), chosen by the first operand"))
