"""Graph files: a Graph proto stored as binary (``.pb``) or protobuf-JSON (``.json``).

Loading decodes and validates through `adsvc.ir.codec.graph_from_proto`, so a bad file
is reported with the validator's typed errors; unreadable or unparsable files raise
`GraphFileError` with a one-line message naming the file.

Reading is bounded: only a regular file (or a symlink to one) is opened — a directory,
FIFO, device or socket is refused before it is opened — and a file larger than
`max_bytes` (default `DEFAULT_MAX_FILE_BYTES`, 64 MiB) is refused from its size, and
never read past `max_bytes` + 1 bytes. Decoding applies the server's default limits:
`max_nodes` nodes + inputs (1,000,000) and `max_elements` elements per constant
(16,000,000). A limit that is crossed raises GraphFileError with `field` naming it
("max_file_bytes", "max_nodes" or "max_elements").
"""

from __future__ import annotations

import os
import stat

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from adsvc.ir.codec import graph_from_proto, graph_to_proto
from adsvc.ir.graph import Graph
from adsvc_protocol.errors import LimitExceededError, UsageError
from adsvc_protocol.proto import ir_pb2

EXTENSIONS = (".pb", ".json")
DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # as the server's default max message size
DEFAULT_MAX_NODES = 1_000_000  # nodes + inputs, as the server's max_nodes
DEFAULT_MAX_ELEMENTS = 16_000_000  # per tensor, as the server's max_tensor_elements
_CHUNK = 2**20  # bytes per read: memory grows with the data, not with the limit
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class GraphFileError(UsageError, ValueError):
    """A graph file could not be read, parsed or written."""


def file_format(path: str) -> str:
    """"pb" or "json" from the file name; GraphFileError for anything else."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise GraphFileError(f"{path}: unknown graph file extension {ext or '(none)'!r} "
                             f"(use .pb for binary or .json for protobuf-JSON)")
    return ext[1:]


def looks_like_file(arg: str) -> bool:
    """True if `arg` names a graph file rather than an expression."""
    return arg.lower().endswith(EXTENSIONS) or os.path.isfile(arg)


def _require_regular(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "of an unknown kind")
    raise GraphFileError(f"{path}: is {kind}, not a regular file (a graph file must be a "
                         f"regular .pb or .json file)")


def _too_large(path: str, size: str, max_bytes: int) -> GraphFileError:
    return GraphFileError(f"{path}: the graph file is {size} bytes; the limit is "
                          f"{max_bytes:,} bytes", field="max_file_bytes")


def read_bytes(path: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The contents of the regular file `path` (symlinks followed), at most `max_bytes`
    (None: no limit); GraphFileError for anything else, before reading more than
    `max_bytes` + 1 bytes."""
    try:
        st = os.stat(path)  # not opened yet: opening a FIFO blocks, a device may act
        _require_regular(path, st.st_mode)
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(path, f"{st.st_size:,}", max_bytes)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(path, flags), "rb", buffering=0) as f:
            _require_regular(path, os.fstat(f.fileno()).st_mode)  # replaced since stat?
            chunks, total = [], 0
            while max_bytes is None or total <= max_bytes:
                want = _CHUNK if max_bytes is None else min(_CHUNK, max_bytes + 1 - total)
                chunk = f.read(want)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
    except GraphFileError:
        raise
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise GraphFileError(f"{path}: cannot read graph file: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    if max_bytes is not None and total > max_bytes:
        raise _too_large(path, f"more than {max_bytes:,}", max_bytes)  # it grew
    return b"".join(chunks)


def read_proto(path: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> ir_pb2.Graph:
    """The Graph proto stored in `path` (not yet validated), read by `read_bytes`."""
    fmt = file_format(path)
    data = read_bytes(path, max_bytes)
    msg = ir_pb2.Graph()
    if fmt == "pb":
        try:
            msg.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise GraphFileError(f"{path}: not a binary Graph proto: {e}") from None
        return msg
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GraphFileError(f"{path}: not UTF-8 text (a .json graph file must be "
                             f"protobuf-JSON)") from None
    try:
        json_format.Parse(text, msg)
    except (json_format.ParseError, RecursionError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GraphFileError(f"{path}: not a protobuf-JSON Graph: {first}") from None
    return msg


def load(path: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
         max_nodes: int | None = DEFAULT_MAX_NODES,
         max_elements: int | None = DEFAULT_MAX_ELEMENTS) -> Graph:
    """Read, decode and validate the graph in `path`, within the limits (None: none):
    file size in bytes, nodes + inputs, elements of each constant."""
    msg = read_proto(path, max_bytes)
    try:
        return graph_from_proto(msg, max_nodes=max_nodes, max_elements=max_elements)
    except LimitExceededError as e:
        field = ("max_nodes" if e.field == "nodes" else
                 "max_elements" if e.field.endswith(".value") else "")
        raise GraphFileError(f"{path}: {e.field + ': ' if e.field else ''}"
                             f"{e.description}", field=field) from None


def dumps(graph: Graph, fmt: str) -> bytes:
    """The file contents of `graph` in format "pb" or "json"."""
    msg = graph_to_proto(graph)
    if fmt == "pb":
        return msg.SerializeToString()
    if fmt == "json":
        return (json_format.MessageToJson(msg, indent=2) + "\n").encode("utf-8")
    raise GraphFileError(f"unknown graph file format {fmt!r}")


def save(graph: Graph, path: str) -> None:
    """Write `graph` to `path`, in the format its extension names."""
    data = dumps(graph, file_format(path))
    try:
        if os.path.exists(path):  # writing to a FIFO blocks, to a device may do anything
            _require_regular(path, os.stat(path).st_mode)
        with open(path, "wb") as f:
            f.write(data)
    except GraphFileError:
        raise
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise GraphFileError(f"{path}: cannot write graph file: "
                             f"{getattr(e, 'strerror', None) or e}") from None
