"""Control flow inside traces: `adsvc.scan`, `fori_loop`, `while_loop`, `cond`, `switch`.

Each traces its Python functions once, on fresh inputs typed like the carries (or
operands), into closed bodies (`bodies.trace_bodies`: values of the enclosing trace the
functions read become operands), and builds one `scan` / `while_loop` / `cond` node. So
the graph's size does not depend on the trip count, and the loop is differentiable in
both modes, to any order (`loop_rules`, `branches`). Carries, operands and results may be
nests of tuples, lists and dicts; a body that changes a carry's dtype or shape is an
error that names the carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from adsvc.ir.node import Node, make
from adsvc.ops import api as A
from adsvc.passes import branches as _branches  # noqa: F401  (registers cond)
from adsvc.passes import loop_rules as _loop_rules  # noqa: F401  (registers the loops)
from adsvc.passes.bodies import (
    Tree,
    as_node,
    check_same_types,
    flatten,
    fresh_inputs,
    role_names,
    trace_bodies,
    unflatten,
)
from adsvc_protocol import dtypes
from adsvc_protocol.errors import DTypeError, InvalidRequestError, ShapeError


def _leaves(tree, what: str) -> tuple[list[Node], Tree]:
    leaves, structure = flatten(tree)
    paths = structure.paths(what)
    return [as_node(v, p) for v, p in zip(leaves, paths)], structure


def _types(nodes: Sequence[Node]) -> list[tuple[str, tuple]]:
    return [(n.dtype, n.shape) for n in nodes]


def _result_leaves(value, structure: Tree, like: Sequence[Node], who: str) -> list[Node]:
    """The leaves of a body's new carry, which must have the structure and types of the
    carry (`like`)."""
    leaves, got = flatten(value)
    if got != structure:
        raise InvalidRequestError(f"{who} must return the carry's structure "
                                  f"{_describe(structure)}, got {_describe(got)}",
                                  field="carry")
    paths = structure.paths("carry")
    nodes = [as_node(v, p, like=c) for v, p, c in zip(leaves, paths, like)]
    check_same_types(like, nodes, paths, who)
    return nodes


def _describe(s: Tree) -> str:
    if s.kind == "leaf":
        return "a value"
    if s.kind == "none":
        return "None"
    inner = [_describe(c) for c in s.children]
    if s.kind == "dict":
        return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(s.keys, inner)) + "}"
    left, right = ("(", ")") if s.kind == "tuple" else ("[", "]")
    return left + ", ".join(inner) + right


def _length(xs: list[Node], length: int | None) -> int:
    lengths = {x.shape[0] if x.ndim else None for x in xs}
    if None in lengths:
        raise ShapeError("scan: every xs value needs a leading axis to scan over", field="xs")
    if len(lengths) > 1:
        raise ShapeError(f"scan: xs values have different leading axes {sorted(lengths)}",
                         field="xs")
    if lengths:
        n = lengths.pop()
        if length is not None and length != n:
            raise ShapeError(f"scan: length={length} but xs have {n} rows", field="length")
        return n
    if length is None:
        raise InvalidRequestError("scan: give xs or length", field="length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise InvalidRequestError(f"scan: length must be an int >= 0, got {length!r}",
                                  field="length")
    return length


def _checkpoint(checkpoint, n: int) -> int:
    """The scan's `checkpoint` attribute: None -> 0 (by the memory budget), False -> 1
    (store every carry), True -> every ⌈√n⌉-th, an int k -> every k-th."""
    if checkpoint is None:
        return 0
    if checkpoint is True and not isinstance(n, int):
        raise InvalidRequestError(f"checkpoint=True needs a known length, not {n}: give "
                                  "an interval (checkpoint=k) or bind the size",
                                  field="checkpoint")
    if checkpoint is True:
        return max(1, math.isqrt(max(n - 1, 0)) + 1)
    if checkpoint is False:
        return 1
    if isinstance(checkpoint, int) and checkpoint >= 1:
        return checkpoint
    raise InvalidRequestError(f"checkpoint must be None, True, False or an int >= 1, got "
                              f"{checkpoint!r}", field="checkpoint")


def scan(f: Callable, init, xs=None, length: int | None = None, checkpoint=None):
    """Loop `f(carry, x) -> (carry, y)` over the leading axis of `xs` (or `length` times
    with x None), like `jax.lax.scan`; returns (final carry, ys stacked on a leading
    axis). `checkpoint` (reverse mode): None stores every carry unless that exceeds the
    memory budget, then every ⌈√n⌉-th; True/False/k force it."""
    c0, c_tree = _leaves(init, "carry")
    x_nodes, x_tree = _leaves(xs, "xs")
    n = _length(x_nodes, length)
    carries = fresh_inputs("c", _types(c0))
    rows = fresh_inputs("x", [(x.dtype, x.shape[1:]) for x in x_nodes])
    y_tree: list = []

    def run() -> list[Node]:
        out = f(unflatten(c_tree, carries), unflatten(x_tree, rows) if x_nodes else None)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise InvalidRequestError("scan: the body must return (carry, y) (y may be None)",
                                      field="body")
        new_c = _result_leaves(out[0], c_tree, carries, "the scan body")
        ys, structure = _leaves(out[1], "y")
        y_tree.append(structure)
        return new_c + ys
    t = trace_bodies(carries + rows, [run])
    n_c, n_x = len(carries), len(rows)
    n_y = len(t.outputs[0]) - n_c
    body = t.body(0, role_names("c", n_c) + role_names("x", n_x)
                  + role_names("k", len(t.captured)), role_names("c", n_c)
                  + role_names("y", n_y), "scan_body")
    node = make("scan", [*c0, *x_nodes, *t.captured], {
        "body": body, "carries": n_c, "xs": n_x, "length": n,
        "checkpoint": _checkpoint(checkpoint, n)})
    final = [A.element(node, i) for i in range(n_c)]
    ys = [A.element(node, n_c + j) for j in range(n_y)]
    return unflatten(c_tree, final), unflatten(y_tree[0], ys)


def fori_loop(lower: int, upper: int, body: Callable, init, checkpoint=None):
    """`body(i, carry) -> carry` for i = lower … upper-1 (Python ints: a scan over the
    counter, differentiable in both modes); returns the final carry."""
    for v, what in ((lower, "lower"), (upper, "upper")):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise InvalidRequestError(
                f"fori_loop: {what} must be a Python int (for a trip count computed in the "
                "trace, use while_loop with max_iters)", field=what)
    counter = A.constant(np.arange(int(lower), max(int(lower), int(upper)), dtype=np.int64))
    final, _ = scan(lambda c, i: (body(i, c), None), init, counter, checkpoint=checkpoint)
    return final


def while_loop(cond_fn: Callable, body_fn: Callable, init, max_iters: int):
    """`carry = body_fn(carry)` while `cond_fn(carry)` (a bool scalar) holds, at most
    `max_iters` times (more is an evaluation error); returns the final carry.
    Differentiable in both modes (reverse mode records up to max_iters carries)."""
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
        raise InvalidRequestError(f"while_loop: max_iters must be an int >= 0, got "
                                  f"{max_iters!r}", field="max_iters")
    c0, c_tree = _leaves(init, "carry")
    carries = fresh_inputs("c", _types(c0))

    def pred() -> list[Node]:
        p = as_node(cond_fn(unflatten(c_tree, carries)), "the condition")
        if p.dtype != dtypes.BOOL or p.shape != ():
            raise DTypeError(f"while_loop: the condition must return a bool scalar, got "
                             f"{p.dtype}{list(p.shape)}", field="cond")
        return [p]

    def step() -> list[Node]:
        return _result_leaves(body_fn(unflatten(c_tree, carries)), c_tree, carries,
                              "the while_loop body")
    t = trace_bodies(carries, [pred, step])
    names = role_names("c", len(carries)) + role_names("k", len(t.captured))
    node = make("while_loop", [*c0, *t.captured], {
        "cond": t.body(0, names, ["pred"], "while_cond"),
        "body": t.body(1, names, role_names("c", len(carries)), "while_body"),
        "carries": len(carries), "max_iters": max_iters})
    return unflatten(c_tree, [A.element(node, i) for i in range(len(carries))])


def switch(index, branches: Sequence[Callable], *operands):
    """`branches[index](*operands)`, only that branch evaluated (an int scalar index; a
    Python int calls the branch directly). Every branch must return the same structure
    and types."""
    if not branches:
        raise InvalidRequestError("switch needs at least one branch", field="branches")
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        return branches[int(index)](*operands)
    return _branched(as_node(index, "the index"), list(branches), operands)


def cond(pred, true_fn: Callable, false_fn: Callable, *operands):
    """`true_fn(*operands)` if `pred` else `false_fn(*operands)`, only the taken branch
    evaluated (a bool scalar; a Python bool calls the branch directly)."""
    if isinstance(pred, (bool, np.bool_)):
        return (true_fn if pred else false_fn)(*operands)
    p = as_node(pred, "the condition")
    if p.dtype != dtypes.BOOL:
        raise DTypeError(f"cond: the condition must be a bool scalar, got {p.dtype}"
                         f"{list(p.shape)} (for an integer index use switch)", field="pred")
    return _branched(p, [false_fn, true_fn], operands)


def _branched(index: Node, fns: list[Callable], operands):
    ops, o_tree = _leaves(tuple(operands), "operand")
    params = fresh_inputs("a", _types(ops))
    trees: list = []

    def branch(fn) -> Callable[[], list[Node]]:
        def run() -> list[Node]:
            leaves, structure = _leaves(fn(*unflatten(o_tree, params)), "result")
            trees.append(structure)
            return leaves
        return run
    t = trace_bodies(params, [branch(fn) for fn in fns])
    for b, (s, outs) in enumerate(zip(trees, t.outputs)):
        if s != trees[0]:
            raise InvalidRequestError(f"branch {b} returns {_describe(s)} but branch 0 "
                                      f"{_describe(trees[0])}", field=f"branches[{b}]")
        check_same_types(t.outputs[0], outs, trees[0].paths("result"),
                         f"branch {b} (against branch 0)")
    names = role_names("a", len(params) + len(t.captured))
    bodies = tuple(t.body(b, names, role_names("r", len(t.outputs[0])), f"branch{b}")
                   for b in range(len(fns)))
    node = make("cond", [index, *ops, *t.captured], {"branches": bodies})
    return unflatten(trees[0], [A.element(node, j) for j in range(len(t.outputs[0]))])
