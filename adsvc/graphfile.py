"""Graph files: a Graph proto stored as binary (``.pb``) or protobuf-JSON (``.json``).

Loading decodes and validates through `adsvc.ir.codec.graph_from_proto`, so a bad file
is reported with the validator's typed errors; unreadable or unparsable files raise
`GraphFileError` with a one-line message naming the file.
"""

from __future__ import annotations

import os

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from adsvc.ir.codec import graph_from_proto, graph_to_proto
from adsvc.ir.graph import Graph
from adsvc_protocol.errors import UsageError
from adsvc_protocol.proto import ir_pb2

EXTENSIONS = (".pb", ".json")


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


def read_proto(path: str) -> ir_pb2.Graph:
    """The Graph proto stored in `path` (not yet validated)."""
    fmt = file_format(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GraphFileError(f"{path}: cannot read graph file: {e.strerror or e}") from None
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


def load(path: str) -> Graph:
    """Read, decode and validate the graph in `path`."""
    return graph_from_proto(read_proto(path))


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
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise GraphFileError(f"{path}: cannot write graph file: {e.strerror or e}") from None
