"""The readable text form of a graph: one line per node with op, operands and type.

    graph seed(x: f64[], y: f64[]) {
      %0 = input x : f64[]
      %2 = mul %0, %0 : f64[]
      ...
      return z = %6
    }

Sub-graphs (loop bodies, branches) are printed indented under their node, each with its
own ids; a node with several results has the type `(f64[], f64[5])`.
"""

from __future__ import annotations

import numpy as np

SHORT = {"float64": "f64", "float32": "f32", "int64": "i64", "int32": "i32", "bool": "bool"}


def type_str(dtype: str, shape) -> str:
    """A type as the text form writes it, e.g. `f64[3,4]`."""
    return f"{SHORT[dtype]}[{','.join(str(d) for d in shape)}]"


def node_type_str(node) -> str:
    """A node's type: `f64[3]`, or `(f64[], f64[5])` for a node with several results."""
    if node.types is not None:
        return "(" + ", ".join(type_str(dt, sh) for dt, sh in node.types) + ")"
    return type_str(node.dtype, node.shape)


def _is_graph(v) -> bool:
    return hasattr(v, "outputs") and hasattr(v, "key")


def attr_text(v) -> str:
    """An attribute value as the text form writes it (a sub-graph by its name)."""
    return _attr(v)


def _attr(v) -> str:
    if _is_graph(v):
        return f"<graph {v.name or 'body'}>"
    if isinstance(v, tuple) and v and _is_graph(v[0]):
        return "[" + ", ".join(_attr(g) for g in v) + "]"
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v) if type(v).__name__ == "Dim" else repr(v)


def _const(value: np.ndarray) -> str:
    if value.size <= 8:
        return np.array2string(value, separator=",").replace("\n", "")
    return f"<{value.size} elements>"


def to_text(graph, indent: str = "") -> str:
    """The text form of `graph`; `%i` is the node's position in `graph.nodes` (the ids
    of the encoded graph)."""
    return "\n".join(indent + line for line in _lines(graph))


def _subgraphs(n) -> list[tuple[str, object]]:
    out = []
    for k, v in n.attrs:
        if _is_graph(v):
            out.append((k, v))
        elif isinstance(v, tuple) and v and _is_graph(v[0]):
            out.extend((f"{k}[{i}]", g) for i, g in enumerate(v))
    return out


def _lines(graph) -> list[str]:
    nodes = graph.nodes
    ids = {id(n): i for i, n in enumerate(nodes)}
    sig = ", ".join(f"{n.name}: {type_str(n.dtype, n.shape)}" for n in graph.inputs)
    lines = [f"graph {graph.name or 'main'}({sig}) {{"]
    for i, n in enumerate(nodes):
        if n.op == "input":
            rhs = f"input {n.name}"
        elif n.op == "constant":
            rhs = f"constant {_const(n.value)}"
        else:
            rhs = n.op + " " + ", ".join(f"%{ids[id(a)]}" for a in n.inputs)
            if n.attrs:
                rhs += " {" + ", ".join(f"{k}={_attr(v)}" for k, v in n.attrs) + "}"
        label = f"  # {n.label}" if n.label else ""
        lines.append(f"  %{i} = {rhs} : {node_type_str(n)}{label}")
        for k, sub in _subgraphs(n):
            lines.append(f"    {k}:")
            lines.extend("      " + line for line in _lines(sub))
    outs = ", ".join(f"{k} = %{ids[id(n)]}" for k, n in graph.outputs)
    lines.append(f"  return {outs}")
    lines.append("}")
    return lines
