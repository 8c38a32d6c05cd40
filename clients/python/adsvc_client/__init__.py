"""adsvc SDK: talk to an adsvc server with the same interface as `adsvc.local()`.

Installable alone (`pip install ./clients/python`, with the protocol layer
`adsvc_protocol`); it then speaks `adsvc.v1.Graph` protos. `adsvc.connect` is the same
client speaking traced adsvc graphs too. `TLS(ca_file, cert_file, key_file,
server_name)` configures a TLS channel: `connect(target, tls=TLS(...))`.
"""

from adsvc_client.tls import TLS
from adsvc_protocol.errors import AdsvcError

__all__ = ["TLS", "AdsvcError", "connect"]


def connect(target: str, **kw):
    """A `RemoteClient` for the server at `target` ("host:port"); see its docstring."""
    from adsvc_client.remote import RemoteClient

    return RemoteClient(target, **kw)
