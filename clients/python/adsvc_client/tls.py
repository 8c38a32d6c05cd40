"""TLS settings of the SDK: `TLS(ca_file, cert_file, key_file, server_name)`.

`RemoteClient(target, tls=...)` (and `adsvc.connect(target, tls=...)`) takes `True`
(TLS, server verified against the system's root certificates) or a `TLS`: `ca_file`
replaces the system roots with a PEM bundle, `cert_file` + `key_file` present a client
certificate (for servers run with `--tls-client-ca`), `server_name` is the name the
server's certificate must carry when it differs from the target's host (gRPC's
`ssl_target_name_override`, e.g. "localhost" for a target "127.0.0.1:50051").
Missing or unreadable files raise `UsageError` naming the file, before any connection.
(gRPC is imported only when credentials are built: `from adsvc_client import TLS` is
cheap, e.g. for a command line that may not need a server.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adsvc_protocol.errors import UsageError

if TYPE_CHECKING:
    import grpc


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:  # bounded: a certificate bundle is kilobytes
            data = f.read(1 << 22)
    except OSError as e:
        raise UsageError(f"cannot read the TLS {what} {path!r}: {e.strerror or e}",
                         field=what.replace(" ", "_")) from None
    if b"-----BEGIN" not in data:
        raise UsageError(f"the TLS {what} {path!r} is not a PEM file",
                         field=what.replace(" ", "_")) from None
    return data


@dataclass(frozen=True)
class TLS:
    """How the SDK connects over TLS; see the module docstring. All fields optional:
    `TLS()` is the same as `tls=True`."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (files read now). Raises UsageError for a client
        certificate without its key (or the reverse) and for unreadable files."""
        if (self.cert_file is None) != (self.key_file is None):
            raise UsageError("a TLS client certificate needs its private key: give both "
                             "cert_file and key_file, or neither", field="tls")
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file"),
            private_key=_read(self.key_file, "key file"),
            certificate_chain=_read(self.cert_file, "certificate file"))

    def options(self) -> list[tuple[str, str]]:
        """The channel options it needs (the server name override, if any)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name \
            else []


def channel_security(tls: bool | TLS | None,
                     credentials: grpc.ChannelCredentials | None):
    """(credentials or None for an insecure channel, extra channel options) of the
    `tls=` and `credentials=` arguments of RemoteClient (at most one of them)."""
    if tls and credentials is not None:
        raise UsageError("give tls= or credentials=, not both", field="tls")
    if credentials is not None:
        return credentials, []
    if tls is None or tls is False:
        return None, []
    settings = TLS() if tls is True else tls
    if not isinstance(settings, TLS):
        raise UsageError(f"tls= takes True or adsvc_client.TLS(...), not "
                         f"{type(tls).__name__}", field="tls")
    return settings.credentials(), settings.options()
