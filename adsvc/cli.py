"""The `adsvc` command line (also `python -m adsvc`).

    adsvc grad 'x*x + x*y + 2' --at x=3 --at y=4        # value: 23 / gradient: x = 10, y = 3
    adsvc eval 'sin(x)*exp(y)' --at x=1 --at y=0 --json
    adsvc show 'x*x + x*y + 2' --mode reverse            # text IR of the gradient graph
    adsvc export 'x*x + x*y + 2' -o graph.json           # a graph file (.json or .pb)
    adsvc dot 'x*x + x*y + 2' --mode reverse --at x=3 --at y=4 -o grad.svg   # a picture
    adsvc serve --port 50051

EXPR is a safe infix expression (see adsvc.expr) or the path of a graph file (.pb binary
Graph proto, .json protobuf-JSON). Without --server everything runs in this process.
Every failure prints one line `adsvc: error: ...` to stderr; the exit status is 2 for a
bad command line, expression or file and 1 for a failure while compiling, evaluating or
talking to a server.

What is loaded is bounded (`Limits`: graph-file bytes, nodes, elements of any constant
or node; see adsvc.graphfile), and so are the order, the timeout, the number of
arguments and what a message echoes. With --server, the --tls* flags and the token
(--token-file or $ADSVC_TOKEN, never a command-line value) become the `tls=` and
`token=` arguments of `adsvc.connect` (`connect_options`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adsvc import graphfile
from adsvc.passes.pipeline import signature
from adsvc_protocol.errors import (
    AdsvcError,
    InvalidRequestError,
    LimitExceededError,
    UsageError,
    one_line,
)
from adsvc_protocol.feeds import convert_feed
from adsvc_protocol.modes import normalize_modes
from adsvc_protocol.recipes import ordered, scalar_output
from adsvc_protocol.secrets import read_secret_file

USAGE_ERROR = 2
RUN_ERROR = 1

MAX_FILE_BYTES_ENV = "ADSVC_MAX_FILE_BYTES"  # default of --max-file-bytes
TOKEN_ENV = "ADSVC_TOKEN"  # the bearer token for --server (or --token-file)
MAX_ORDER = 8  # --order / modes: derivative graphs grow exponentially with the order
MAX_TIMEOUT = 10**7  # seconds; gRPC overflows far above this (and then expires at once)
MAX_ECHO = 60  # characters of a user's value echoed in a message
MAX_PATH = 500  # characters of a path echoed in a message
MAX_MESSAGE = 2000  # characters of an error line
MAX_ARGS = 1000  # command-line arguments besides the --at items (argparse is quadratic)
_AT_COMMANDS = ("grad", "eval", "show", "export", "dot")
_OPTION_LIKE = re.compile(r"^--?[A-Za-z][A-Za-z0-9_-]*(=.*)?$")
_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class CLIError(UsageError):
    """A wrong command line (or one this installation cannot run: `code` RUN_ERROR)."""

    def __init__(self, message: str, code: int = USAGE_ERROR, field: str = ""):
        super().__init__(message, field)
        self.exit_status = code


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (raised, so main() reports them), and options
    are never abbreviated (`--token SECRET` must not be read as `--token-file SECRET`)."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message: str):
        """Raise a CLIError instead of printing the usage and exiting."""
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _RefuseToken(argparse.Action):
    """`--token VALUE` on grad/eval/show: refused without echoing the value (a command
    line is visible to every user of the machine, and lands in shell histories)."""

    def __call__(self, parser, namespace, values, option_string=None):
        """Raise the usage error."""
        raise CLIError(f"{option_string} is not accepted on the command line (other "
                       f"users can read it): put the token in a file and pass "
                       f"--token-file FILE, or set ${TOKEN_ENV}")


def _minus_hint(argv: Sequence[str]) -> str:
    """A hint when an expression such as '-x' was taken for an option."""
    bad = [a for a in argv if re.match(r"^-[A-Za-z_]\w*$", a) and a not in ("-h", "-o")]
    if not bad:
        return ""
    return (f" (to pass the expression {bad[0]!r}, which starts with '-', write it "
            f"with parentheses or a leading space: '({bad[0]})' or ' {bad[0]}')")


# -- values ------------------------------------------------------------------------------
def clip(text, limit: int = MAX_ECHO) -> str:
    """`text` cut to `limit` characters (with "..." and the length) for a message."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def parse_at(items: Sequence[str] | None) -> dict[str, np.ndarray]:
    """{name: value} from `--at NAME=VALUE` items (a number, or a JSON list of numbers).
    A name is any printable text without ':' or '=' (a graph file's inputs may have any
    such name; an expression's variables are identifiers)."""
    out: dict[str, np.ndarray] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise CLIError(f"bad --at {clip(item)!r}: expected NAME=VALUE, e.g. --at x=3 "
                           f"or --at x=[1,2,3]")
        if ":" in name or not name.isprintable():
            raise CLIError(f"bad --at {clip(item)!r}: {clip(name)!r} is not a variable "
                           f"name (names are printable, without ':')")
        if name in out:
            raise CLIError(f"--at {clip(name)} is given twice")
        if not text:
            raise CLIError(f"bad --at {clip(item)!r}: no value after '='")
        out[name] = _parse_value(name, text)
    return out


def _parse_value(name: str, text: str) -> np.ndarray:
    low = text.lower()
    if low in ("true", "false"):
        return np.asarray(low == "true")
    bad = f"bad --at {clip(name)}={clip(text)}"
    if text.startswith("["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or > 4300 digits
            msg = getattr(e, "msg", None) or ("too deeply nested" if isinstance(
                e, RecursionError) else one_line(e))
            raise CLIError(f"{bad}: not a JSON list of numbers ({clip(msg, 200)})"
                           ) from None
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise CLIError(f"{bad}: expected a (nested, rectangular) list of numbers, "
                           f"at most 64 levels deep") from None
        return arr
    try:
        return np.asarray(float(text), dtype=np.float64)
    except ValueError:
        raise CLIError(f"{bad}: not a number (use e.g. 3, -1.5, 1e-3 or a list "
                       f"[1,2,3])") from None


# -- the graph ---------------------------------------------------------------------------
@dataclass
class Loaded:
    """A graph to run and the feeds (the `--at` values) for its inputs."""

    graph: Any  # adsvc.Graph
    feeds: dict[str, np.ndarray]


@dataclass(frozen=True)
class Limits:
    """What the CLI loads: graph file bytes, nodes + inputs of a file's graph, elements
    of any constant or node (defaults: the server's)."""

    max_file_bytes: int | None = graphfile.DEFAULT_MAX_FILE_BYTES
    max_nodes: int | None = graphfile.DEFAULT_MAX_NODES
    max_elements: int | None = graphfile.DEFAULT_MAX_ELEMENTS


_LIMIT_FLAGS = {"max_file_bytes": f"--max-file-bytes N or ${MAX_FILE_BYTES_ENV}",
                "max_nodes": "--max-nodes N", "max_elements": "--max-elements N"}


def load(spec: str, at: dict[str, np.ndarray], need_values: bool,
         limits: Limits = Limits()) -> Loaded:
    """The graph of EXPR-or-FILE `spec` and the feeds for its inputs."""
    from adsvc.expr import parse

    if graphfile.looks_like_file(spec):
        return _load_file(spec, at, need_values, limits)
    expr = parse(spec)
    feeds = _expression_feeds(at, expr.variables)
    _check_missing(expr.variables, feeds, need_values, "the expression")
    g = expr.graph({k: v.shape for k, v in feeds.items()})
    check_elements(g, limits.max_elements, "the expression")
    return Loaded(g, {k: v.astype(np.float64) for k, v in feeds.items()})


def _load_file(path: str, at, need_values: bool, limits: Limits) -> Loaded:
    try:
        g = graphfile.load(path, limits.max_file_bytes, limits.max_nodes,
                           limits.max_elements)
    except graphfile.GraphFileError as e:
        if e.field in _LIMIT_FLAGS:
            raise CLIError(f"{e.description} (raise the limit with "
                           f"{_LIMIT_FLAGS[e.field]})") from None
        raise
    check_elements(g, limits.max_elements, path)
    names = set(g.input_names)
    extra = [k for k in at if k not in names]
    if extra:
        raise CLIError(f"--at {clip(extra[0])}: {path} has no input {clip(extra[0])!r} "
                       f"(inputs: {_names(g.input_names) or 'none'})")
    # --at values are float64 text; the one feed rule converts them exactly
    feeds = {n.name: convert_feed(n.name, at[n.name].tolist(), n.dtype, n.shape)
             for n in g.inputs if n.name in at}
    _check_missing(g.input_names, at, need_values, path)
    return Loaded(g, feeds)


def _expression_feeds(at: dict[str, np.ndarray], variables: Sequence[str]):
    """The --at values by variable: a name is matched as Python reads identifiers
    (NFKC-normalized: '--at ｘ=1' is the value of the variable ｘ, which is x)."""
    known = set(variables)
    out: dict[str, np.ndarray] = {}
    for k, v in at.items():
        name = k if k in known else unicodedata.normalize("NFKC", k)
        if name not in known:
            raise CLIError(f"--at {clip(k)}: the expression has no variable {clip(k)!r} "
                           f"(variables: {_names(variables) or 'none'})")
        if name in out:
            raise CLIError(f"--at {clip(k)}: the variable {clip(name)!r} is given twice")
        out[name] = v
    return out


def check_elements(graph, max_elements: int | None, what: str) -> None:
    """CLIError if a node of `graph` (broadcasting can make one far larger than any
    --at value) has more than `max_elements` elements (None: no limit)."""
    if max_elements is None:
        return
    for n in graph.nodes:
        size = math.prod(n.shape)
        if size > max_elements:
            dims = ",".join(map(str, n.shape))
            raise CLIError(f"{what}: {clip(n.name or n.op)} has shape [{clip(dims)}], "
                           f"{size:,} elements; the limit is {max_elements:,} (raise it "
                           f"with --max-elements N)")


def _names(names: Sequence[str], limit: int = 10) -> str:
    """Up to `limit` names for a message, and how many more there are."""
    shown = ", ".join(clip(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit:,} more" if len(names) > limit else "")


def _check_missing(names, at, need_values: bool, what: str):
    missing = [n for n in names if n not in at]
    if need_values and missing:
        s = "s" if len(missing) > 1 else ""
        more = (f" (and {len(missing) - 10:,} more)" if len(missing) > 10 else "")
        raise CLIError(f"no value for {what}'s input{s} "
                       f"{', '.join(repr(clip(m)) for m in missing[:10])}{more}: pass "
                       + " ".join(f"--at {clip(m)}=VALUE" for m in missing[:10]))


def parse_wrt(text: str | None, names: Sequence[str]) -> list[str] | None:
    """The names of `--wrt X,Y`, each one of `names`; None without --wrt (all float
    inputs)."""
    if text is None:
        return None
    wrt = [w.strip() for w in text.split(",") if w.strip()]
    if not wrt:
        raise CLIError("--wrt needs at least one variable name, e.g. --wrt x,y")
    known = set(names)
    wrt = [w if w in known else unicodedata.normalize("NFKC", w) for w in wrt]
    for w in wrt:
        if w not in known:
            raise CLIError(f"--wrt {clip(w)}: unknown variable {clip(w)!r} "
                           f"(variables: {_names(names) or 'none'})")
    return wrt


# -- the connection ----------------------------------------------------------------------
_TLS_FLAGS = (("--tls", "tls"), ("--tls-ca", "tls_ca"), ("--tls-cert", "tls_cert"),
              ("--tls-key", "tls_key"), ("--tls-server-name", "tls_server_name"),
              ("--token-file", "token_file"))
_HOST_PORT = re.compile(r"^(\[[^\]]*\]|[^:\[\]/]*):([0-9]+)$")


def connect_options(args) -> dict[str, Any]:
    """The keyword arguments of `adsvc.connect` for --server: `tls` (from the --tls*
    flags) and `token` (from --token-file, else $ADSVC_TOKEN), each only when given;
    {} without --server. Misuse is a CLIError (usage)."""
    server = getattr(args, "server", None)
    given = [flag for flag, attr in _TLS_FLAGS if getattr(args, attr, None)]
    if server is None:
        if given:
            raise CLIError(f"{given[0]} needs --server HOST:PORT (it configures the "
                           f"connection to a server)")
        return {}
    check_target(server)
    opts: dict[str, Any] = {}
    tls = _tls_option(args)
    if tls is not None:
        opts["tls"] = tls
    token = _token_option(args)
    if token is not None:
        opts["token"] = token
    return opts


def check_target(target: str) -> None:
    """CLIError unless `target` can be a gRPC target; a HOST:PORT needs a port in
    1-65535 (gRPC would wrap 99999 around to another port)."""
    if not target.strip() or not target.isprintable() or any(c.isspace() for c in target):
        raise CLIError(f"--server {clip(target)!r}: expected HOST:PORT, e.g. "
                       f"--server 127.0.0.1:50051")
    m = _HOST_PORT.match(target)
    if m and not 1 <= int(m.group(2)) <= 65535:
        raise CLIError(f"--server {clip(target)}: port {clip(m.group(2))} is not in "
                       f"1-65535")


def _tls_option(args):
    """`tls=` for adsvc.connect: None (plaintext), True (system roots) or a TLS."""
    if bool(args.tls_cert) != bool(args.tls_key):
        have, need = ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key",
                                                                        "--tls-cert")
        raise CLIError(f"{have} needs {need} (a client certificate and its private key "
                       f"go together)")
    files = {"ca_file": ("--tls-ca", args.tls_ca), "cert_file": ("--tls-cert", args.tls_cert),
             "key_file": ("--tls-key", args.tls_key)}
    for flag, path in files.values():
        if path is not None:
            _check_readable(flag, path)
    name = args.tls_server_name
    if name is not None and (not name.strip() or not name.isprintable()
                             or any(c.isspace() for c in name)):
        raise CLIError(f"--tls-server-name {clip(name)!r}: expected a host name")
    if not (args.tls or name or any(path for _, path in files.values())):
        return None
    tls_class = _sdk_tls()
    if name is None and not any(path for _, path in files.values()):
        return True
    return tls_class(**{k: path for k, (_, path) in files.items()}, server_name=name)


def _sdk_tls():
    """adsvc_client.TLS, or a CLIError if this SDK has no TLS support."""
    try:
        import adsvc_client
    except ImportError as e:
        raise CLIError(f"--server needs the remote SDK client, which is not available "
                       f"({e})", RUN_ERROR) from None
    tls_class = getattr(adsvc_client, "TLS", None)
    if tls_class is None:
        raise CLIError("the installed SDK (adsvc_client) has no TLS support: --tls and "
                       "--tls-* cannot be used with it", RUN_ERROR)
    return tls_class


def _check_readable(flag: str, path: str) -> None:
    """CLIError unless `path` is a readable regular file or a pipe (e.g. <(...))."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:
        raise CLIError(f"{flag} {clip(path, MAX_PATH)}: {getattr(e, 'strerror', None) or e}"
                       ) from None
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise CLIError(f"{flag} {clip(path, MAX_PATH)}: not a regular file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} {clip(path, MAX_PATH)}: not readable (permission denied)")


def _token_option(args) -> str | None:
    """The bearer token: the first line of --token-file (stripped), else $ADSVC_TOKEN;
    None if neither is given. Never a command-line value."""
    if args.token_file is not None:
        where = f"--token-file {clip(args.token_file, MAX_PATH)}"
        token = read_token_file(args.token_file)
    else:
        where, token = f"${TOKEN_ENV}", os.environ.get(TOKEN_ENV)
        if not token:
            return None
    if not token:
        raise CLIError(f"{where}: the token is empty")
    if not all(" " <= c <= "~" for c in token):
        raise CLIError(f"{where}: the token must be printable ASCII (it is sent as "
                       f"gRPC metadata)")
    return token


def read_token_file(path: str) -> str:
    """The first line of the file `path`, stripped (the shared secret-file rule: at most
    MAX_SECRET_FILE_BYTES are read; a pipe, never a device)."""
    return read_secret_file(path, "--token-file", CLIError)


def make_client(args, options: dict[str, Any] | None = None):
    """The in-process client, or a remote one with --server (`options`: the keyword
    arguments of adsvc.connect, default `connect_options(args)`)."""
    import adsvc

    server = getattr(args, "server", None)
    if server is None:
        return adsvc.local()
    if options is None:
        options = connect_options(args)
    try:
        return adsvc.connect(server, **options)
    except ImportError as e:
        raise CLIError(f"--server needs the remote SDK client, which is not available "
                       f"({e})", RUN_ERROR) from None
    except (OSError, ValueError) as e:  # e.g. TLS files the SDK cannot use
        raise CLIError(f"--server {clip(server)}: cannot set up the connection: "
                       f"{clip(one_line(e), 300)}") from None


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


def _label(name: str) -> str:
    """A name as printed: as is, or quoted if it has spaces, ',' or non-printing
    characters (a graph file's names can be any text)."""
    plain = name.isprintable() and not any(c.isspace() or c in ",=" for c in name)
    return name if plain and name else repr(name)


def _jsonable(v):
    return np.asarray(v).tolist()


# -- commands ----------------------------------------------------------------------------
def cmd_grad(args) -> int:
    """`adsvc grad`: print the value and the gradient (with --show-ir also the gradient
    graph); returns the exit status."""
    options = connect_options(args)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=True, limits=limits(args))
    names = loaded.graph.input_names
    wrt = parse_wrt(args.wrt, names)
    client = make_client(args, options)
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
        print("gradient: " + (", ".join(f"{_label(k)} = {_fmt(g)}" for k, g in grads)
                              or "(none)"))
        if ir is not None:
            print()
            print(ir.rstrip("\n"))
    return 0


def cmd_eval(args) -> int:
    """`adsvc eval`: print every output (a single one as `value:`); returns the exit status."""
    options = connect_options(args)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=True, limits=limits(args))
    client = make_client(args, options)
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
            print(f"{_label(k)}: {_fmt(out[k])}")
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
    try:
        return normalize_modes(modes, order, max_order=MAX_ORDER,
                               labels=("--mode", "--order"), error=CLIError)
    except LimitExceededError as e:
        raise CLIError(f"{e.description} (the CLI's limit: derivative graphs grow "
                       f"exponentially with the order)") from None


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
    options = connect_options(args)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=False, limits=limits(args))
    if modes is None:
        if args.wrt is not None:
            raise CLIError("--wrt needs --mode forward|reverse")
        print(loaded.graph.text().rstrip("\n"))
        return 0
    wrt = parse_wrt(args.wrt, loaded.graph.input_names)
    seed = modes[0] == "reverse" and _single_scalar_float(loaded.graph)
    client = make_client(args, options)
    try:
        dg = client.differentiate(loaded.graph, modes, wrt, order=len(modes), seed=seed,
                                  timeout=args.timeout)
        print(_ir_text(dg).rstrip("\n"))
    finally:
        _close(client)
    return 0


def cmd_export(args) -> int:
    """`adsvc export`: write the graph to a .json or .pb file and print what was written."""
    fmt = graphfile.file_format(args.output)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=False, limits=limits(args))
    graphfile.save(loaded.graph, args.output)
    g = loaded.graph
    print(f"wrote {args.output} ({fmt}: {len(g.inputs)} input(s), {len(g.outputs)} "
          f"output(s), {len(g.nodes)} nodes)")
    return 0


def cmd_dot(args) -> int:
    """`adsvc dot`: draw the graph or, with --mode, its differentiated graph (with --at,
    every node shows its value) to -o FILE: .svg, .png, .pdf (by Graphviz) or .dot."""
    from adsvc.explain import picture
    from adsvc.ir import dot

    fmt = dot.check_format(args.output)  # before any work: the format and Graphviz
    modes = _modes(args.mode, args.order)
    at = parse_at(args.at)
    loaded = load(args.expr, at, need_values=bool(at), limits=limits(args))
    if modes is None and args.wrt is not None:
        raise CLIError("--wrt needs --mode forward|reverse")
    wrt = parse_wrt(args.wrt, loaded.graph.input_names) if modes else None
    drawn, text = picture(loaded.graph, modes, wrt, inputs=loaded.feeds, limit=args.limit,
                          nearest=args.nearest)
    dot.write_picture(text, args.output)
    n = len(drawn.nodes)
    how = (f"a summary of the {min(args.nearest, n):,} nodes nearest the outputs"
           if dot.is_summary(drawn, args.limit) else "every node")
    print(f"wrote {args.output} ({fmt}: {n:,} nodes, {how}"
          f"{', with values' if at else ''})")
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
        raise argparse.ArgumentTypeError(f"not a number: {clip(text)!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got "
                                         f"{clip(text)}")
    if v > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT} seconds, got "
                                         f"{clip(text)} (leave out --timeout for no "
                                         f"deadline)")
    return v


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # also for more than 4300 digits
        raise argparse.ArgumentTypeError(f"not an integer: {clip(text)!r}") from None


def _order(text: str) -> int:
    v = _integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {clip(v)}")
    if v > MAX_ORDER:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_ORDER}, got {clip(v)} "
                                         f"(derivative graphs grow exponentially with "
                                         f"the order)")
    return v


def _count(text: str) -> int:
    """A limit: an integer >= 1 (underscores allowed: 64_000_000)."""
    v = _integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {clip(v)}")
    return v


def limits(args) -> Limits:
    """The graph-file limits of the command line: --max-file-bytes (default
    $ADSVC_MAX_FILE_BYTES, else 64 MiB), --max-nodes, --max-elements."""
    size = getattr(args, "max_file_bytes", None)
    if size is None:
        env = os.environ.get(MAX_FILE_BYTES_ENV, "").strip()
        try:
            size = _count(env) if env else graphfile.DEFAULT_MAX_FILE_BYTES
        except argparse.ArgumentTypeError as e:
            raise CLIError(f"${MAX_FILE_BYTES_ENV}={clip(env)!r}: {e}") from None
    return Limits(size, getattr(args, "max_nodes", graphfile.DEFAULT_MAX_NODES),
                  getattr(args, "max_elements", graphfile.DEFAULT_MAX_ELEMENTS))


EXPR_HELP = ("an infix expression such as 'x*x + x*y + 2' or 'sin(x)*exp(y)', or a graph "
             "file (.pb binary Graph proto, .json protobuf-JSON)")
AT_HELP = ("a variable's value: NAME=NUMBER (float64 scalar) or NAME=[1,2,3] (float64 "
           "array of that shape); repeat for each variable")


def _common(p, values: str):
    p.add_argument("expr", metavar="EXPR", help=EXPR_HELP)
    p.add_argument("--at", action="append", metavar="NAME=VALUE",
                   help=AT_HELP if values == "required" else
                   AT_HELP + " (here only the shapes matter; default scalar)")
    g = p.add_argument_group("limits on what is loaded")
    g.add_argument("--max-file-bytes", type=_count, metavar="N",
                   help=f"refuse a graph file larger than N bytes (default "
                        f"${MAX_FILE_BYTES_ENV}, else 64 MiB)")
    g.add_argument("--max-nodes", type=_count, metavar="N",
                   default=graphfile.DEFAULT_MAX_NODES,
                   help="refuse a graph file with more than N nodes + inputs "
                        "(default 1,000,000)")
    g.add_argument("--max-elements", type=_count, metavar="N",
                   default=graphfile.DEFAULT_MAX_ELEMENTS,
                   help="refuse a constant or node with more than N elements "
                        "(default 16,000,000)")


def _remote(p):
    p.add_argument("--server", metavar="HOST:PORT",
                   help="use the adsvc server at HOST:PORT instead of this process")
    p.add_argument("--timeout", type=_positive, metavar="S",
                   help="deadline in seconds for each call")
    g = p.add_argument_group("connection to --server (the token comes from "
                             f"--token-file or ${TOKEN_ENV}, never from the command line)")
    g.add_argument("--tls", action="store_true",
                   help="use TLS, verifying the server with the system's root certificates")
    g.add_argument("--tls-ca", metavar="FILE",
                   help="use TLS, verifying the server with these CA certificates (PEM)")
    g.add_argument("--tls-cert", metavar="FILE",
                   help="client certificate (PEM) for mutual TLS; needs --tls-key")
    g.add_argument("--tls-key", metavar="FILE",
                   help="private key (PEM) of --tls-cert")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="the name the server's certificate must have (default: the host "
                        "of --server)")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"send the bearer token on the first line of FILE (default: "
                        f"${TOKEN_ENV} if set)")
    g.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)


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


def _add_dot(sub) -> None:
    from adsvc.ir.dot import DEFAULT_LIMIT, DEFAULT_NEAREST

    p = sub.add_parser("dot", help="draw a graph or its derivative (SVG, PNG, PDF, DOT)",
                       description="Draw the graph (inputs, constants, ops; an edge from "
                       "each operand to its user) or, with --mode, its differentiated graph, "
                       "primal, tangent, cotangent and output nodes styled apart, with a "
                       "legend. With --at every node shows its value; a derivative node of a "
                       "forward graph shows one value per input (one sweep each). Graphs "
                       "over --limit nodes are drawn as a summary. SVG, PNG and PDF need "
                       "Graphviz's dot program; a .dot file needs nothing.")
    _common(p, "required")
    p.add_argument("--mode", metavar="MODE", help="forward or reverse, or one mode per "
                   "order as a comma list (e.g. reverse,forward for a Hessian)")
    p.add_argument("--wrt", metavar="X,Y", help="differentiate only with respect to these")
    p.add_argument("--order", type=_order, metavar="N", help="derivative order (default 1)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the picture: .svg, .png, .pdf (drawn by Graphviz) or .dot (text)")
    p.add_argument("--limit", type=_count, default=DEFAULT_LIMIT, metavar="N",
                   help=f"draw every node of a graph of at most N nodes, else a summary "
                        f"(default {DEFAULT_LIMIT})")
    p.add_argument("--nearest", type=_count, default=DEFAULT_NEAREST, metavar="K",
                   help=f"a summary draws the K nodes nearest the outputs (default "
                        f"{DEFAULT_NEAREST})")
    p.set_defaults(func=cmd_dot)


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
    _add_dot(sub)
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
    if isinstance(e, MemoryError):
        return ("out of memory (lower the limits, e.g. --max-elements, or use smaller "
                "inputs)"), RUN_ERROR
    return f"internal error: {type(e).__name__}: {one_line(e)}", RUN_ERROR


def _tolerant_output() -> None:
    """Print what cannot be encoded (a name from a file, a path with undecodable bytes)
    escaped, instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")


def split_at(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`argv` without its `--at` items, the items) for the commands that take --at:
    argparse's time grows with the square of the number of options, and a graph can
    have thousands of inputs."""
    if not argv or argv[0] not in _AT_COMMANDS:
        return argv, []
    rest: list[str] = []
    items: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":  # the rest is positional, as for argparse
            rest.extend(argv[i:])
            break
        if a == "--at" and i + 1 < len(argv):
            items.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--at="):
            items.append(a[len("--at="):])
        else:
            rest.append(a)
        i += 1
    return rest, items


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The parsed command line: usage errors with a hint for an expression such as '-x'
    taken for an option; at most MAX_ARGS arguments besides the --at items."""
    rest, items = split_at(argv)
    if len(rest) > MAX_ARGS:
        raise CLIError(f"too many arguments ({len(rest):,}; at most {MAX_ARGS:,} "
                       f"besides the --at items)")
    try:
        args = parser.parse_args(_protect_expressions(rest))
    except CLIError as e:
        hint = _minus_hint(rest)
        if hint:
            raise CLIError(str(e).split(" (see '")[0] + hint) from None
        raise
    if items:
        args.at = items + (args.at or [])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (never raises, never prints a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerant_output()
    try:
        parser = build_parser(argv)
        args = parse_args(parser, argv)
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
        print(f"adsvc: error: {clip(msg, MAX_MESSAGE)}", file=sys.stderr)
        return code
