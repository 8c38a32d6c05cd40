"""TLS and mTLS end to end, with certificates generated on the fly (`cryptography`): a
CA, a server certificate for "localhost" and 127.0.0.1, a client certificate, and a
second CA nobody trusts. Servers run on 127.0.0.1:0, in-process or as `python -m
adsvc.server`; the SDK connects with `tls=TLS(...)`. Also the startup errors of
`adsvc serve` (TLS files, token file, port): one line, no traceback."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from service_fixtures import ROOT, ServerProcess, running_server, seed_graph

import adsvc
from adsvc.server import app
from adsvc.server.config import ServerConfig
from adsvc_client import TLS
from adsvc_protocol import errors as E

SEED = (23.0, {"x": 10.0, "y": 3.0})


def _write_key(key, path: Path) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


def _write_cert(cert, path: Path) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _certificate(subject: str, key, issuer=None, issuer_key=None, *, ca=False, usage=None,
                 names=()):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                        critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def make_pki(directory: Path) -> dict[str, str]:
    """PEM files in `directory`: ca, server_cert/server_key ("localhost", 127.0.0.1),
    client_cert/client_key (signed by ca), other_ca, other_cert/other_key (signed by
    other_ca). Returns {name: path}."""
    out = {}
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("adsvc test CA", ca_key, ca=True)
    other = _certificate("untrusted CA", other_key, ca=True)
    out["ca"] = _write_cert(ca, directory / "ca.pem")
    out["other_ca"] = _write_cert(other, directory / "other_ca.pem")
    server_names = (x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for role, issuer, issuer_key, usage, names in (
            ("server", ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, server_names),
            ("client", ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, ()),
            ("other", other, other_key, ExtendedKeyUsageOID.CLIENT_AUTH, ())):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"adsvc test {role}", key, issuer, issuer_key, usage=usage,
                            names=names)
        out[f"{role}_cert"] = _write_cert(cert, directory / f"{role}.pem")
        out[f"{role}_key"] = _write_key(key, directory / f"{role}.key")
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki, **kw) -> ServerConfig:
    return ServerConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"], **kw)


def test_seed_gradient_over_tls(pki):
    with running_server(tls_config(pki)) as (_, target):
        assert target.startswith("127.0.0.1:")
        # the certificate names "localhost": the override makes the name check pass ...
        with adsvc.connect(target, tls=TLS(ca_file=pki["ca"], server_name="localhost"),
                           timeout=30) as c:
            assert c.value_and_grad(seed_graph(), x=3.0, y=4.0) == SEED
            assert c.value_and_grad(seed_graph(), mode="forward", x=3.0, y=4.0) == SEED
        # ... and its IP address entry matches the target without one
        with adsvc.connect(target, tls=TLS(ca_file=pki["ca"]), timeout=30) as c:
            assert c.evaluate(seed_graph(), x=3.0, y=4.0) == {"z": 23.0}


def _refused(target, *, retry_seconds=0.0, timeout=5.0, **kw) -> tuple[E.AdsvcError, float]:
    start = time.monotonic()
    with adsvc.connect(target, timeout=timeout, retry_seconds=retry_seconds, **kw) as c, \
            pytest.raises(E.AdsvcError) as e:
        c.evaluate(seed_graph(), x=3.0, y=4.0)
    return e.value, time.monotonic() - start


def test_plaintext_or_untrusting_clients_get_unavailable_quickly(pki):
    with running_server(tls_config(pki)) as (_, target):
        err, took = _refused(target)  # no TLS at all, no retries
        assert type(err) is E.UnavailableError and took < 3.0, (err, took)
        # with the default retries the call still ends by its own timeout
        err, took = _refused(target, retry_seconds=15.0, timeout=1.5)
        assert type(err) in (E.UnavailableError, E.DeadlineExceededError), err
        assert took < 4.0, took
        # TLS, but the server's certificate is signed by a CA the client does not trust
        err, took = _refused(target, tls=TLS(ca_file=pki["other_ca"]))
        assert type(err) is E.UnavailableError and took < 3.0, (err, took)


def test_mtls_requires_a_client_certificate_from_the_ca(pki):
    config = tls_config(pki, tls_client_ca=pki["ca"])
    with running_server(config) as (_, target):
        err, _ = _refused(target, tls=TLS(ca_file=pki["ca"]))  # no client certificate
        assert type(err) is E.UnavailableError, err
        err, _ = _refused(target, tls=TLS(ca_file=pki["ca"], cert_file=pki["other_cert"],
                                          key_file=pki["other_key"]))  # from another CA
        assert type(err) is E.UnavailableError, err
        client = TLS(ca_file=pki["ca"], cert_file=pki["client_cert"],
                     key_file=pki["client_key"], server_name="localhost")
        with adsvc.connect(target, tls=client, timeout=30) as c:
            assert c.value_and_grad(seed_graph(), x=3.0, y=4.0) == SEED


def test_token_over_tls(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\nsecond line ignored\n")
    tls = TLS(ca_file=pki["ca"])
    with running_server(tls_config(pki, token="s3cret-token")) as (_, target):
        err, _ = _refused(target, tls=tls)
        assert type(err) is E.UnauthenticatedError, err
        err, _ = _refused(target, tls=tls, token="wrong")
        assert type(err) is E.UnauthenticatedError, err
        for kw in ({"token": "s3cret-token"}, {"token_file": str(token_file)}):
            with adsvc.connect(target, tls=tls, timeout=30, **kw) as c:
                assert c.value_and_grad(seed_graph(), x=3.0, y=4.0) == SEED


def test_sdk_tls_arguments_are_checked(pki, tmp_path):
    for kw in ({"tls": TLS(cert_file=pki["client_cert"])},  # a certificate without its key
               {"tls": TLS(ca_file=str(tmp_path / "missing.pem"))},
               {"tls": TLS(ca_file=pki["ca"]), "credentials": object()},
               {"token": "a", "token_file": pki["ca"]},
               {"token_file": str(tmp_path / "missing-token")},
               {"tls": "yes"}):
        with pytest.raises(E.UsageError):
            adsvc.connect("127.0.0.1:1", **kw)


def test_serve_with_tls_flags_and_token_file(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  from-a-file  \n")
    srv = ServerProcess("--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"],
                        "--token-file", str(token_file))
    try:
        tls = TLS(ca_file=pki["ca"], server_name="localhost")
        with adsvc.connect(srv.target, tls=tls, token_file=str(token_file), timeout=30) as c:
            assert c.value_and_grad(seed_graph(), x=3.0, y=4.0) == SEED
        err, _ = _refused(srv.target, tls=tls)
        assert type(err) is E.UnauthenticatedError, err
        srv.terminate()
        assert srv.wait(timeout=60) == 0
    finally:
        srv.kill()
    assert "Traceback" not in "".join(srv.stderr_lines)


@pytest.fixture
def no_serving(monkeypatch):
    """`adsvc serve` runs its checks but never serves (a passing check would block)."""
    def refuse(*_a, **_k):
        pytest.fail("the server would have started")
    monkeypatch.setattr(app, "_serve_one", refuse)
    monkeypatch.delenv("ADSVC_TOKEN", raising=False)


def _startup_cases(pki, tmp: Path):
    empty, token = tmp / "empty", tmp / "token"
    empty.write_text("\n")
    token.write_text("t\n")
    cert, key, missing = pki["server_cert"], pki["server_key"], str(tmp / "missing.pem")
    return [  # (flags, exit status, words of the message)
        (["--tls-cert", cert], 1, "--tls-key"),
        (["--tls-key", key], 1, "--tls-cert"),
        (["--tls-client-ca", pki["ca"]], 1, "--tls-cert"),
        (["--tls-cert", missing, "--tls-key", key], 1, "missing.pem"),
        (["--tls-cert", cert, "--tls-key", pki["client_key"]], 1, "cannot be used together"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki["server_key"]], 1,
         "client CA"),
        (["--token", "a", "--token-file", str(token)], 2, "not both"),
        (["--token-file", str(empty)], 1, "empty"),
        (["--token-file", missing], 1, "missing.pem"),
        (["--port", "99999"], 2, "0..65535"),
        (["--port", "-1"], 2, "0..65535"),
        (["--port", "http"], 2, "--port"),
        (["--workers", "0"], 2, "--workers"),
    ]


def test_serve_startup_errors_are_one_line(pki, tmp_path, capsys, no_serving):
    from adsvc import cli

    for flags, status, words in _startup_cases(pki, tmp_path):
        for run in (lambda f: app.main(["--port", "0", *f]),
                    lambda f: cli.main(["serve", "--port", "0", *f])):
            code = run(flags)
            err = capsys.readouterr().err
            assert code == status, (flags, code, err)
            lines = [line for line in err.splitlines() if not line[:4].isdigit()]  # log lines
            assert len(lines) == 1 and lines[0].startswith("adsvc: error: "), (flags, err)
            assert words in lines[0], (flags, err)


def test_serve_startup_error_from_a_real_process(pki):
    for cmd, status in ((["adsvc.server", "--port", "99999"], 2),
                        (["adsvc", "serve", "--tls-cert", pki["server_cert"]], 1)):
        p = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
        assert p.returncode == status, (cmd, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("adsvc: error: "), p.stderr
