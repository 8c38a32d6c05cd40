"""TLS for the server: the PEM files of a `ServerConfig` checked and loaded.

`check(config)` validates the files with the standard library's `ssl` only (no gRPC
object is created, so a supervisor may call it before forking workers): the
certificate and key must both be given, readable, and match; a client CA must be a
readable PEM bundle and needs a certificate. `server_credentials(config)` builds the
`grpc.ssl_server_credentials` (client certificates required when a client CA is set),
or None when TLS is off. Problems raise `TLSConfigError` with a one-line message.
"""

from __future__ import annotations

import ssl

import grpc

from adsvc.server.config import ServerConfig


class TLSConfigError(RuntimeError):
    """The TLS files of a server configuration are missing, unreadable or invalid."""


def enabled(config: ServerConfig) -> bool:
    """Whether the configuration asks for TLS (a certificate, key or client CA set)."""
    return bool(config.tls_cert or config.tls_key or config.tls_client_ca)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read the TLS {what} {path!r}: "
                             f"{e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"the TLS {what} {path!r} is not a PEM file")
    return data


def check(config: ServerConfig) -> None:
    """Raise TLSConfigError unless the TLS settings are off or complete and valid."""
    if not enabled(config):
        return
    if not config.tls_cert or not config.tls_key:
        missing = "--tls-key" if config.tls_cert else "--tls-cert"
        given = ("--tls-cert" if config.tls_cert else
                 "--tls-key" if config.tls_key else "--tls-client-ca")
        raise TLSConfigError(f"{given} needs {missing} too (TLS needs a certificate "
                             "and its private key)")
    _read(config.tls_cert, "certificate")
    _read(config.tls_key, "private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"the TLS certificate {config.tls_cert!r} and key "
                             f"{config.tls_key!r} cannot be used together: "
                             f"{getattr(e, 'reason', None) or e}") from None
    if config.tls_client_ca:
        _read(config.tls_client_ca, "client CA")
        try:
            ctx.load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, ValueError) as e:
            raise TLSConfigError(f"the TLS client CA {config.tls_client_ca!r} is not a "
                                 f"valid certificate bundle: "
                                 f"{getattr(e, 'reason', None) or e}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The server credentials of `config` (checked first), or None when TLS is off."""
    check(config)
    if not enabled(config):
        return None
    cert = _read(config.tls_cert, "certificate")
    key = _read(config.tls_key, "private key")
    ca = _read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)
