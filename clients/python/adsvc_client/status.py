"""Failed calls back into typed errors: the class from the status's ErrorInfo reason,
the field and description from its BadRequest detail (the server's `errors.to_status`
writes both); a status without them maps by its code."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from adsvc_protocol import errors as E


def _details(err: grpc.RpcError) -> dict:
    out = {"field": "", "description": "", "reason": "", "context": "", "cycle": ()}
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # inconsistent status details
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            if br.field_violations:
                out["field"] = br.field_violations[0].field
                out["description"] = br.field_violations[0].description
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["context"] = info.metadata.get("context", "")
            if info.metadata.get("cycle"):
                out["cycle"] = [int(c) for c in info.metadata["cycle"].split(",")]
    return out


def error_from_rpc(err: grpc.RpcError) -> E.AdsvcError:
    """The typed exception for a failed call (class from ErrorInfo.reason)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(err)
    d = _details(err)
    cls = E.ERROR_CLASSES.get(d["reason"]) or E.class_for_status(code.name)
    description = d["description"] or (f"{code.name}: {message}" if cls is E.AdsvcError
                                        else message)
    if cls is E.CycleError:
        return E.CycleError(description, d["field"], d["context"], cycle=d["cycle"])
    return cls(description, d["field"], d["context"])
