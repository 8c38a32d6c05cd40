"""The `adsvc` command line (also `python -m adsvc`).

    adsvc grad 'x*x + x*y + 2' --at x=3 --at y=4        # value: 23 / gradient: x = 10, y = 3
    adsvc eval 'sin(x)*exp(y)' --at x=1 --at y=0 --json
    adsvc show 'x*x + x*y + 2' --mode reverse            # text IR of the gradient graph
    adsvc export 'x*x + x*y + 2' -o graph.json           # a graph file (.json or .pb)
    adsvc serve --port 50051

EXPR is a safe infix expression (see adsvc.expr) or the path of a graph file (.pb binary
Graph proto, .json protobuf-JSON). Without --server everything runs in this process.
Every failure prints one line `adsvc: error: ...` to stderr; the exit status is 2 for a
bad command line or expression and 1 for a failure while compiling, evaluating or
talking to a server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adsvc.passes.pipeline import signature
from adsvc_protocol.errors import AdsvcError, InvalidRequestError, UsageError, one_line
from adsvc_protocol.feeds import convert_feed
from adsvc_protocol.modes import normalize_modes
from adsvc_protocol.recipes import ordered, scalar_output

USAGE_ERROR = 2
RUN_ERROR = 1

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_OPTION_LIKE = re.compile(r"^--?[A-Za-z][A-Za-z0-9_-]*(=.*)?$")
_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class CLIError(UsageError):
    """A wrong command line (or one this installation cannot run: `code` RUN_ERROR)."""

    def __init__(self, message: str, code: int = USAGE_ERROR, field: str = ""):
        super().__init__(message, field)
        self.exit_status = code


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (raised, so main() reports them)."""

    def error(self, message: str):
        """Raise a CLIError instead of printing the usage and exiting."""
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _minus_hint(argv: Sequence[str]) -> str:
    """A hint when an expression such as '-x' was taken for an option."""
    bad = [a for a in argv if re.match(r"^-[A-Za-z_]\w*$", a) and a not in ("-h", "-o")]
    if not bad:
        return ""
    return (f" (to pass the expression {bad[0]!r}, which starts with '-', write it "
            f"with parentheses or a leading space: '({bad[0]})' or ' {bad[0]}')")


# -- values ------------------------------------------------------------------------------
def parse_at(items: Sequence[str] | None) -> dict[str, np.ndarray]:
    """{name: value} from `--at NAME=VALUE` items (a number, or a JSON list of numbers)."""
    out: dict[str, np.ndarray] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise CLIError(f"bad --at {item!r}: expected NAME=VALUE, e.g. --at x=3 "
                           f"or --at x=[1,2,3]")
        if not _NAME.match(name):
            raise CLIError(f"bad --at {item!r}: {name!r} is not a variable name")
        if name in out:
            raise CLIError(f"--at {name} is given twice")
        if not text:
            raise CLIError(f"bad --at {item!r}: no value after '='")
        out[name] = _parse_value(name, text)
    return out


def _parse_value(name: str, text: str) -> np.ndarray:
    low = text.lower()
    if low in ("true", "false"):
        return np.asarray(low == "true")
    if text.startswith("["):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = getattr(e, "msg", "too deeply nested")
            raise CLIError(f"bad --at {name}={text}: not a JSON list of numbers ({msg})"
                           ) from None
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError):
            raise CLIError(f"bad --at {name}={text}: expected a (nested, rectangular) "
                           f"list of numbers") from None
        return arr
    try:
        return np.asarray(float(text), dtype=np.float64)
    except ValueError:
        raise CLIError(f"bad --at {name}={text}: not a number (use e.g. 3, -1.5, 1e-3 "
                       f"or a list [1,2,3])") from None


# -- the graph ---------------------------------------------------------------------------
@dataclass
class Loaded:
    """A graph to run and the feeds (the `--at` values) for its inputs."""

    graph: Any  # adsvc.Graph
    feeds: dict[str, np.ndarray]


def load(spec: str, at: dict[str, np.ndarray], need_values: bool) -> Loaded:
    """The graph of EXPR-or-FILE `spec` and the feeds for its inputs."""
    from adsvc import graphfile
    from adsvc.expr import parse

    if graphfile.looks_like_file(spec):
        g = graphfile.load(spec)
        names = g.input_names
        extra = [k for k in at if k not in names]
        if extra:
            raise CLIError(f"--at {extra[0]}: {spec} has no input {extra[0]!r} "
                           f"(inputs: {', '.join(names) or 'none'})")
        # --at values are float64 text; the one feed rule converts them exactly
        feeds = {n.name: convert_feed(n.name, at[n.name].tolist(), n.dtype, n.shape)
                 for n in g.inputs if n.name in at}
        _check_missing(g.input_names, at, need_values, spec)
        return Loaded(g, feeds)
    expr = parse(spec)
    extra = [k for k in at if k not in expr.variables]
    if extra:
        raise CLIError(f"--at {extra[0]}: the expression has no variable {extra[0]!r} "
                       f"(variables: {', '.join(expr.variables) or 'none'})")
    _check_missing(expr.variables, at, need_values, "the expression")
    g = expr.graph({k: v.shape for k, v in at.items()})
    return Loaded(g, {k: v.astype(np.float64) for k, v in at.items()})


def _check_missing(names, at, need_values: bool, what: str):
    missing = [n for n in names if n not in at]
    if need_values and missing:
        s = "s" if len(missing) > 1 else ""
        raise CLIError(f"no value for {what}'s input{s} {', '.join(map(repr, missing))}: "
                       f"pass " + " ".join(f"--at {m}=VALUE" for m in missing))


def parse_wrt(text: str | None, names: Sequence[str]) -> list[str] | None:
    """The names of `--wrt X,Y`, each one of `names`; None without --wrt (all float
    inputs)."""
    if text is None:
        return None
    wrt = [w.strip() for w in text.split(",") if w.strip()]
    if not wrt:
        raise CLIError("--wrt needs at least one variable name, e.g. --wrt x,y")
    for w in wrt:
        if w not in names:
            raise CLIError(f"--wrt {w}: unknown variable {w!r} "
                           f"(variables: {', '.join(names) or 'none'})")
    return wrt


def make_client(args):
    """The in-process client, or a remote one with --server."""
    import adsvc

    if not getattr(args, "server", None):
        return adsvc.local()
    try:
        return adsvc.connect(args.server)
    except ImportError as e:
        raise CLIError(f"--server needs the remote SDK client, which is not available "
                       f"({e})", RUN_ERROR) from None


def _close(client):
    close = getattr(client, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # closing must not mask the real result
            close()


def _ir_text(graph) -> str:
    return graph.text()  # both clients return adsvc graphs (adsvc.connect)


# -- output ------------------------------------------------------------------------------
def _fmt(v) -> str:
    """A value for people: 23 not 23.0, [1, 2.5], nan, inf."""
    a = np.asarray(v)
    if a.ndim:
        return "[" + ", ".join(_fmt(x) for x in a) + "]"
    x = a.item()
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _jsonable(v):
    return np.asarray(v).tolist()


# -- commands ----------------------------------------------------------------------------
def cmd_grad(args) -> int:
    """`adsvc grad`: print the value and the gradient (with --show-ir also the gradient
    graph); returns the exit status."""
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=True)
    names = loaded.graph.input_names
    wrt = parse_wrt(args.wrt, names)
    client = make_client(args)
    try:
        value, grads = client.value_and_grad(loaded.graph, wrt=wrt, mode=args.mode,
                                             inputs=loaded.feeds, timeout=args.timeout)
        ir = None
        if args.show_ir:
            ir = _ir_text(client.differentiate(loaded.graph, args.mode, wrt,
                                               seed=args.mode == "reverse",
                                               timeout=args.timeout))
    finally:
        _close(client)
    grads = list(ordered(grads, wrt or names).items())
    if args.json:
        out: dict[str, Any] = {"value": _jsonable(value),
                               "gradient": {k: _jsonable(g) for k, g in grads}}
        if ir is not None:
            out["ir"] = ir
        print(json.dumps(out))
    else:
        print(f"value: {_fmt(value)}")
        print("gradient: " + (", ".join(f"{k} = {_fmt(g)}" for k, g in grads) or "(none)"))
        if ir is not None:
            print()
            print(ir.rstrip("\n"))
    return 0


def cmd_eval(args) -> int:
    """`adsvc eval`: print every output (a single one as `value:`); returns the exit status."""
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=True)
    client = make_client(args)
    try:
        out = client.evaluate(loaded.graph, loaded.feeds, timeout=args.timeout)
    finally:
        _close(client)
    order = list(ordered(out, loaded.graph.output_names))
    if args.json:
        doc: dict[str, Any] = {"outputs": {k: _jsonable(out[k]) for k in order}}
        if len(order) == 1:
            doc = {"value": doc["outputs"][order[0]], **doc}
        print(json.dumps(doc))
    elif len(order) == 1:
        print(f"value: {_fmt(out[order[0]])}")
    else:
        for k in order:
            print(f"{k}: {_fmt(out[k])}")
    return 0


def _modes(text: str | None, order: int | None) -> tuple[str, ...] | None:
    if text is None:
        if order is not None:
            raise CLIError("--order needs --mode forward|reverse (or a comma list such "
                           "as reverse,forward)")
        return None
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes:
        raise CLIError("--mode needs forward or reverse")
    return normalize_modes(modes, order, labels=("--mode", "--order"), error=CLIError)


def _single_scalar_float(graph) -> bool:
    try:
        scalar_output(signature(graph)[1], primal_only=False)
    except InvalidRequestError:
        return False
    return True


def cmd_show(args) -> int:
    """`adsvc show`: print the text IR of the graph or, with --mode, of its derivative (a
    first reverse pass over a single scalar float output is seeded: the gradient graph)."""
    modes = _modes(args.mode, args.order)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=False)
    if modes is None:
        if args.wrt is not None:
            raise CLIError("--wrt needs --mode forward|reverse")
        print(loaded.graph.text().rstrip("\n"))
        return 0
    wrt = parse_wrt(args.wrt, loaded.graph.input_names)
    seed = modes[0] == "reverse" and _single_scalar_float(loaded.graph)
    client = make_client(args)
    try:
        dg = client.differentiate(loaded.graph, modes, wrt, order=len(modes), seed=seed,
                                  timeout=args.timeout)
        print(_ir_text(dg).rstrip("\n"))
    finally:
        _close(client)
    return 0


def cmd_export(args) -> int:
    """`adsvc export`: write the graph to a .json or .pb file and print what was written."""
    from adsvc import graphfile

    fmt = graphfile.file_format(args.output)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=False)
    graphfile.save(loaded.graph, args.output)
    g = loaded.graph
    print(f"wrote {args.output} ({fmt}: {len(g.inputs)} input(s), {len(g.outputs)} "
          f"output(s), {len(g.nodes)} nodes)")
    return 0


def cmd_serve(args) -> int:
    """`adsvc serve`: run the gRPC server until SIGTERM/SIGINT; returns its exit status."""
    from adsvc.server.app import run_from_args

    rc = run_from_args(args)
    return int(rc or 0)


# -- the parser --------------------------------------------------------------------------
def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _order(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


EXPR_HELP = ("an infix expression such as 'x*x + x*y + 2' or 'sin(x)*exp(y)', or a graph "
             "file (.pb binary Graph proto, .json protobuf-JSON)")
AT_HELP = ("a variable's value: NAME=NUMBER (float64 scalar) or NAME=[1,2,3] (float64 "
           "array of that shape); repeat for each variable")


def _common(p, values: str):
    p.add_argument("expr", metavar="EXPR", help=EXPR_HELP)
    p.add_argument("--at", action="append", metavar="NAME=VALUE",
                   help=AT_HELP if values == "required" else
                   AT_HELP + " (here only the shapes matter; default scalar)")


def _remote(p):
    p.add_argument("--server", metavar="HOST:PORT",
                   help="use the adsvc server at HOST:PORT instead of this process")
    p.add_argument("--timeout", type=_positive, metavar="S",
                   help="deadline in seconds for each call")


def _add_grad_eval(sub) -> None:
    p = sub.add_parser("grad", help="value and gradient of a scalar expression or graph",
                       description="Value and gradient of a graph with one scalar output.")
    _common(p, "required")
    p.add_argument("--mode", choices=("forward", "reverse"), default="reverse",
                   help="differentiation mode (default reverse)")
    p.add_argument("--wrt", metavar="X,Y", help="differentiate only with respect to these "
                   "variables (default: all float inputs)")
    p.add_argument("--json", action="store_true",
                   help='print {"value": ..., "gradient": {"x": ..., ...}}')
    p.add_argument("--show-ir", action="store_true",
                   help="also print the differentiated graph's text IR (with --json: "
                        "an \"ir\" key)")
    _remote(p)
    p.set_defaults(func=cmd_grad)

    p = sub.add_parser("eval", help="evaluate an expression or graph",
                       description="Evaluate every output of a graph.")
    _common(p, "required")
    p.add_argument("--json", action="store_true",
                   help='print {"value": ... (one output only), "outputs": {name: ...}}')
    _remote(p)
    p.set_defaults(func=cmd_eval)


def _add_show_export(sub) -> None:
    p = sub.add_parser("show", help="print the text IR of a graph or of its derivative",
                       description="Print the text IR of the graph, or with --mode of its "
                                   "differentiated graph.")
    _common(p, "shapes")
    p.add_argument("--mode", metavar="MODE", help="forward or reverse, or one mode per "
                   "order as a comma list (e.g. reverse,forward for Hessian-vector products)")
    p.add_argument("--wrt", metavar="X,Y", help="differentiate only with respect to these")
    p.add_argument("--order", type=_order, metavar="N", help="derivative order (default 1)")
    _remote(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write an expression (or convert a graph) to a "
                       "graph file", description="Write the graph to a .json or .pb file.")
    _common(p, "shapes")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the graph file to write: .json (protobuf-JSON) or .pb (binary)")
    p.set_defaults(func=cmd_export)


def _add_serve(sub, argv: Sequence[str]) -> None:
    p = sub.add_parser("serve", help="run the adsvc gRPC server",
                       description="Run the adsvc gRPC server.")
    if list(argv[:1]) == ["serve"]:  # import the server (and grpc) only when needed
        try:
            from adsvc.server.app import add_serve_arguments
        except ImportError as e:
            raise CLIError(f"the server is not available in this installation "
                           f"(adsvc.server.app: {e})") from None
        add_serve_arguments(p)
        p.set_defaults(func=cmd_serve)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The `adsvc` argument parser. `serve` gets its flags (and imports the server) only
    when `argv` starts with "serve", so the other commands run without grpc."""
    from adsvc.version import __version__

    parser = _Parser(
        prog="adsvc",
        description="Compile expression graphs and compute values and derivatives "
                    "(in-process, or through an adsvc server).",
        epilog="Example: adsvc grad 'x*x + x*y + 2' --at x=3 --at y=4")
    parser.add_argument("--version", action="version", version=f"adsvc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_grad_eval(sub)
    _add_show_export(sub)
    _add_serve(sub, argv)
    return parser


def _protect_expressions(argv: list[str]) -> list[str]:
    """Keep argparse from reading an expression like '-x*y' as an option: tokens that
    start with '-' but cannot be an option or a negative number get a leading space
    (the expression parser ignores it)."""
    out = []
    for a in argv:
        if (len(a) > 1 and a.startswith("-") and a != "--" and not _OPTION_LIKE.match(a)
                and not _NUMBER.match(a)):
            a = " " + a
        out.append(a)
    return out


def describe(e: BaseException) -> tuple[str, int]:
    """A one-line message and exit status for an exception raised by a command: every
    error of ours says both itself (`summary`, `exit_status`)."""
    if isinstance(e, AdsvcError):
        return e.summary(), e.exit_status
    if isinstance(e, OSError):
        return f"{one_line(e.strerror or e)}", RUN_ERROR
    return f"internal error: {type(e).__name__}: {one_line(e)}", RUN_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (never raises, never prints a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        try:
            args = parser.parse_args(_protect_expressions(argv))
        except CLIError as e:
            hint = _minus_hint(argv)
            if hint:
                raise CLIError(str(e).split(" (see '")[0] + hint) from None
            raise
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return USAGE_ERROR
        return args.func(args)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("adsvc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `adsvc show ... | head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return RUN_ERROR
    except Exception as e:
        if os.environ.get("ADSVC_DEBUG"):
            raise
        msg, code = describe(e)
        print(f"adsvc: error: {msg}", file=sys.stderr)
        return code
