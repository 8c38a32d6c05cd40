"""Sub-graphs that are the bodies of control-flow ops (loop bodies, branches).

A body is an ordinary `Graph` held in an attribute of its op. It is *closed*: every
value it reads is one of its inputs (the op's operands say what is bound to them), so
it can be validated, encoded, cached and differentiated on its own. Bodies built here
get canonical input and output names (`c0, x0, k0 …` / `c0, y0 …`): two traces of the
same loop give the same body, the same digests and the same cache keys.

`trace_bodies` turns Python functions into bodies (closure conversion: values of the
enclosing trace a function reads become explicit operands), `substitute` rebuilds
nodes on other operands, and the pytree helpers let carries be tuples, lists, dicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, input_node, lift, make
from adsvc.ir.opdef import TUPLE
from adsvc_protocol.errors import DTypeError, InvalidGraphError, ShapeError

_FRESH = itertools.count()


def substitute(outputs: Sequence[Node], mapping: dict[int, Node]) -> list[Node]:
    """`outputs` rebuilt with every node whose id is in `mapping` replaced by its value
    (users of replaced nodes are rebuilt, simplified and shared like any others)."""
    order = Graph([], [(str(i), n) for i, n in enumerate(outputs)]).nodes
    new: dict[int, Node] = {}
    for n in order:
        if id(n) in mapping:
            new[id(n)] = mapping[id(n)]
        elif not n.inputs:
            new[id(n)] = n
        else:
            ins = tuple(new[id(i)] for i in n.inputs)
            same = all(a is b for a, b in zip(ins, n.inputs))
            new[id(n)] = n if same else make(n.op, ins, dict(n.attrs), label=n.label)
    return [new[id(n)] for n in outputs]


def free_inputs(graph: Graph) -> list[Node]:
    """Input nodes the graph reads that are not among its declared inputs."""
    declared = {id(n) for n in graph.inputs}
    return [n for n in graph.nodes if n.op == "input" and id(n) not in declared]


def check_closed(graph: Graph, what: str) -> None:
    """InvalidGraphError if `graph` (a body) reads a value it does not declare."""
    free = free_inputs(graph)
    if free:
        raise InvalidGraphError(
            f"{what} reads {free[0].name!r}, which is not one of its inputs: a body may only "
            "use its inputs (bind outer values as operands)", field=what)
    for _, n in graph.outputs:
        if n.dtype == TUPLE:
            raise InvalidGraphError(f"{what}: an output is a node with several results; "
                                    "return one of them (element)", field=what)


def make_body(inputs: Sequence[Node], outputs: Sequence[Node], in_names: Sequence[str],
              out_names: Sequence[str], what: str = "body") -> Graph:
    """The closed graph of `outputs` over `inputs`, renamed `in_names` / `out_names`."""
    check_closed(Graph(inputs, [(str(i), n) for i, n in enumerate(outputs)]), what)
    new_inputs = [input_node(nm, n.dtype, n.shape) for nm, n in zip(in_names, inputs)]
    outs = substitute(outputs, {id(o): n for o, n in zip(inputs, new_inputs)})
    return Graph(new_inputs, list(zip(out_names, outs)), what)


def role_names(prefix: str, n: int, start: int = 0) -> list[str]:
    """`prefix0, prefix1, …` (canonical body names)."""
    return [f"{prefix}{i}" for i in range(start, start + n)]


# -- pytrees of carries, operands and results ------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """The structure of a nest of tuples, lists and dicts (None: no value), with the path
    of each leaf for error messages."""

    kind: str  # "leaf", "none", "tuple", "list", "dict"
    children: tuple = ()
    keys: tuple = ()

    def paths(self, prefix: str) -> list[str]:
        """The path of each leaf, e.g. `carry['v'][0]`."""
        if self.kind == "leaf":
            return [prefix]
        if self.kind == "none":
            return []
        labels = ([repr(k) for k in self.keys] if self.kind == "dict"
                  else [str(i) for i in range(len(self.children))])
        return [p for lab, c in zip(labels, self.children) for p in c.paths(f"{prefix}[{lab}]")]


def flatten(tree) -> tuple[list, Tree]:
    """(leaves, structure) of a nest of tuples/lists/dicts of values."""
    if tree is None:
        return [], Tree("none")
    if isinstance(tree, dict):
        keys = tuple(tree)
        parts = [flatten(tree[k]) for k in keys]
        return [x for p in parts for x in p[0]], Tree("dict", tuple(p[1] for p in parts), keys)
    if isinstance(tree, (tuple, list)):
        parts = [flatten(v) for v in tree]
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return [x for p in parts for x in p[0]], Tree(kind, tuple(p[1] for p in parts))
    return [tree], Tree("leaf")


def unflatten(structure: Tree, leaves: Sequence):
    """The nest of `structure` holding `leaves`, in order."""
    it = iter(leaves)

    def build(t: Tree):
        if t.kind == "leaf":
            return next(it)
        if t.kind == "none":
            return None
        vals = [build(c) for c in t.children]
        if t.kind == "dict":
            return dict(zip(t.keys, vals))
        return tuple(vals) if t.kind == "tuple" else list(vals)
    return build(structure)


def as_node(v, what: str, like: Node | None = None) -> Node:
    """`v` (a node, number or array) as a node; TypeError naming `what` otherwise."""
    if isinstance(v, (Node, int, float, bool, np.ndarray, np.number, np.bool_)):
        return lift(v, like) if like is not None else lift(v)
    raise TypeError(f"{what} is a {type(v).__name__}: use values adsvc can trace (numbers, "
                    "arrays, traced values) in tuples, lists or dicts")


def check_same_types(old: Sequence[Node], new: Sequence[Node], paths: Sequence[str],
                     who: str) -> None:
    """DTypeError/ShapeError naming the first value of `new` whose type is not `old`'s:
    "<who> changes the dtype of carry['v'] from float64 to float32"."""
    for a, b, p in zip(old, new, paths):
        if a.dtype != b.dtype:
            raise DTypeError(f"{who} changes the dtype of {p} from {a.dtype} to {b.dtype} "
                             f"(cast it: adsvc.cast(v, {a.dtype!r}))", field=p)
        if a.shape != b.shape:
            raise ShapeError(f"{who} changes the shape of {p} from {list(a.shape)} to "
                             f"{list(b.shape)}", field=p)


# -- tracing Python functions into closed bodies ------------------------------------------------
def fresh_inputs(role: str, types: Sequence[tuple[str, tuple]]) -> list[Node]:
    """New input nodes of `types`, with names no user input can have."""
    return [input_node(f"{role}#{next(_FRESH)}", dt, sh) for dt, sh in types]


def captured_values(params: Sequence[Node], outputs: Sequence[Node]) -> list[Node]:
    """The values of the enclosing trace that `outputs` read (closure conversion): the
    largest subexpressions that do not depend on `params` but do depend on some other
    input. Constant subexpressions stay inside the body."""
    order = Graph([], [(str(i), n) for i, n in enumerate(outputs)]).nodes
    own = {id(p) for p in params}
    mine: set[int] = set(own)  # depends on a parameter
    outer: set[int] = set()  # depends on an input of the enclosing trace
    for n in order:
        if id(n) in own:
            continue
        if n.op == "input":
            outer.add(id(n))
        elif any(id(i) in mine for i in n.inputs):
            mine.add(id(n))
        elif any(id(i) in outer for i in n.inputs):
            outer.add(id(n))
    found: dict[int, Node] = {}
    for n in order:
        if id(n) in mine:
            for i in n.inputs:
                if id(i) in outer:
                    found.setdefault(id(i), i)
    for n in outputs:
        if id(n) in outer:
            found.setdefault(id(n), n)
    return list(found.values())


@dataclass
class Traced:
    """Functions traced on shared parameters: their outputs, and the enclosing values
    they read (`captured`, to become operands) with the inputs standing for them."""

    params: list[Node]
    outputs: list[list[Node]]  # per function
    captured: list[Node]
    stand_ins: list[Node]

    def body(self, index: int, in_names: Sequence[str], out_names: Sequence[str],
             what: str) -> Graph:
        """Function `index` as a closed body over params + stand-ins."""
        outs = substitute(self.outputs[index],
                          {id(c): s for c, s in zip(self.captured, self.stand_ins)})
        return make_body(self.params + self.stand_ins, outs, in_names, out_names, what)


def trace_bodies(params: list[Node], fns: Sequence[Callable[[], list[Node]]]) -> Traced:
    """Call each of `fns` (closures over `params`, returning output nodes) and find the
    enclosing values they read, shared between them (a while loop's condition and body,
    the branches of a cond)."""
    outputs = [list(fn()) for fn in fns]
    captured = captured_values(params, [n for outs in outputs for n in outs])
    stand_ins = fresh_inputs("k", [(c.dtype, c.shape) for c in captured])
    return Traced(params, outputs, captured, stand_ins)
