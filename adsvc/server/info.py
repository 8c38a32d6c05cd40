"""GetServerInfo: versions, the op table, limits and counters as a ServerInfo message."""

from __future__ import annotations

import os

from adsvc.ir.codec import IR_VERSION, OPSET_VERSION
from adsvc.ir.opdef import NONE, OPS, REQUIRED, RULE, ZERO
from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import ir_pb2, service_pb2
from adsvc_protocol.tensors import TO_ENUM

DERIVATIVES = {RULE: service_pb2.DERIVATIVE_RULE, ZERO: service_pb2.DERIVATIVE_ZERO,
               NONE: service_pb2.DERIVATIVE_NONE}
KINDS = {
    "int": service_pb2.ATTR_KIND_INT, "float": service_pb2.ATTR_KIND_FLOAT,
    "str": service_pb2.ATTR_KIND_STRING, "bool": service_pb2.ATTR_KIND_BOOL,
    "ints": service_pb2.ATTR_KIND_INTS, "dtype": service_pb2.ATTR_KIND_DTYPE,
    "graph": service_pb2.ATTR_KIND_GRAPH, "graphs": service_pb2.ATTR_KIND_GRAPHS,
}


def _default(kind: str, v) -> ir_pb2.AttrValue | None:
    if v is None or v is REQUIRED:
        return None
    return {
        "int": lambda: ir_pb2.AttrValue(i=int(v)),
        "float": lambda: ir_pb2.AttrValue(f=float(v)),
        "str": lambda: ir_pb2.AttrValue(s=str(v)),
        "bool": lambda: ir_pb2.AttrValue(b=bool(v)),
        "ints": lambda: ir_pb2.AttrValue(ints=ir_pb2.IntList(values=list(v))),
        "dtype": lambda: ir_pb2.AttrValue(dtype=TO_ENUM[v]),
    }[kind]()


def op_list() -> list[service_pb2.OpInfo]:
    """An OpInfo per op of the table, sorted by name: how clients discover the ops, their
    attributes and derivatives."""
    ops = []
    for name in sorted(OPS):
        op = OPS[name]
        info = service_pb2.OpInfo(name=name, arity=op.arity or 0, variadic=op.arity is None,
                                  differentiable=op.derivative == RULE,
                                  derivative=DERIVATIVES[op.derivative], doc=op.doc)
        for key in sorted(op.attrs):
            a = op.attrs[key]
            ai = info.attrs.add(name=key, kind=KINDS[a.kind], required=a.default is REQUIRED,
                                doc=a.doc)
            d = _default(a.kind, a.default)
            if d is not None:
                ai.default_value.CopyFrom(d)
        ops.append(info)
    return ops


def limits(config: ServerConfig) -> service_pb2.Limits:
    """The limits clients may need to know (0: none) and whether a token is required."""
    return service_pb2.Limits(
        max_message_bytes=config.max_message_bytes, max_nodes=config.max_nodes,
        max_compiled_nodes=config.max_compiled_nodes,
        max_tensor_elements=config.max_tensor_elements, max_order=config.max_order,
        max_stream_feeds=config.max_stream_feeds, cache_entries=config.cache_entries,
        auth_required=bool(config.token), max_eval_bytes=config.max_eval_bytes,
        max_cache_bytes=config.max_cache_bytes, max_name_bytes=config.max_name_bytes,
        max_concurrent_rpcs=config.max_concurrent_rpcs)


def server_info(config: ServerConfig, stats: service_pb2.ServerStats) -> service_pb2.ServerInfo:
    """The GetServerInfo answer: versions, op table, limits, `stats` and this process's
    pid."""
    from adsvc.version import __version__

    return service_pb2.ServerInfo(
        server_version=__version__, ir_version=IR_VERSION, opset_version=OPSET_VERSION,
        ops=op_list(), limits=limits(config), stats=stats, pid=os.getpid())
