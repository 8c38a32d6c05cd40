"""Safe infix expressions for the CLI: ``'x*x + x*y + 2'`` -> an adsvc graph.

The text is parsed with ``ast.parse(mode="eval")`` and only a whitelist of node types
is accepted (numbers, names, + - * / **, unary +/-, comparisons, and calls of the
functions in `FUNCTIONS`). Nothing is ever evaluated by Python: the checked tree is
walked once to build graph nodes with the adsvc graph-building functions. Every
rejection is an `ExprError` naming the offending token and its column.
"""

from __future__ import annotations

import ast
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, input_node
from adsvc.ops import api
from adsvc_protocol import dtypes
from adsvc_protocol.errors import AdsvcError, UsageError

MAX_LENGTH = 100_000  # characters; longer text is refused before parsing


class ExprError(UsageError, ValueError):
    """A bad expression: the message names the token/name and its 1-based column."""

    prefix = "bad expression: "


@dataclass(frozen=True)
class Function:
    """A callable name: its arities and the builder for each."""

    build: Callable[..., Node]
    arities: tuple[int, ...]
    doc: str


def _minmax(binary, reduce):
    return lambda *a: binary(*a) if len(a) == 2 else reduce(a[0])


FUNCTIONS: dict[str, Function] = {
    **{name: Function(getattr(api, name), (1,), f"{name}(x)") for name in (
        "exp", "log", "log1p", "expm1", "sin", "cos", "tan", "tanh", "sigmoid",
        "softplus", "sqrt", "abs", "sign", "square", "reciprocal", "relu",
        "sum", "mean", "logsumexp", "norm", "squared_norm")},
    "pow": Function(api.pow, (2,), "pow(a, b)"),
    "maximum": Function(api.maximum, (2,), "maximum(a, b)"),
    "minimum": Function(api.minimum, (2,), "minimum(a, b)"),
    "max": Function(_minmax(api.maximum, api.max), (2, 1),
                    "max(a, b) elementwise or max(x) over all elements"),
    "min": Function(_minmax(api.minimum, api.min), (2, 1),
                    "min(a, b) elementwise or min(x) over all elements"),
    "dot": Function(api.dot, (2,), "dot(a, b) = sum(a*b)"),
    "where": Function(api.where, (3,), "where(cond, a, b)"),
}

CONSTANTS: dict[str, float] = {"pi": math.pi}

_BINOPS = {ast.Add: api.add, ast.Sub: api.sub, ast.Mult: api.mul, ast.Div: api.div,
           ast.Pow: api.pow}
_BINOP_TEXT = {ast.Mod: "%", ast.FloorDiv: "//", ast.MatMult: "@", ast.LShift: "<<",
               ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&"}
_CMPOPS = {ast.Lt: api.lt, ast.LtE: api.le, ast.Gt: api.gt, ast.GtE: api.ge,
           ast.Eq: api.eq, ast.NotEq: api.ne}
_CONSTRUCTS = {  # friendly names for node types we refuse
    ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Lambda: "lambda",
    ast.IfExp: "'if ... else' (use where(cond, a, b))", ast.BoolOp: "'and'/'or'",
    ast.List: "a list", ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set",
    ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator",
    ast.Starred: "'*' unpacking", ast.NamedExpr: "':='", ast.JoinedStr: "an f-string",
    ast.Await: "'await'", ast.Yield: "'yield'", ast.YieldFrom: "'yield'",
    ast.Slice: "slicing",
}


def _col(node: ast.AST) -> str:
    return f"column {getattr(node, 'col_offset', 0) + 1}"


def _snippet(text: str, node: ast.AST) -> str:
    try:
        s = ast.get_source_segment(text, node) or ""
    except Exception:
        s = ""
    s = " ".join(s.split())  # keep messages on one line
    return s if len(s) <= 40 else s[:37] + "..."


def _syntax_message(text: str, e: SyntaxError) -> str:
    detail = "" if e.msg in ("invalid syntax", "") else f": {e.msg}"
    lines = text.split("\n")
    lineno = e.lineno or 1
    line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    start = e.offset or 0
    if start < 1 or start > len(line):
        return f"invalid syntax: unexpected end of expression{detail}"
    end = e.end_offset if e.end_offset and e.end_offset > start else start + 1
    token = line[start - 1:end - 1].strip() or line[start - 1]
    where = f"line {lineno} column {start}" if len(lines) > 1 else f"column {start}"
    return f"invalid syntax at {where} near '{token}'{detail}"


def _parse(text: str) -> ast.AST:
    """The body of `text` parsed as a Python expression (not yet checked)."""
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as e:
        if "integer string conversion" in (e.msg or ""):
            raise ExprError(f"an integer literal is too long (more than "
                            f"{sys.get_int_max_str_digits()} digits); write a large "
                            f"number as a float, e.g. 1e400") from None
        raise ExprError(_syntax_message(text, e)) from None
    except (RecursionError, MemoryError):
        # Python's parser nests one level per operator of a chain ('x+x+...+x'), and
        # gives up at a few thousand levels
        raise ExprError("expression is too deeply nested for the parser (a chain of "
                        "thousands of operators): group terms in parentheses, e.g. "
                        "(a+b+c) + (d+e+f), or use sum() over a vector") from None
    except ValueError as e:  # e.g. NUL bytes, lone surrogates
        raise ExprError(f"invalid expression: {e}") from None


def _children(node: ast.AST) -> list[ast.AST]:
    """The operands of a checked node, left to right."""
    if isinstance(node, ast.BinOp):
        return [node.left, node.right]
    if isinstance(node, ast.UnaryOp):
        return [node.operand]
    if isinstance(node, ast.Compare):
        return [node.left, *node.comparators]
    if isinstance(node, ast.Call):
        return list(node.args)
    return []


class Expression:
    """A checked expression: its free variables and a builder for its graph."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise ExprError("the expression must be a string")
        if len(text) > MAX_LENGTH:
            raise ExprError(f"expression is too long ({len(text)} characters, "
                            f"limit {MAX_LENGTH})")
        if not text.strip():
            raise ExprError("empty expression")
        if "\0" in text:
            raise ExprError("the expression contains a NUL character")
        self.text = text.strip()  # column offsets refer to the stripped text
        self.tree = _parse(self.text)
        self.variables: list[str] = []
        self._seen: set[str] = set()
        # pre-order, left to right (the order variables appear in), without recursion
        stack = [self.tree]
        while stack:
            node = stack.pop()
            self._check(node)
            stack.extend(reversed(_children(node)))

    # -- checking ----------------------------------------------------------------------
    def _refuse(self, node: ast.AST, what: str):
        snip = _snippet(self.text, node)
        near = f" in '{snip}'" if snip else ""
        raise ExprError(f"{what} is not allowed (at {_col(node)}{near})")

    def _check(self, node: ast.AST) -> None:
        """Check `node` itself (its children are checked by the caller's walk)."""
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                kind = "complex number" if isinstance(v, complex) else type(v).__name__
                self._refuse(node, f"a {kind} literal {v!r}")
            try:
                float(v)
            except OverflowError:
                raise ExprError(f"number too large at {_col(node)}") from None
        elif isinstance(node, ast.Name):
            self._check_name(node)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                op = _BINOP_TEXT.get(type(node.op), type(node.op).__name__)
                self._refuse(node, f"the operator '{op}'")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                op = {ast.Not: "not", ast.Invert: "~"}.get(type(node.op), "?")
                self._refuse(node, f"the operator '{op}'")
        elif isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                self._refuse(node, "a chained comparison")
            if type(node.ops[0]) not in _CMPOPS:
                self._refuse(node, "the comparison 'is'/'in'")
        elif isinstance(node, ast.Call):
            self._check_call(node)
        else:
            what = _CONSTRUCTS.get(type(node), f"'{type(node).__name__}'")
            self._refuse(node, what)

    def _check_name(self, node: ast.Name) -> None:
        name = node.id
        if name.startswith("_"):
            self._refuse(node, f"the name '{name}'")
        if name in FUNCTIONS:
            raise ExprError(f"'{name}' is a function, call it as {FUNCTIONS[name].doc} "
                            f"(at {_col(node)})")
        if name not in CONSTANTS and name not in self._seen:
            self._seen.add(name)
            self.variables.append(name)

    def _check_call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name):
            what = ("attribute access" if isinstance(node.func, ast.Attribute)
                    else "calling an expression")
            self._refuse(node.func, what)
        name = node.func.id
        fn = FUNCTIONS.get(name)
        if fn is None:
            raise ExprError(f"unknown function '{name}' at {_col(node)} (known: "
                            f"{', '.join(sorted(FUNCTIONS))})")
        if node.keywords:
            self._refuse(node, f"a keyword argument in {name}()")
        for a in node.args:
            if isinstance(a, ast.Starred):
                self._refuse(a, "'*' unpacking")
        if len(node.args) not in fn.arities:
            n = " or ".join(str(k) for k in sorted(fn.arities))
            raise ExprError(f"{name}() takes {n} argument{'s' if fn.arities != (1,) else ''}, "
                            f"got {len(node.args)} (at {_col(node)}; usage: {fn.doc})")

    # -- building ----------------------------------------------------------------------
    def build(self, env: Mapping[str, Node]) -> Node:
        """The node of the expression, with `env` giving a node for every variable."""
        missing = [v for v in self.variables if v not in env]
        if missing:
            raise ExprError(f"no node for variable(s) {', '.join(missing)}")
        # post-order, left to right, without recursion: a node is built after its children
        built: dict[int, Node] = {}
        stack: list[tuple[ast.AST, bool]] = [(self.tree, False)]
        while stack:
            node, ready = stack.pop()
            kids = _children(node)
            if not ready:
                stack.append((node, True))
                stack.extend((k, False) for k in reversed(kids))
                continue
            built[id(node)] = self._make(node, [built.pop(id(k)) for k in kids], env)
        return built[id(self.tree)]

    def _make(self, node: ast.AST, args: list[Node], env: Mapping[str, Node]) -> Node:
        """The node of `node` given the nodes of its children (`args`)."""
        if isinstance(node, ast.Constant):
            return constant(np.float64(node.value))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return constant(np.float64(CONSTANTS[node.id]))
            return env[node.id]
        if isinstance(node, ast.BinOp):
            return self._apply(node, _BINOPS[type(node.op)], args)
        if isinstance(node, ast.UnaryOp):
            return args[0] if isinstance(node.op, ast.UAdd) else self._apply(node, api.neg, args)
        if isinstance(node, ast.Compare):
            return self._apply(node, _CMPOPS[type(node.ops[0])], args)
        assert isinstance(node, ast.Call)
        return self._apply(node, FUNCTIONS[node.func.id].build, args)

    def _apply(self, node: ast.AST, fn, args: list[Node]) -> Node:
        try:
            return fn(*args)
        except AdsvcError as e:
            snip = _snippet(self.text, node)
            raise ExprError(f"'{snip}' at {_col(node)}: {e.description}") from None
        except (TypeError, ValueError, IndexError) as e:
            snip = _snippet(self.text, node)
            raise ExprError(f"'{snip}' at {_col(node)}: {e}") from None

    def graph(self, shapes: Mapping[str, tuple[int, ...]] | None = None,
              output: str | None = None, dtype: str = dtypes.FLOAT64) -> Graph:
        """The graph with one `dtype` input per variable (scalar unless `shapes` says
        otherwise) and one output: named `output`, by default `output_name(variables)`
        ("z", or another name that is not a variable)."""
        if output is None:
            output = output_name(self.variables)
        elif output in self._seen:
            raise ExprError(f"the output name {output!r} is also a variable of the "
                            f"expression")
        shapes = shapes or {}
        inputs = {v: input_node(v, dtype, tuple(shapes.get(v, ()))) for v in self.variables}
        node = self.build(inputs)
        return Graph(list(inputs.values()), [(output, node)], "expr")


OUTPUT_NAMES = ("z", "out", "value", "result", "f")  # preferred, in this order


def output_name(variables) -> str:
    """The name of an expression's output: the first of OUTPUT_NAMES that is not one of
    `variables`, else the first of "z_1", "z_2", ... that is not (there always is one:
    `variables` is finite)."""
    taken = set(variables)
    for name in OUTPUT_NAMES:
        if name not in taken:
            return name
    k = 1
    while f"z_{k}" in taken:
        k += 1
    return f"z_{k}"


def parse(text: str) -> Expression:
    """Check `text`; raises ExprError with a one-line message if it is not allowed."""
    return Expression(text)


def to_graph(text: str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Graph:
    """Parse `text` and build its graph (float64 inputs; scalars unless in `shapes`)."""
    return parse(text).graph(shapes)
