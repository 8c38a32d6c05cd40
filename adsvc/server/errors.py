"""Typed errors as gRPC statuses: the code (each error class's `grpc_code`) and the rich
error details.

A failed call carries a ``google.rpc.Status`` whose details are a ``BadRequest`` field
violation (`field` names the node or input, `description` says what is wrong) and an
``ErrorInfo`` (domain "adsvc", `reason` = the error class name, metadata with the
field and, when present, the nearby-nodes context and a cycle). The SDK rebuilds the
same exception class from `reason`.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from adsvc_protocol import errors as E

DOMAIN = "adsvc"

def status_code(err: E.AdsvcError) -> grpc.StatusCode:
    """The status code of an error: its class's `grpc_code` (the one table)."""
    return getattr(grpc.StatusCode, err.grpc_code, grpc.StatusCode.INTERNAL)


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


# What a status may echo of a request (names, values, nearby nodes): the status travels in
# the trailing metadata, which clients cap (gRPC's default: 8 KiB).
MAX_FIELD, MAX_DESCRIPTION, MAX_CONTEXT, MAX_CYCLE = 200, 1000, 2000, 64


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more)"


def to_status(err: E.AdsvcError, field_prefix: str = "") -> grpc.Status:
    """The grpc.Status (code, message, rich details) to abort a call with; what it
    echoes is clipped so it always fits the client's metadata limit."""
    code = status_code(err)
    field = clip(field_prefix + err.field if err.field else field_prefix.rstrip("."),
                 MAX_FIELD)
    description = clip(err.description, MAX_DESCRIPTION)
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=field, description=description)
    metadata = {"field": field}
    if err.context:
        metadata["context"] = clip(err.context, MAX_CONTEXT)
    cycle = getattr(err, "cycle", None)
    if cycle:
        metadata["cycle"] = ",".join(str(c) for c in cycle[:MAX_CYCLE])
    info = error_details_pb2.ErrorInfo(reason=type(err).__name__, domain=DOMAIN,
                                       metadata=metadata)
    message = f"{type(err).__name__}: {field + ': ' if field else ''}{description}"
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message,
        details=[_pack(error_details_pb2.BadRequest(field_violations=[violation])),
                 _pack(info)])
    return rpc_status.to_status(status)


def internal_status(request_id: str) -> grpc.Status:
    """A bug on our side: no stack trace to the caller, just the id to find it in the log."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (request id {request_id}); see the server log")
    return rpc_status.to_status(status)
