"""How a client turns its graphs into Graph protos and back, and keys them for caches.

The SDK works with whatever graph type its `GraphCodec` speaks: `PROTOS` (the default,
for the SDK installed alone) speaks `adsvc.v1.Graph` protos; `adsvc.connect` gives it
adsvc's codec, which also speaks traced `adsvc.Graph`s and keys them by their node
digests (no encoding on a cached call). The codec is chosen explicitly, never by what
happens to be installed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from adsvc_protocol.errors import InvalidRequestError
from adsvc_protocol.proto import ir_pb2


@dataclass(frozen=True)
class GraphCodec:
    """`encode(graph) -> Graph proto`, `decode(proto) -> graph`, `key(graph)` for caches
    (equal keys: the same graph)."""

    encode: Callable[[Any], ir_pb2.Graph]
    decode: Callable[[ir_pb2.Graph], Any]
    key: Callable[[Any], Hashable]


def proto_key(g: ir_pb2.Graph) -> bytes:
    """A content key of a Graph proto (its deterministic serialization, hashed)."""
    return hashlib.blake2b(g.SerializeToString(deterministic=True), digest_size=20).digest()


def require_proto(g) -> ir_pb2.Graph:
    """`g` if it is a Graph proto, else InvalidRequestError: the SDK alone encodes no
    other graph type."""
    if isinstance(g, ir_pb2.Graph):
        return g
    raise InvalidRequestError(
        f"expected an adsvc.v1.Graph proto, got {type(g).__name__} (for traced adsvc "
        "graphs use adsvc.connect, which knows how to encode them)", field="graph")


PROTOS = GraphCodec(encode=require_proto, decode=lambda p: p,
                    key=lambda g: proto_key(require_proto(g)))
