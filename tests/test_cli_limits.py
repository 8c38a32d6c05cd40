"""The CLI against hostile input: output names that never collide with variables, graph
files bounded in size and nodes (devices, FIFOs and /dev/zero refused at once), the
--server connection flags (TLS, token from a file or the environment), and arguments
built to provoke an "internal error" or a traceback. Everything is bounded in time:
what could hang or eat memory runs in a subprocess with a timeout."""

from __future__ import annotations

import dataclasses
import json
import keyword
import os
import subprocess
import sys
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adsvc
import adsvc_client
from adsvc import graphfile
from adsvc.cli import MAX_MESSAGE, MAX_ORDER, main
from adsvc.expr import CONSTANTS, FUNCTIONS, OUTPUT_NAMES, parse

SUBPROCESS_TIMEOUT = 60  # seconds: generous for a slow machine, short of "hangs"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys, *argv) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert err == ""
    return out


def fails(capsys, *argv, code=2) -> str:
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (code, ""), err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adsvc: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def python_m(*argv, env=None, timeout=SUBPROCESS_TIMEOUT):
    full = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    full.pop("ADSVC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "adsvc", *argv], capture_output=True,
                          text=True, timeout=timeout, env=full)


# -- 1. the output name never collides with a variable -----------------------------------
def test_the_issue_command_no_longer_fails(capsys):
    argv = ["eval", "z+out+value+result+f", "--at", "z=1", "--at", "out=2",
            "--at", "value=3", "--at", "result=4", "--at", "f=5"]
    assert ok(capsys, *argv) == "value: 15\n"
    doc = json.loads(ok(capsys, *argv, "--json"))
    assert doc == {"value": 15, "outputs": {"z_1": 15}}
    out = ok(capsys, "grad", "z*out*value*result*f*z_1", *argv[2:], "--at", "z_1=1")
    assert out == "value: 120\ngradient: z = 120, out = 60, value = 40, result = 30, " \
                  "f = 24, z_1 = 120\n"
    assert "return z_2 = " in ok(capsys, "show", "z+out+value+result+f+z_1")


_IDENT_START = st.characters(categories=("Lu", "Ll", "Lo"), max_codepoint=0x2FFF)
_IDENT_REST = st.characters(categories=("Lu", "Ll", "Lo", "Nd"), max_codepoint=0x2FFF,
                            include_characters="_")
_RANDOM_NAME = st.builds(lambda a, b: a + b, _IDENT_START, st.text(_IDENT_REST, max_size=6))
NAME = st.one_of(st.sampled_from([*OUTPUT_NAMES, "z_1", "z_2", "z_3", "x", "out_1"]),
                 _RANDOM_NAME)


def _usable(name: str) -> bool:
    n = unicodedata.normalize("NFKC", name)  # what Python makes of the identifier
    return (n.isidentifier() and not keyword.iskeyword(n) and not n.startswith("_")
            and n not in FUNCTIONS and n not in CONSTANTS)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(NAME.filter(_usable), min_size=1, max_size=8,
                unique_by=lambda n: unicodedata.normalize("NFKC", n)))
def test_no_internal_error_for_any_set_of_variable_names(names):
    """Any set of variable names, the output names among them: eval and grad work, and
    the output is never one of the variables."""
    import contextlib
    import io

    at = [a for i, n in enumerate(names) for a in ("--at", f"{n}={i + 1}")]
    expr = "+".join(names)
    for argv in (["eval", expr, *at, "--json"], ["grad", expr, *at, "--json"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        assert (rc, err.getvalue()) == (0, ""), argv
        assert json.loads(out.getvalue())["value"] == sum(range(1, len(names) + 1))
    g = parse(expr).graph()
    assert not set(g.output_names) & set(g.input_names)


# -- 2. graph files: size, kind and node limits -------------------------------------------
@pytest.fixture
def seed_file(tmp_path, capsys):
    path = str(tmp_path / "seed.json")
    ok(capsys, "export", "x*x + x*y + 2", "-o", path)
    return path


def test_a_file_over_the_size_limit_is_refused_from_its_size(capsys, seed_file,
                                                             monkeypatch):
    size = os.path.getsize(seed_file)
    at = ["--at", "x=3", "--at", "y=4"]
    assert ok(capsys, "eval", seed_file, *at, "--max-file-bytes", str(size)) == "value: 23\n"
    line = fails(capsys, "eval", seed_file, *at, "--max-file-bytes", str(size - 1))
    assert f"the graph file is {size:,} bytes; the limit is {size - 1:,} bytes" in line
    assert "--max-file-bytes" in line and "ADSVC_MAX_FILE_BYTES" in line
    monkeypatch.setenv("ADSVC_MAX_FILE_BYTES", str(size - 1))
    assert "the limit is" in fails(capsys, "eval", seed_file, *at)
    assert ok(capsys, "eval", seed_file, *at, "--max-file-bytes", str(size)) == "value: 23\n"
    monkeypatch.setenv("ADSVC_MAX_FILE_BYTES", "lots")
    assert "$ADSVC_MAX_FILE_BYTES='lots': not an integer" in fails(capsys, "show", seed_file)
    for bad in ("0", "-5", "1.5", "9" * 5000):
        assert "--max-file-bytes" in fails(capsys, "show", seed_file, "--max-file-bytes", bad)


def test_reading_stops_after_the_limit_even_when_the_size_lies():
    """/proc files say they are empty: the read itself is bounded (limit + 1 bytes)."""
    path = "/proc/self/status"
    if not os.path.exists(path) or os.path.getsize(path) != 0:
        pytest.skip("needs a Linux /proc file that reports size 0")
    with pytest.raises(graphfile.GraphFileError, match="more than 10 bytes"):
        graphfile.read_bytes(path, max_bytes=10)
    assert len(graphfile.read_bytes(path, max_bytes=1 << 20)) > 10


def test_directories_fifos_and_devices_are_refused(capsys, tmp_path):
    directory = tmp_path / "dir.json"
    directory.mkdir()
    assert "is a directory, not a regular file" in fails(capsys, "show", str(directory))
    assert "is a directory" in fails(capsys, "export", "x", "-o", str(directory))
    fifo = str(tmp_path / "pipe.pb")
    os.mkfifo(fifo)  # no writer: opening it would block forever
    assert "is a FIFO (named pipe), not a regular file" in fails(capsys, "show", fifo)
    assert "is a FIFO" in fails(capsys, "export", "x", "-o", fifo)
    dev = tmp_path / "null.json"
    dev.symlink_to("/dev/null")
    assert "is a character device" in fails(capsys, "eval", str(dev))


@pytest.mark.parametrize("command", ["eval", "grad", "show", "export"])
def test_a_symlink_to_dev_zero_is_refused_at_once(tmp_path, command):
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    argv = [command, str(link), *(["-o", str(tmp_path / "o.pb")] if command == "export"
                                  else [])]
    start = time.monotonic()
    p = python_m(*argv, timeout=SUBPROCESS_TIMEOUT)  # TimeoutExpired fails the test
    assert time.monotonic() - start < SUBPROCESS_TIMEOUT
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert p.stderr == f"adsvc: error: {link}: is a character device, not a regular " \
                       f"file (a graph file must be a regular .pb or .json file)\n"


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "graph.json"
    os.mkfifo(fifo)
    p = python_m("eval", str(fifo))
    assert p.returncode == 2 and "is a FIFO" in p.stderr and p.stderr.count("\n") == 1
    p = python_m("export", "x", "-o", str(fifo))
    assert p.returncode == 2 and "is a FIFO" in p.stderr


def test_node_and_element_limits_of_a_file(capsys, seed_file, tmp_path):
    n = len(graphfile.load(seed_file).nodes)  # inputs included
    assert "value: 23" in ok(capsys, "eval", seed_file, "--at", "x=3", "--at", "y=4",
                             "--max-nodes", str(n))
    line = fails(capsys, "show", seed_file, "--max-nodes", str(n - 1))
    assert f"graph has {n} nodes; the limit is {n - 1}" in line and "--max-nodes" in line
    g = adsvc.trace(lambda x: x + adsvc.constant([1.0] * 10), x=adsvc.f64(10))
    path = str(tmp_path / "const.pb")
    graphfile.save(g, path)
    assert ok(capsys, "show", path, "--max-elements", "10").startswith("graph ")
    line = fails(capsys, "show", path, "--max-elements", "9")
    assert "tensor has 10 elements; the limit is 9" in line and "--max-elements" in line


def test_the_default_limits_are_the_servers():
    assert graphfile.DEFAULT_MAX_FILE_BYTES == 64 * 2**20
    assert graphfile.DEFAULT_MAX_NODES == 1_000_000
    assert graphfile.DEFAULT_MAX_ELEMENTS == 16_000_000


def test_broadcasting_cannot_make_a_node_larger_than_the_element_limit(capsys):
    # 2000 x 2000 from two 2000-element vectors: fine; --max-elements below refuses it
    col = "[" + ",".join(["[1]"] * 2000) + "]"
    row = "[[" + ",".join(["1"] * 2000) + "]]"
    assert ok(capsys, "eval", "sum(x*y)", "--at", f"x={col}", "--at", f"y={row}") == \
        "value: 4000000\n"
    line = fails(capsys, "eval", "sum(x*y)", "--at", f"x={col}", "--at", f"y={row}",
                 "--max-elements", "1000000")
    assert "mul has shape [2000,2000], 4,000,000 elements; the limit is 1,000,000" in line


# -- 3. --server: TLS and token flags -------------------------------------------------------
class FakeRemote:
    """What adsvc.connect returns in these tests: records the call, computes locally."""

    calls: list = []

    def __init__(self, target, **kw):
        FakeRemote.calls.append((target, kw))
        self._local = adsvc.local()

    def __getattr__(self, name):
        return getattr(self._local, name)


@dataclasses.dataclass(frozen=True)
class _StandInTLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@pytest.fixture
def fake_connect(monkeypatch):
    """adsvc.connect replaced; adsvc_client.TLS as it is, or a stand-in with its API."""
    FakeRemote.calls = []
    monkeypatch.setattr(adsvc, "connect", FakeRemote)
    monkeypatch.delenv("ADSVC_TOKEN", raising=False)
    if not hasattr(adsvc_client, "TLS"):
        monkeypatch.setattr(adsvc_client, "TLS", _StandInTLS, raising=False)
    return FakeRemote.calls


def _pem(tmp_path, name):
    path = tmp_path / name
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return str(path)


def _tls_fields(tls):
    return {f: getattr(tls, f) for f in ("ca_file", "cert_file", "key_file", "server_name")}


SEED = ["x*x + x*y + 2", "--at", "x=3", "--at", "y=4"]


def test_plain_server_passes_no_tls_and_no_token(capsys, fake_connect):
    assert ok(capsys, "grad", *SEED, "--server", "h:1") == "value: 23\ngradient: x = 10, y = 3\n"
    assert fake_connect == [("h:1", {})]


def test_tls_flags_become_the_sdk_tls_argument(capsys, fake_connect, tmp_path):
    ca, cert, key = (_pem(tmp_path, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    ok(capsys, "eval", *SEED, "--server", "h:1", "--tls")
    assert fake_connect[-1] == ("h:1", {"tls": True})
    ok(capsys, "eval", *SEED, "--server", "h:1", "--tls-ca", ca)
    assert _tls_fields(fake_connect[-1][1]["tls"]) == {
        "ca_file": ca, "cert_file": None, "key_file": None, "server_name": None}
    assert isinstance(fake_connect[-1][1]["tls"], adsvc_client.TLS)
    ok(capsys, "grad", *SEED, "--server", "10.0.0.1:5", "--tls", "--tls-ca", ca,
       "--tls-cert", cert, "--tls-key", key, "--tls-server-name", "adsvc.internal")
    assert _tls_fields(fake_connect[-1][1]["tls"]) == {
        "ca_file": ca, "cert_file": cert, "key_file": key, "server_name": "adsvc.internal"}
    ok(capsys, "show", "x*y", "--mode", "reverse", "--server", "h:1",
       "--tls-server-name", "localhost")
    assert _tls_fields(fake_connect[-1][1]["tls"])["server_name"] == "localhost"


def test_token_from_a_file_or_the_environment(capsys, fake_connect, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-token \nsecond line ignored\n")
    ok(capsys, "grad", *SEED, "--server", "h:1", "--token-file", str(token_file))
    assert fake_connect[-1] == ("h:1", {"token": "s3cret-token"})
    monkeypatch.setenv("ADSVC_TOKEN", "from-env")
    ok(capsys, "eval", *SEED, "--server", "h:1", "--tls")
    assert fake_connect[-1] == ("h:1", {"tls": True, "token": "from-env"})
    ok(capsys, "eval", *SEED, "--server", "h:1", "--token-file", str(token_file))
    assert fake_connect[-1][1]["token"] == "s3cret-token"  # the file wins
    ok(capsys, "eval", *SEED)  # no --server: the environment's token is not used
    assert len(fake_connect) == 3


def test_a_token_is_never_a_command_line_value(capsys, fake_connect):
    for command in (["grad", *SEED], ["eval", *SEED], ["show", "x"]):
        for flag in (["--token", "s3cret"], ["--token=s3cret"]):
            line = fails(capsys, *command, "--server", "h:1", *flag)
            assert "s3cret" not in line  # never echoed
            assert "not accepted on the command line" in line and "$ADSVC_TOKEN" in line
        # no abbreviations: "--token" is not taken for "--token-file"
        assert "unrecognized arguments" in fails(capsys, *command, "--server", "h:1",
                                                 "--token-f", "x")
    assert fake_connect == []


def test_connection_flag_misuse_is_a_one_line_usage_error(capsys, fake_connect, tmp_path,
                                                          monkeypatch):
    pem = _pem(tmp_path, "c.pem")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe token\n")
    cases = [
        (["--tls"], "--tls needs --server"),
        (["--tls-ca", pem], "--tls-ca needs --server"),
        (["--token-file", pem], "--token-file needs --server"),
        (["--server", "h:1", "--tls-cert", pem], "--tls-cert needs --tls-key"),
        (["--server", "h:1", "--tls-key", pem], "--tls-key needs --tls-cert"),
        (["--server", "h:1", "--tls-ca", str(tmp_path / "missing.pem")],
         "--tls-ca " + str(tmp_path / "missing.pem") + ": No such file or directory"),
        (["--server", "h:1", "--tls-ca", "/dev/zero"], "not a regular file"),
        (["--server", "h:1", "--tls-server-name", "a b"], "expected a host name"),
        (["--server", "h:1", "--token-file", str(tmp_path / "none")],
         "No such file or directory"),
        (["--server", "h:1", "--token-file", str(tmp_path)], "not a regular file"),
        (["--server", "h:1", "--token-file", "/dev/zero"], "not a regular file"),
        (["--server", "h:1", "--token-file", str(empty)], "the token is empty"),
        (["--server", "h:1", "--token-file", str(binary)], "printable ASCII"),
        (["--server", ""], "expected HOST:PORT"),
        (["--server", "h 1:5"], "expected HOST:PORT"),
        (["--server", "h:99999"], "port 99999 is not in 1-65535"),
        (["--server", "[::1]:0"], "port 0 is not in 1-65535"),
    ]
    for extra, message in cases:
        assert message in fails(capsys, "grad", *SEED, *extra), extra
    monkeypatch.setenv("ADSVC_TOKEN", "bad\ttoken")
    assert "$ADSVC_TOKEN: the token must be printable ASCII" in fails(
        capsys, "eval", *SEED, "--server", "h:1")
    assert fake_connect == []


def test_a_sdk_without_tls_is_a_one_line_error(capsys, fake_connect, monkeypatch):
    monkeypatch.delattr(adsvc_client, "TLS", raising=False)
    line = fails(capsys, "grad", *SEED, "--server", "h:1", "--tls", code=1)
    assert "has no TLS support" in line
    assert fake_connect == []


def test_tls_and_token_against_a_real_mtls_server(capsys, tmp_path, monkeypatch):
    """The flags end to end: mutual TLS with certificates made on the fly, and a token."""
    if not hasattr(adsvc_client, "TLS"):
        pytest.skip("this SDK has no TLS support")
    from service_fixtures import running_server
    from test_service_tls import make_pki

    from adsvc.server.config import ServerConfig

    monkeypatch.delenv("ADSVC_TOKEN", raising=False)
    pki = make_pki(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = ServerConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                          tls_client_ca=pki["ca"], token="s3cret")
    with running_server(config) as (_, target):
        server_only = ["--server", target, "--tls-ca", pki["ca"],
                       "--tls-server-name", "localhost"]
        tls = [*server_only, "--tls-cert", pki["client_cert"], "--tls-key",
               pki["client_key"], "--timeout", "20"]
        assert ok(capsys, "grad", *SEED, *tls, "--token-file", str(token_file)) == \
            "value: 23\ngradient: x = 10, y = 3\n"
        assert "UnauthenticatedError" in fails(capsys, "eval", *SEED, *tls, code=1)
        monkeypatch.setenv("ADSVC_TOKEN", "s3cret")
        assert ok(capsys, "eval", *SEED, *tls) == "value: 23\n"
        assert "grad:x" in ok(capsys, "show", "x*y", "--mode", "reverse", *tls)
        # plaintext to a TLS server, or TLS without the client certificate: refused
        fails(capsys, "eval", *SEED, "--server", target, "--timeout", "3", code=1)
        fails(capsys, "eval", *SEED, *server_only, "--timeout", "3", code=1)


# -- 4. hostile arguments -----------------------------------------------------------------
HOSTILE = [
    (["show", "x", "--mode", "forward", "--order", "99999999999999999999"],
     f"must be at most {MAX_ORDER}"),
    (["show", "x", "--mode", "forward", "--order", "9" * 5000], "not an integer"),
    (["show", "x", "--mode", ",".join(["forward"] * (MAX_ORDER + 1))],
     f"exceeds the limit of {MAX_ORDER}"),
    (["show", "x", "--mode", ",".join(["forward"] * 100_000)], "exceeds the limit"),
    (["grad", "x", "--at", "x=1", "--timeout", "1e20"], "at most 10000000 seconds"),
    (["grad", "x", "--at", "x=1", "--timeout", "nan"], "positive number"),
    (["eval", "x", "--at", "x=[" + "1" * 5000 + "]"], "not a JSON list of numbers"),
    (["eval", "x", "--at", "x=" + "[" * 100_000 + "]" * 100_000], "not a JSON list"),
    (["eval", "x", "--at", "x=" + "[" * 70 + "1" + "]" * 70], "at most 64 levels deep"),
    (["eval", "x", "--at", "x=[1,[2]]"], "rectangular"),
    (["eval", "x", "--at", 'x=[{"a": 1}]'], "rectangular"),
    (["eval", "x", "--at", "x:y=1"], "is not a variable name"),
    (["eval", "x", "--at", "x\ay=1"], "is not a variable name"),
    (["eval", "1" * 5000 + "*x", "--at", "x=1"], "integer literal is too long"),
    (["eval", "+".join(["x"] * 60_000)], "expression is too long"),
    (["eval", "+".join(["x"] * 40_000)], "too deeply nested for the parser"),
    (["eval", "-" * 90_000 + "x"], "too deeply nested"),
    (["eval", "sin(" * 1000 + "x" + ")" * 1000], "too many nested parentheses"),
    (["eval", "x\udcff", "--at", "x=1"], "surrogates not allowed"),
    (["grad", "x", "--at", "x=1", *["--json"] * 5000], "too many arguments (5,002;"),
]


@pytest.mark.parametrize("argv,message", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_arguments_get_one_line_errors(capsys, argv, message):
    start = time.monotonic()
    line = fails(capsys, *argv)
    assert message in line
    assert len(line) <= len("adsvc: error: ") + MAX_MESSAGE + 40
    assert time.monotonic() - start < 10


def test_hostile_values_that_are_fine(capsys):
    assert ok(capsys, "eval", "x", "--at", "x=[1e999]") == "value: [inf]\n"
    assert ok(capsys, "eval", "x", "--at", "x=-1e999") == "value: -inf\n"
    assert ok(capsys, "eval", "x*2", "--at", "x=" + "1" * 5000) == "value: inf\n"
    assert ok(capsys, "eval", "sum(x)", "--at", "x=" + "[" * 60 + "1" + "]" * 60) == \
        "value: 1\n"
    assert ok(capsys, "grad", "sum(x)", "--at", "x=[]") == "value: 0\ngradient: x = []\n"


def test_unicode_names(capsys):
    assert ok(capsys, "grad", "é*é", "--at", "é=3") == "value: 9\ngradient: é = 6\n"
    # Python reads identifiers NFKC-normalized: the variable ｘ is x, either spelling feeds it
    assert ok(capsys, "eval", "ｘ*2", "--at", "ｘ=4") == "value: 8\n"
    assert ok(capsys, "eval", "ｘ*2", "--at", "x=4") == "value: 8\n"
    assert ok(capsys, "grad", "ｘ*y", "--at", "ｘ=2", "--at", "y=5", "--wrt", "ｘ") == \
        "value: 10\ngradient: x = 5\n"
    assert "given twice" in fails(capsys, "eval", "ｘ", "--at", "ｘ=1", "--at", "x=2")


def test_names_that_cannot_be_encoded_are_escaped_not_a_crash():
    p = python_m("show", "é*ö", env={"PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0, p.stderr
    assert "input \\xe9 : f64[]" in p.stdout
    p = python_m("eval", "é", "--at", "x=1", env={"PYTHONIOENCODING": "ascii"})
    assert p.returncode == 2 and "internal error" not in p.stderr
    assert p.stderr.count("\n") == 1


def test_output_names_of_a_file_are_printed_on_one_line(capsys, tmp_path):
    g = adsvc.trace(lambda x: {"a\nb": x * 2, "c d": x + 1}, x=adsvc.f64())
    path = str(tmp_path / "names.json")
    graphfile.save(g, path)
    assert ok(capsys, "eval", path, "--at", "x=1") == "'a\\nb': 2\n'c d': 2\n"


def test_long_chains_build_without_recursion(capsys):
    """A chain as long as Python's parser takes is checked and built iteratively."""
    n = 2500
    assert ok(capsys, "grad", "+".join(["x"] * n), "--at", "x=1") == \
        f"value: {n}\ngradient: x = {n}\n"
    text = ok(capsys, "show", "**".join(["x"] * 2500))
    assert text.count("pow") == 2499


def test_many_variables_and_many_at_items_stay_fast(capsys):
    """--at items are taken out before argparse, whose time is quadratic in the number
    of options (70,000 is about what fits in a Linux command line)."""
    names = [f"v{i}" for i in range(12_000)]
    expr = "+".join("(" + "+".join(names[i:i + 100]) + ")" for i in range(0, 12_000, 100))
    at = [a for n in names for a in ("--at", f"{n}=1")]
    start = time.monotonic()
    assert ok(capsys, "eval", expr, *at) == "value: 12000\n"
    assert ok(capsys, "eval", expr, *at[:-2], "--at=v11999=2") == "value: 12001\n"
    line = fails(capsys, "grad", expr, *at[:-2])
    assert "no value for the expression's input 'v11999'" in line
    line = fails(capsys, "grad", "x", *(a for i in range(70_000) for a in ("--at", f"q{i}=1")))
    assert "no variable 'q0' (variables: x)" in line
    line = fails(capsys, "grad", expr)
    assert "(and 11,990 more)" in line
    assert time.monotonic() - start < 20


def test_error_lines_are_clipped(capsys):
    line = fails(capsys, "eval", "x", "--at", "x=" + "y" * 100_000)
    assert "... (100,000 characters)" in line and len(line) < 300
    line = fails(capsys, "eval", "x", "--at", "a" * 100_000 + "=1")
    assert len(line) < 1000
