"""`adsvc.explain`: a step-by-step account of a differentiation sweep, and the values
a picture of a graph is annotated with.

    ex = adsvc.explain(g, "reverse", x=3.0, y=4.0)
    print(ex.text())          # the forward sweep, then the backward sweep, node by node
    ex.table()                # [Row(id, op, value, derivative), ...] in evaluation order
    ex.render("seed.svg")     # the differentiated graph with those very values

The account follows the classic explanation of automatic differentiation. Forward
mode runs one sweep per input, carrying each node's tangent (its derivative with
respect to that input) from the leaves to the root. Reverse mode runs the graph
forward once, keeping every value, then one backward sweep carries each node's
adjoint (the output's derivative with respect to that node) from the root to every
leaf. Every row is a node of the graph being differentiated, numbered as in the
picture and in ``adsvc show`` (``%i``: the position in the differentiated graph); its
derivative comes from the same pass that builds the differentiated graph (the
tangent or adjoint nodes it makes are the picture's nodes), evaluated by the same plan.

`node_values(graph, feeds)` evaluates every node of any graph, running one sweep per
derivative seed that `feeds` leaves out (see its docstring): `adsvc dot --at` and the
examples annotate pictures with it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from adsvc.ir import dot
from adsvc.ir.codec import as_graph
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node
from adsvc.passes.activity import active_nodes, wrt_nodes
from adsvc.passes.forward import jvp_graph
from adsvc.passes.pipeline import differentiate
from adsvc.passes.reverse import vjp_graph
from adsvc.passes.simplify import simplify
from adsvc.passes.specialize import specialize
from adsvc.runtime.plan import Plan
from adsvc_protocol import dtypes, names
from adsvc_protocol.dims import bind
from adsvc_protocol.errors import InvalidRequestError
from adsvc_protocol.modes import normalize_modes
from adsvc_protocol.recipes import scalar_output


class Row(NamedTuple):
    """One step of a sweep: a node (`id` = its ``%i`` in the picture), what it computes,
    its value and its derivative {seed: value} (forward: one entry per input, the
    tangent in the sweep seeded on it; reverse: one per seeded output, the adjoint)."""

    id: int
    op: str
    value: Any
    derivative: dict[str, Any]


# -- values of every node ------------------------------------------------------------------
def sweep_label(name: str) -> str:
    """How a picture names the sweep seeded on the derived input `name`: "∂/∂x" for
    tangent:x (forward), "∂out/∂·" for cotangent:out (reverse)."""
    d = names.parse(name)
    base = d.base if d is not None else name
    return f"∂/∂{base}" if d is not None and d.kind == names.TANGENT else f"∂{base}/∂·"


def seeds(graph: Graph, feeds: Mapping[str, Any]) -> tuple[list[Node], list[Node]]:
    """(sweep inputs, other missing derived inputs): the derived inputs `feeds` leaves
    out, those of the graph's last pass first (one sweep each), then the others."""
    missing = [n for n in graph.inputs if not names.is_primal(n.name) and n.name not in feeds]
    last = max((names.parse(n.name).k for n in missing), default=0)
    sweep = [n for n in missing if names.parse(n.name).k == last]
    return sweep, [n for n in missing if names.parse(n.name).k != last]


def _ones(n: Node) -> np.ndarray:
    return np.ones(n.shape, dtypes.to_numpy(n.dtype))


def _downstream(graph: Graph, sources: list[Node]) -> set[int]:
    """ids of the nodes of `graph` that depend on any of `sources`."""
    found = {id(n) for n in sources}
    for n in graph.nodes:
        if any(id(i) in found for i in n.inputs):
            found.add(id(n))
    return found


def node_values(graph: Graph, feeds: Mapping[str, Any], nodes=None) -> dict[Node, Any]:
    """{node: value} for `nodes` (default: every node of `graph`; others may be given if
    they use no other inputs) at `feeds`, evaluated by the plan.

    A derived input (``tangent:x``, ``cotangent:z``) that `feeds` leaves out is a seed:
    each of the graph's last pass gets its own sweep, where it is all ones and the other
    seeds are zero, and a node that depends on one has {sweep label: value} (see
    `sweep_label`); left-out derived inputs of earlier passes are all ones.
    """
    nodes = list(graph.nodes if nodes is None else nodes)
    sweep, others = seeds(graph, feeds)
    base = {**feeds, **{n.name: _ones(n) for n in others}}
    exposed = Graph(graph.inputs, [(str(i), n) for i, n in enumerate(nodes)])
    plan = Plan(exposed)
    if not sweep:
        out = plan.run(base)
        return {n: out[str(i)] for i, n in enumerate(nodes)}
    runs = []
    for s in sweep:
        feed = {**base, **{n.name: np.zeros_like(_ones(n)) for n in sweep}, s.name: _ones(s)}
        runs.append(plan.run(feed))
    varies = _downstream(exposed, sweep)
    labels = [sweep_label(s.name) for s in sweep]
    values: dict[Node, Any] = {}
    for i, n in enumerate(nodes):
        if id(n) in varies:
            values[n] = {label: run[str(i)] for label, run in zip(labels, runs)}
        else:
            values[n] = runs[0][str(i)]
    return values


# -- the derivative of every node ------------------------------------------------------------
def _pass_targets(base: Graph, k: int) -> list[str]:
    """The outputs pass `k` differentiates (as `differentiate` picks them): the float
    outputs for pass 1, the outputs pass k-1 added for later passes."""
    floats = [name for name, n in base.outputs if dtypes.is_float(n.dtype)]
    if k == 1:
        return floats
    return [name for name in floats if (d := names.parse(name)) is not None and d.k == k - 1]


def derivative_nodes(base: Graph, mode: str, wrt: list[Node], k: int,
                     seed: bool) -> dict[int, Node]:
    """id(node) -> its derivative node for every float node of `base` that has one, as
    pass `k` in `mode` builds them: forward, its tangent; reverse, its adjoint.

    Forward differentiates `base` with every float node an output; reverse asks the VJP
    pass for the cotangents of every active node (the pass walks the same nodes in the
    same order either way, and nodes are interned, so these are the very nodes of the
    differentiated graph)."""
    targets = _pass_targets(base, k)
    if mode == "forward":
        floats = [n for n in base.nodes if dtypes.is_float(n.dtype)]
        every = Graph(base.inputs, [(f"v{i}", n) for i, n in enumerate(floats)], base.name)
        out, new = jvp_graph(every, wrt, [f"v{i}" for i in range(len(floats))], k)
        return {id(n): out.output(name) for n, name in zip(floats, new)}
    target_nodes = [base.output(t) for t in targets]
    active = active_nodes(base, wrt, target_nodes)
    # (a loop's tuple node has no one adjoint: its elements' rows show them)
    ordered = [n for n in base.nodes if id(n) in active and n.types is None]
    out, _ = vjp_graph(base, ordered, targets, seed=seed, k=k)
    added = out.outputs[len(base.outputs):]  # one per node of `ordered`, in order
    return {id(n): node for n, (_, node) in zip(ordered, added)}


# -- the explanation -----------------------------------------------------------------------------
@dataclass
class Explanation:
    """What `explain` returns: the account as `table()` rows and `text()`, and the
    picture of the differentiated graph with the same values (`to_dot`, `render`, and
    `_repr_svg_` for Jupyter).

    `graph` is the graph whose nodes the rows are (the input graph, or for several
    passes the graph the earlier ones made), `differentiated` the graph drawn, `values`
    its nodes' values ({sweep label: value} where a sweep changes it), `derivative_nodes`
    maps a row's id to the id of its tangent or adjoint node in the picture (None if the
    derivative is a symbolic zero), `columns` are the derivative keys of the rows.
    """

    graph: Graph
    modes: tuple[str, ...]
    differentiated: Graph
    values: dict[Node, Any]
    rows: list[Row]
    derivative_nodes: dict[int, int | None]
    columns: list[str]
    feeds: dict[str, Any]
    wrt: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)  # derived inputs taken as all ones

    def table(self) -> list[Row]:
        """The rows, one per node in evaluation order: (id, op, value, derivative)."""
        return list(self.rows)

    def text(self) -> str:
        """The account for people: what the sweeps do, node by node, and the result."""
        return explanation_text(self)

    def at(self) -> str:
        """The input values as text: "x = 3, y = 4"."""
        return _at(self.feeds)

    def to_dot(self, **options) -> str:
        """The DOT text of the differentiated graph annotated with the values (options
        as `adsvc.ir.dot.to_dot`: limit, nearest, title, legend, notes, rankdir)."""
        options.setdefault("title", picture_title(self.graph, self.modes, self.feeds))
        options.setdefault("notes", picture_notes(self.differentiated, self.feeds))
        return dot.to_dot(self.differentiated, self.values, **options)

    def render(self, path, **options):
        """Write the picture to `path` (.svg, .png, .pdf with Graphviz, or .dot)."""
        dot.write_picture(self.to_dot(**options), path)
        return path

    def _repr_svg_(self):
        return dot.svg_or_none(self.to_dot())


# -- pictures ----------------------------------------------------------------------------------
def _at(feeds: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {dot.format_value(v)}" for k, v in feeds.items())


def picture_title(graph: Graph, modes, feeds: Mapping[str, Any]) -> str:
    """The title of a picture: the graph's name, the modes and the input values."""
    what = " then ".join(modes) + " mode" if modes else f"{len(graph.nodes):,} nodes"
    return f"{graph.name or 'graph'}: {what}" + (f" at {_at(feeds)}" if feeds else "")


def picture_notes(graph: Graph, feeds: Mapping[str, Any]) -> list[str]:
    """The legend lines that say what the values of a picture are (none without)."""
    if not feeds:
        return []
    sweep, others = seeds(graph, feeds)
    notes = [f"= value at {_at(feeds)}"]
    notes += [f"{sweep_label(s.name)}: value in the sweep with {s.name} = 1, the other "
              f"seeds 0" for s in sweep]
    notes += [f"{n.name} = 1 (not given)" for n in others]
    return notes


def picture(graph, mode=None, wrt=None, order: int | None = None,
            inputs: Mapping[str, Any] | None = None, **options) -> tuple[Graph, str]:
    """(the graph drawn, its DOT text): `graph` or, with `mode`, its differentiated
    graph (a first reverse pass over a single scalar output seeded with 1), with
    `inputs` every drawn node annotated with its value (see `node_values`). `options`
    as `adsvc.ir.dot.to_dot` (limit, nearest ...). This is what ``adsvc dot`` draws."""
    g = as_graph(graph)
    modes = () if mode is None else normalize_modes(mode, order)
    drawn = differentiate(g, modes, wrt, order=len(modes), seed=seeded(g, modes)
                          ) if modes else g
    feeds = dict(inputs or {})
    values = None
    if feeds:
        shown = dot.shown_nodes(drawn, options.get("limit", dot.DEFAULT_LIMIT),
                                options.get("nearest", dot.DEFAULT_NEAREST))
        values = node_values(drawn, feeds, shown)
    options.setdefault("title", picture_title(g, modes, feeds))
    options.setdefault("notes", picture_notes(drawn, feeds))
    return drawn, dot.to_dot(drawn, values, **options)


# -- the account -------------------------------------------------------------------------------
def seeded(graph: Graph, modes) -> bool:
    """True if a first reverse pass over `graph` is seeded with 1 (a plain gradient: the
    graph has a single scalar float output), as ``adsvc show`` and ``adsvc dot`` do."""
    if not modes or modes[0] != "reverse":
        return False
    try:
        scalar_output({k: (n.dtype, n.shape) for k, n in graph.outputs}, primal_only=False)
    except InvalidRequestError:
        return False
    return True


def _op_text(n: Node, ids: dict[int, int]) -> str:
    if n.op == "input":
        return f"input {n.name}"
    if n.op == "constant":
        return f"constant {dot.format_value(n.value)}"
    return f"{n.op} " + ", ".join(f"%{ids[id(i)]}" for i in n.inputs)


def _columns(sweep: list[Node], base: Graph, seed: bool) -> list[tuple[str, str]]:
    """(table key, picture label) per derivative column."""
    if sweep:
        return [(names.parse(s.name).base, sweep_label(s.name)) for s in sweep]
    if seed:
        out = _pass_targets(base, 1)[0]
        return [(out, "")]
    return [("seed", "")]


def explain(graph, mode="reverse", wrt=None, order: int | None = None,
            inputs: Mapping[str, Any] | None = None, **feeds) -> Explanation:
    """The step-by-step account of differentiating `graph` in `mode` at the input
    values `feeds` (or `inputs=`, for names that clash with a keyword): each node's
    value and derivative in evaluation order (see the module docstring).

    `mode` is "forward" or "reverse" (or one mode per pass, e.g. ("reverse", "forward"):
    the account is then of the last pass over the graph the others made); None only
    evaluates. A reverse first pass over a single scalar output is seeded with 1.
    Derivative inputs left out of `feeds` are seeds: one sweep each (see `node_values`).
    """
    g = simplify(as_graph(graph))
    feeds = {**(inputs or {}), **feeds}
    if g.symbolic:  # an account is of one evaluation: at the sizes of the feeds
        g = specialize(g, bind({n.name: (n.dtype, n.shape) for n in g.inputs},
                               {k: np.shape(v) for k, v in feeds.items()}))
    modes = () if mode is None else normalize_modes(mode, order)
    if not modes:
        values = node_values(g, feeds)
        ids = {id(n): i for i, n in enumerate(g.nodes)}
        rows = [Row(i, _op_text(n, ids), values[n], {}) for i, n in enumerate(g.nodes)]
        return Explanation(g, modes, g, values, rows, {}, [], feeds)
    seed = seeded(g, modes)
    k = len(modes)
    dg = differentiate(g, modes, wrt, order=k, seed=seed, share=False)
    base = g if k == 1 else differentiate(g, modes[:-1], wrt, order=k - 1, seed=seed,
                                          share=False)
    derivs = derivative_nodes(base, modes[-1], wrt_nodes(g, wrt), k, seed and k == 1)
    drawn = {id(n) for n in dg.nodes}
    extra = list({id(d): d for d in derivs.values() if id(d) not in drawn}.values())
    values = node_values(dg, feeds, dg.nodes + extra)
    ids = {id(n): i for i, n in enumerate(dg.nodes)}
    sweep, others = seeds(dg, feeds)
    columns = _columns(sweep, base, seed and k == 1)
    rows = []
    for n in base.nodes:
        d = derivs.get(id(n))
        value = values[n]
        dv = values[d] if d is not None else (
            np.zeros(()) if isinstance(value, tuple) else np.zeros_like(np.asarray(value, float)))
        rows.append(Row(ids[id(n)], _op_text(n, ids), value,
                        {key: dv[label] if isinstance(dv, dict) else dv
                         for key, label in columns}))
    link = {ids[id(n)]: ids.get(id(derivs[id(n)])) if id(n) in derivs else None
            for n in base.nodes}
    return Explanation(base, modes, dg, {n: values[n] for n in dg.nodes}, rows, link,
                       [key for key, _ in columns], feeds, [n.name for n in wrt_nodes(g, wrt)],
                       [n.name for n in others])


# -- the text ----------------------------------------------------------------------------------
def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """Rows of cells as aligned text: the first two columns left, the others right."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells):
        out = [cells[c].ljust(widths[c]) if c in (1,) else cells[c].rjust(widths[c])
               for c in range(len(cells))]
        return "  " + "  ".join(out).rstrip()
    return [line(header)] + [line(r) for r in rows]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _intro(ex: Explanation) -> list[str]:
    """What the sweeps do, as a paragraph wrapped for a terminal."""
    at, k, mode = ex.at(), len(ex.modes), ex.modes[-1]
    where = "" if k == 1 else (
        f"Pass {k} ({mode}) of {' then '.join(ex.modes)}: it differentiates the graph the "
        f"earlier passes made, whose outputs {', '.join(_pass_targets(ex.graph, k))} are "
        "its outputs to differentiate. ")
    if mode == "forward":
        sweeps = ("one sweep with the given tangents" if ex.columns == ["seed"] else
                  f"one sweep per input ({_plural(len(ex.columns), 'sweep')})")
        text = (f"{where}Forward mode at {at}: {sweeps}. A sweep sets the tangent of one "
                "input to 1 (all ones for an array) and of the others to 0, then goes from "
                "the inputs (the leaves) "
                "to the outputs (the root), computing next to each node's value v its "
                "tangent v̇ = ∂v/∂input by the chain rule from its operands' tangents.")
    else:
        start = ("with the given cotangents" if ex.columns == ["seed"] else
                 f"from {ex.columns[0]} with adjoint ∂{ex.columns[0]}/∂{ex.columns[0]} = 1"
                 if len(ex.columns) == 1 else
                 f"from each output in turn ({_plural(len(ex.columns), 'sweep')})")
        text = (f"{where}Reverse mode at {at}: one forward sweep computes every node's value "
                f"and keeps it; then a backward sweep starts {start} and goes from the root "
                "to the leaves, giving each operand its share of its user's adjoint "
                "(v̄ = ∂output/∂v; a node used twice, such as x in x*x, collects two "
                "shares). The backward sweep reuses the kept values instead of recomputing "
                "them, and each backward sweep gives one output's derivatives with respect "
                f"to all {_plural(len(ex.wrt), 'input')} at once.")
    if ex.defaults:
        text += (f" The seeds of the earlier passes were not given, so they are all ones: "
                 f"{', '.join(ex.defaults)}.")
    return textwrap.wrap(text, 88)


def _derivative_header(ex: Explanation) -> list[str]:
    if ex.modes[-1] == "forward":
        return [f"∂v/∂{c}" if c != "seed" else "v̇" for c in ex.columns]
    return [f"∂{c}/∂v" if c != "seed" else "v̄" for c in ex.columns]


def _result(ex: Explanation) -> str:
    by_id = {r.id: r for r in ex.rows}
    ids = {id(n): i for i, n in enumerate(ex.differentiated.nodes)}
    targets = _pass_targets(ex.graph, len(ex.modes))
    values = "; ".join(f"{t} = {dot.format_value(ex.values[ex.graph.output(t)])}"
                       for t in targets)
    if ex.modes[-1] == "forward":
        parts = [f"∂{t}/∂{c} = {dot.format_value(by_id[ids[id(ex.graph.output(t))]].derivative[c])}"
                 for t in targets for c in ex.columns]
        cost = f"{_plural(len(ex.columns), 'forward sweep')} for {_plural(len(ex.wrt), 'input')}"
    else:
        rows = [by_id[ids[id(ex.graph.input(w))]] for w in ex.wrt]
        parts = [f"∂{c}/∂{r.op.removeprefix('input ')} = {dot.format_value(r.derivative[c])}"
                 for c in ex.columns for r in rows]
        cost = (f"{_plural(len(ex.columns), 'backward sweep')} for "
                f"{_plural(len(ex.wrt), 'input')}")
    return f"Result: {values}; {', '.join(parts)} ({cost})."


def explanation_text(ex: Explanation) -> str:
    """The text of `Explanation.text()`."""
    if not ex.modes:
        rows = [[f"%{r.id}", r.op, dot.format_value(r.value)] for r in ex.rows]
        return "\n".join([f"Evaluation at {ex.at()}: every node once, operands first.", "",
                          *_grid(["node", "computes", "value"], rows)]) + "\n"
    link = ex.derivative_nodes
    dcols = _derivative_header(ex)
    kind = "tangent node" if ex.modes[-1] == "forward" else "adjoint node"

    def cells(r: Row, with_value: bool) -> list[str]:
        d = link.get(r.id)
        head = [f"%{r.id}", r.op] + ([dot.format_value(r.value)] if with_value else [])
        return head + [dot.format_value(r.derivative[c]) for c in ex.columns] + [
            f"%{d}" if d is not None else "—"]
    lines = _intro(ex) + [""]
    if ex.modes[-1] == "forward":
        lines += _grid(["node", "computes", "value", *dcols, kind],
                       [cells(r, True) for r in ex.rows])
    else:
        lines += ["Forward sweep (evaluation order):"]
        lines += _grid(["node", "computes", "value"],
                       [[f"%{r.id}", r.op, dot.format_value(r.value)] for r in ex.rows])
        lines += ["", "Backward sweep (reverse order):"]
        lines += _grid(["node", "computes", *dcols, kind],
                       [cells(r, False) for r in reversed(ex.rows)])
    lines += ["", *textwrap.wrap(_result(ex), 88),
              "Node ids are those of the picture (explain(...).render) and of `adsvc show`;",
              f"—: the {kind} is no node of its own there (a symbolic zero, or a constant",
              "the simplifier folded into its users)."]
    return "\n".join(lines) + "\n"
