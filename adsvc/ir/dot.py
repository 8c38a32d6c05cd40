"""Pictures of graphs: a `Graph` as a networkx structure and as Graphviz DOT text.

`structure(graph, values)` is the layout-independent picture, a networkx MultiDiGraph:

- a node ``n<i>`` per graph node, `i` its position in `graph.nodes` (the ``%i`` of the
  text form and of ``adsvc show``), with attributes `id`, `op`, `role` ("input",
  "constant" or "op"), `family` ("primal", "tangent" or "cotangent"), `k` (the pass
  that made it; 0 for primal), `value` (from `values`, else None) and `label`;
- a node ``o<j>`` per output (`role` "output", `name`), with an edge from its node;
- an edge per operand use, operand -> user (``x*x`` has two edges from x), with
  `operand` (its position) and `reuse` (a primal value used by a derivative node).

Families come from the names differentiation gives (`adsvc_protocol.names`): an input
``tangent:x`` is a tangent, ``cotangent:z`` a cotangent; any other node belongs to the
lowest pass among the outputs that need it (primal outputs first, then ``grad:x``,
pass 1, a cotangent, ``tangent2:grad:x``, pass 2, a tangent ...).

`values` maps nodes to what they are annotated with: an array (or number), or a dict
{sweep label: array} for a node whose value differs between sweeps (a forward-mode
picture of two inputs shows "∂/∂x: 10" and "∂/∂y: 3"). `adsvc.explain` computes them.

Above `limit` nodes the picture is a summary: the `nearest` nodes closest to the
outputs (breadth first along operands), one node standing for all the others, and a
note with the ops by count. `to_dot` writes the structure as DOT; `render` runs the
Graphviz `dot` program for SVG, PNG or PDF (a ``.dot`` path needs no Graphviz).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections import Counter, deque
from collections.abc import Mapping

import networkx as nx
import numpy as np

from adsvc.ir.text import attr_text, node_type_str
from adsvc_protocol import names
from adsvc_protocol.errors import AdsvcError, UsageError

DEFAULT_LIMIT = 400  # nodes drawn in full; above it, a summary
DEFAULT_NEAREST = 40  # nodes a summary draws: those nearest the outputs
MAX_ELEMENTS_SHOWN = 6  # elements of an array value in a label
FORMATS = ("svg", "png", "pdf", "dot")
DOT_TIMEOUT = 300  # seconds for one run of Graphviz
INSTALL_HINT = ("install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew "
                "install graphviz; conda: conda install -c conda-forge graphviz) or write "
                "DOT text instead (a .dot file)")

PRIMAL, TANGENT, COTANGENT = "primal", "tangent", "cotangent"
FILL = {  # (family, first pass?) -> fill colour
    (PRIMAL, True): "#dce9f7", (TANGENT, True): "#d4efcc", (COTANGENT, True): "#fbdcc6",
    (TANGENT, False): "#9fd68f", (COTANGENT, False): "#f2ae80",
}
INPUT_FILL = "#a9c9ec"  # primal inputs
CONSTANT_FILL = "#f0f0f0"
EDGE = {PRIMAL: "#5b6b7b", TANGENT: "#3f8f2f", COTANGENT: "#c0602a"}


class GraphvizNotFoundError(AdsvcError):
    """Graphviz's `dot` program is needed (SVG, PNG, PDF) but not installed."""

    def summary(self) -> str:
        """The description alone: it says what to install."""
        return self.description


class GraphvizError(AdsvcError):
    """Graphviz's `dot` program failed on a picture."""


# -- families ----------------------------------------------------------------------------
def _family_of_name(name: str) -> tuple[str, int]:
    """(family, pass) that a derived name gives; primal names are (primal, 0)."""
    d = names.parse(name)
    if d is None:
        return PRIMAL, 0
    if d.kind == names.TANGENT:
        return TANGENT, d.k
    # an output grad:x is a sum of cotangents; an input cotangent:z is one
    return COTANGENT, d.k


def families(graph) -> dict[int, tuple[str, int]]:
    """id(node) -> (family, pass) for every node of `graph` (see the module docstring)."""
    out: dict[int, tuple[str, int]] = {id(n): _family_of_name(n.name)
                                       for n in graph.inputs}
    ranked = sorted(((_family_of_name(name), i, node)
                     for i, (name, node) in enumerate(graph.outputs)),
                    key=lambda r: (r[0][1], r[1]))
    for family, _, root in ranked:
        stack = [root]
        while stack:
            node = stack.pop()
            if id(node) in out:
                continue
            out[id(node)] = family
            stack.extend(node.inputs)
    return out


def family_label(family: str, k: int) -> str:
    """What a family is called in legends and clusters, e.g. "cotangent (pass 1, reverse)"."""
    if family == PRIMAL:
        return "primal"
    mode = "forward" if family == TANGENT else "reverse"
    return f"{family} (pass {k}, {mode})"


# -- which nodes are drawn -------------------------------------------------------------------
def nearest_outputs(graph, count: int) -> list:
    """The `count` nodes nearest the outputs: breadth first from the outputs (in output
    order) along operands; reads only what it returns and their operands."""
    seen: set[int] = set()
    found = []
    queue = deque(node for _, node in graph.outputs)
    while queue and len(found) < count:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        queue.extend(node.inputs)
    return found


def is_summary(graph, limit: int = DEFAULT_LIMIT) -> bool:
    """True if a picture of `graph` is a summary (it has more than `limit` nodes)."""
    return len(graph.nodes) > limit


def shown_nodes(graph, limit: int = DEFAULT_LIMIT, nearest: int = DEFAULT_NEAREST) -> list:
    """The nodes a picture draws: all of them, or for a summary the `nearest` ones (so
    a caller computes values only for those)."""
    return nearest_outputs(graph, nearest) if is_summary(graph, limit) else graph.nodes


# -- labels ------------------------------------------------------------------------------
def format_number(x) -> str:
    """A number for people: 23 not 23.0, 0.333333, nan, inf, true."""
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:.6g}"


def format_value(value) -> str:
    """A value for a label: a number, or an array's first elements in brackets (a
    loop's several results: each, in parentheses)."""
    if isinstance(value, tuple):
        return "(" + "; ".join(format_value(v) for v in value) + ")"
    a = np.asarray(value)
    if a.ndim == 0:
        return format_number(a.item())
    flat = a.reshape(-1)
    shown = ", ".join(format_number(x) for x in flat[:MAX_ELEMENTS_SHOWN].tolist())
    return f"[{shown}{', …' if a.size > MAX_ELEMENTS_SHOWN else ''}]"


def _attrs_text(node) -> str:
    if not node.attrs:
        return ""
    text = ", ".join(f"{k}={attr_text(v)}" for k, v in node.attrs)
    return f" {{{text if len(text) <= 40 else text[:39] + '…'}}}"


def _head(node, i: int) -> list[str]:
    """The first lines of a node's label: id and what it is, its type if not a scalar."""
    if node.op == "input":
        lines = [f"%{i} {_clip(node.name)}"]
    elif node.op == "constant":
        lines = [f"%{i} constant {format_value(node.value)}"]
    else:
        lines = [f"%{i} {node.op}{_attrs_text(node)}"]
    if node.shape or node.dtype != "float64":
        lines.append(node_type_str(node))
    if node.label:
        lines.append(f"({_clip(node.label)})")
    return lines


def value_lines(value) -> list[str]:
    """The lines a value adds to a label: "= 9", or one "sweep: v" line per sweep."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{_clip(str(k))}: {format_value(v)}" for k, v in value.items()]
    if isinstance(value, tuple):  # a loop's or branch's several results
        return [f"#{j} = {format_value(v)}" for j, v in enumerate(value)]
    return [f"= {format_value(value)}"]


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- the structure -------------------------------------------------------------------------
def _role(node) -> str:
    return node.op if node.op in ("input", "constant") else "op"


def structure(graph, values: Mapping | None = None, limit: int = DEFAULT_LIMIT,
              nearest: int = DEFAULT_NEAREST) -> nx.MultiDiGraph:
    """The picture of `graph` as a networkx MultiDiGraph (see the module docstring);
    its `.graph["summary"]` is None, or for a summary {"total", "shown", "limit",
    "ops": [(op, count), ...] most common first, "hidden_outputs"}."""
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    summary = is_summary(graph, limit)
    shown = nearest_outputs(graph, nearest) if summary else nodes
    fam = families(graph)
    values = values or {}
    s = nx.MultiDiGraph(name=graph.name, total=len(nodes), summary=None)
    for n in shown:
        i = index[id(n)]
        family, k = fam[id(n)]
        value = values.get(n)
        s.add_node(f"n{i}", id=i, op=n.op, name=n.name, role=_role(n), family=family, k=k,
                   value=value, label="\n".join(_head(n, i) + value_lines(value)))
    _add_operand_edges(s, shown, index, fam)
    hidden_outputs = _add_outputs(s, graph, index, values)
    if summary:
        ops = Counter(n.op for n in nodes).most_common()
        s.graph["summary"] = {"total": len(nodes), "shown": len(shown), "limit": limit,
                              "ops": ops, "hidden_outputs": hidden_outputs}
    return s


def _add_operand_edges(s: nx.MultiDiGraph, shown, index, fam) -> None:
    """An edge per operand use among the drawn nodes; in a summary, one node "hidden"
    stands for every node not drawn, with an edge to each drawn user of one."""
    hidden_users = []
    for n in shown:
        user = f"n{index[id(n)]}"
        missing = 0
        for pos, a in enumerate(n.inputs):
            source = f"n{index[id(a)]}"
            if source not in s:
                missing += 1
                continue
            reuse = fam[id(a)][0] == PRIMAL and fam[id(n)][0] != PRIMAL
            s.add_edge(source, user, operand=pos, reuse=reuse)
        if missing:
            hidden_users.append((user, missing))
    if hidden_users:
        s.add_node("hidden", role="hidden", family=PRIMAL, k=0, value=None,
                   label=f"… {s.graph['total'] - len(shown):,} more nodes")
        for user, missing in hidden_users:
            s.add_edge("hidden", user, operand=None, reuse=False, operands=missing)


def _add_outputs(s: nx.MultiDiGraph, graph, index, values) -> int:
    """A node per output whose node is drawn; returns how many outputs are not drawn."""
    hidden = 0
    for j, (name, node) in enumerate(graph.outputs):
        source = f"n{index[id(node)]}"
        if source not in s:
            hidden += 1
            continue
        family, k = _family_of_name(name)
        value = values.get(node)
        lines = value_lines(value)
        if len(lines) == 1 and lines[0].startswith("= "):
            lines = [f"{_clip(name)} {lines[0]}"]
        else:
            lines = [_clip(name), *lines]
        s.add_node(f"o{j}", role="output", name=name, family=family, k=k, value=value,
                   label="\n".join(lines))
        s.add_edge(source, f"o{j}", operand=None, reuse=False)
    return hidden


# -- DOT text ------------------------------------------------------------------------------
def quote(text: str, left: bool = False) -> str:
    """`text` as a DOT quoted string: quotes and backslashes escaped, a newline a line
    break (left-justified lines with `left`), other non-printing characters as visible
    escapes."""
    out = []
    for c in str(text):
        if c == "\n":
            out.append("\\l" if left else "\\n")
        elif c in '"\\':
            out.append("\\" + c)
        elif not c.isprintable():
            out.append(f"\\\\x{ord(c):02x}" if ord(c) < 256 else f"\\\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + ("\\l" if left else "") + '"'


def _html(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _fill(family: str, k: int) -> str:
    return FILL[(family, k <= 1)]


def _node_style(a: dict) -> dict[str, str]:
    """Graphviz attributes of a drawn node from its role and family."""
    role, family, k = a["role"], a["family"], a["k"]
    if role == "output":
        return {"shape": "box", "peripheries": "2", "style": "bold",
                "color": EDGE[family], "fontname": "Helvetica-Bold"}
    if role == "hidden":
        return {"shape": "box", "style": "dashed,rounded", "color": "#888888",
                "fontcolor": "#555555"}
    if role == "input":
        fill = INPUT_FILL if family == PRIMAL else _fill(family, k)
        return {"shape": "ellipse", "style": "filled", "fillcolor": fill,
                "color": EDGE[family], "penwidth": "1.5"}
    if role == "constant":
        return {"shape": "box", "style": "filled", "fillcolor": CONSTANT_FILL,
                "color": "#aaaaaa", "fontsize": "10"}
    return {"shape": "box", "style": "rounded,filled", "fillcolor": _fill(family, k),
            "color": EDGE[family]}


def _edge_style(s: nx.MultiDiGraph, u: str, v: str, a: dict) -> dict[str, str]:
    target = s.nodes[v]
    if target["role"] == "output":
        return {"color": EDGE[target["family"]], "penwidth": "1.5"}
    if u == "hidden":
        return {"style": "dashed", "color": "#888888"}
    style = {"color": EDGE[target["family"]]}
    if a.get("reuse"):
        style["style"] = "dashed"
    return style


def _statement(name: str, attrs: dict[str, str]) -> str:
    body = ", ".join(f"{k}={quote(v)}" for k, v in attrs.items())
    return f"{name} [{body}];"


def _groups(s: nx.MultiDiGraph) -> dict[tuple[str, int], list[str]]:
    """The drawn graph nodes by (family, pass), primal first."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, a in s.nodes(data=True):
        if a["role"] not in ("output", "hidden"):
            groups.setdefault((a["family"], a["k"]), []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != PRIMAL)))


def _node_lines(s: nx.MultiDiGraph, members, indent: str) -> list[str]:
    return [indent + _statement(m, {"label": s.nodes[m]["label"],
                                    **_node_style(s.nodes[m])}) for m in members]


def _body(s: nx.MultiDiGraph) -> list[str]:
    """Node statements (a cluster per family and pass when there are several), then the
    outputs (at the bottom) and the edges."""
    lines: list[str] = []
    groups = _groups(s)
    for c, ((family, k), members) in enumerate(groups.items()):
        if len(groups) == 1:
            lines += _node_lines(s, members, "  ")
            continue
        lines.append(f"  subgraph cluster_{c} {{")
        lines.append(f"    label={quote(family_label(family, k))}; style=\"rounded,dashed\"; "
                     f"color={quote(EDGE[family])}; fontcolor={quote(EDGE[family])};")
        lines += _node_lines(s, members, "    ")
        lines.append("  }")
    extra = [m for m, a in s.nodes(data=True) if a["role"] in ("output", "hidden")]
    lines += _node_lines(s, extra, "  ")
    outs = [m for m in extra if s.nodes[m]["role"] == "output"]
    if outs:
        lines.append("  { rank=sink; " + " ".join(f"{o};" for o in outs) + " }")
    for u, v, a in s.edges(data=True):
        style = ", ".join(f"{k}={quote(x)}" for k, x in _edge_style(s, u, v, a).items())
        lines.append(f"  {u} -> {v} [{style}];")
    return lines


def _swatch(fill: str) -> str:
    return f'<td bgcolor="{fill}" width="18"> </td>'


def _legend_rows(s: nx.MultiDiGraph, notes) -> list[tuple[str, str]]:
    """(swatch cell, text) rows of the legend: only what the picture shows."""
    present = {(a["role"], a["family"], a["k"]) for _, a in s.nodes(data=True)}
    rows: list[tuple[str, str]] = []
    if ("input", PRIMAL, 0) in present:
        rows.append((_swatch(INPUT_FILL), "input"))
    if any(r == "constant" for r, _, _ in present):
        rows.append((_swatch(CONSTANT_FILL), "constant"))
    if ("op", PRIMAL, 0) in present:
        rows.append((_swatch(_fill(PRIMAL, 0)), "primal op"))
    for family, k in sorted({(f, k) for r, f, k in present if f != PRIMAL},
                            key=lambda fk: (fk[1], fk[0])):
        rows.append((_swatch(_fill(family, k)), family_label(family, k)))
    if any(r == "output" for r, _, _ in present):
        rows.append(('<td border="2" width="18"> </td>', "output (name = value)"))
    if any(a.get("reuse") for _, _, a in s.edges(data=True)):
        rows.append(("<td>- - &gt;</td>", "a primal value reused by a derivative"))
    rows += [("<td></td>", note) for note in notes]
    return rows


def _legend(s: nx.MultiDiGraph, notes) -> list[str]:
    cells = "".join(f'<tr>{swatch}<td align="left">{_html(text)}</td></tr>'
                    for swatch, text in _legend_rows(s, notes))
    table = ('<<table border="0" cellborder="0" cellspacing="2" cellpadding="2">'
             '<tr><td colspan="2"><b>legend</b></td></tr>' + cells + "</table>>")
    return [f"  legend [shape=box, style=rounded, color=\"#bbbbbb\", label={table}];"]


def _note(summary: dict) -> list[str]:
    ops = summary["ops"]
    lines = [f"summary: {summary['total']:,} nodes, more than the limit of "
             f"{summary['limit']:,}:", f"drawn: the {summary['shown']:,} nodes nearest "
             "the outputs", "ops by count:"]
    lines += [f"  {op}: {count:,}" for op, count in ops[:12]]
    if len(ops) > 12:
        lines.append(f"  ({len(ops) - 12} more ops)")
    if summary["hidden_outputs"]:
        lines.append(f"{summary['hidden_outputs']:,} outputs not drawn")
    return ["  note " + f"[shape=note, style=filled, fillcolor=\"#fff8d0\", "
            f"label={quote(chr(10).join(lines), left=True)}];"]


def dot_text(s: nx.MultiDiGraph, title: str | None = None, legend: bool = True,
             notes=(), rankdir: str = "TB") -> str:
    """The DOT text of a structure (from `structure`); `notes` are extra legend lines."""
    name = s.graph.get("name") or "graph"
    head = [f"digraph {quote(name)} {{",
            f"  graph [rankdir={rankdir}, fontname=\"Helvetica\", nodesep=0.3, "
            f"ranksep=0.4, labelloc=t, label={quote(title or '')}];",
            "  node [fontname=\"Helvetica\", fontsize=11];",
            "  edge [arrowsize=0.7];"]
    tail = []
    if legend:
        tail += _legend(s, notes)
    if s.graph.get("summary"):
        tail += _note(s.graph["summary"])
    return "\n".join(head + _body(s) + tail + ["}"]) + "\n"


def to_dot(graph, values: Mapping | None = None, *, limit: int = DEFAULT_LIMIT,
           nearest: int = DEFAULT_NEAREST, title: str | None = None, legend: bool = True,
           notes=(), rankdir: str = "TB") -> str:
    """The DOT text of a picture of `graph` (see the module docstring)."""
    s = structure(graph, values, limit, nearest)
    if title is None:
        title = f"{graph.name or 'graph'}: {len(graph.nodes):,} nodes"
    return dot_text(s, title, legend, notes, rankdir)


# -- Graphviz -----------------------------------------------------------------------------
def picture_format(path) -> str:
    """"svg", "png", "pdf" or "dot" from the file name; UsageError for anything else."""
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise UsageError(f"{os.fspath(path)}: unknown picture format "
                         f"{'.' + ext if ext else '(no extension)'}: use .svg, .png, .pdf "
                         f"or .dot")
    return ext


def have_graphviz() -> bool:
    """True if Graphviz's `dot` program is on PATH."""
    return shutil.which("dot") is not None


def _not_found(fmt: str, what: str) -> GraphvizNotFoundError:
    return GraphvizNotFoundError(f"cannot draw {what}: {fmt.upper()} needs Graphviz's 'dot' "
                                 f"program, which is not on PATH: {INSTALL_HINT}")


def check_format(path) -> str:
    """The picture format of `path`, checked before any work is done: UsageError for
    an unknown one, GraphvizNotFoundError if it needs Graphviz and there is none."""
    fmt = picture_format(path)
    if fmt != "dot" and not have_graphviz():
        raise _not_found(fmt, os.fspath(path))
    return fmt


def run_dot(text: str, fmt: str, what: str = "the picture") -> bytes:
    """`text` laid out and drawn by Graphviz's `dot` as `fmt` (svg, png, pdf)."""
    exe = shutil.which("dot")
    if exe is None:
        raise _not_found(fmt, what)
    try:
        done = subprocess.run([exe, f"-T{fmt}"], input=text.encode("utf-8"),
                              capture_output=True, timeout=DOT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise GraphvizError(f"cannot draw {what}: Graphviz took more than {DOT_TIMEOUT}s "
                            f"(draw fewer nodes: a lower limit)") from None
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GraphvizError(f"cannot draw {what}: Graphviz's dot failed (exit status "
                            f"{done.returncode}): {err[-1] if err else 'no message'}")
    return done.stdout


def write_picture(text: str, path) -> str:
    """Write DOT `text` to `path`, drawn by Graphviz unless it ends in .dot; returns the
    format. Nothing is written if drawing fails."""
    fmt = picture_format(path)
    data = text.encode("utf-8") if fmt == "dot" else run_dot(text, fmt, os.fspath(path))
    with open(path, "wb") as f:
        f.write(data)
    return fmt


def svg_or_none(text: str) -> str | None:
    """The SVG of DOT `text`, or None without Graphviz (for Jupyter's `_repr_svg_`)."""
    if not have_graphviz():
        return None
    return run_dot(text, "svg").decode("utf-8")
