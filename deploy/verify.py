#!/usr/bin/env python3
"""End-to-end check of the containerized deployment (docker-compose.yml), run by .ci/run.

    python deploy/verify.py [--keep] [--calls N]   # build, start, check, shut down
    python3 deploy/verify.py --up | --down          # only start (and leave up) / remove

What it does, in order (each step timed; a summary with the figures at the end):

 1. Engine: installs Debian's docker.io and docker-compose when missing (as root, with
    apt-get; debootstrap too when a base image must be built), and starts
    `dockerd --bridge=none --iptables=false` when no Docker engine answers (its log in
    the run directory; stopped at the end, by PID).
    Where no engine can be started (not root, no dockerd, no apt-get) it prints SKIPPED
    and exits 0; an engine that is there but fails to start is a failure.
 2. Images: the base is python:3.11-slim when it is present or can be pulled, otherwise
    deploy/build-base.sh (debootstrap + docker import, cached as adsvc-base:bookworm).
    adsvc:latest is built from a temporary copy of the work tree (what .dockerignore
    admits) plus the host's extra CA certificates (/usr/local/share/ca-certificates, for
    a TLS-intercepting proxy in front of PyPI) in .build-ca/: they reach only the build
    stage, never the repository or the runtime image. adsvc-nginx and adsvc-redis come
    from Debian's packages. Docker's layer cache makes a second run fast.
 3. Stack: `docker-compose -p adsvcverify up -d --no-build`, waits until all healthy.
 4. Calls through nginx (127.0.0.1:50051) with the raw generated stub
    (adsvc_protocol.proto.service_pb2_grpc; graphs written as protobuf JSON, tensors as
    raw bytes, never re-sent: after the first call everything goes by handle):
    a. spread: every replica answers a share of the calls (per-replica /metrics and the
       request ids in each replica's log);
    b. store: handles compiled on one replica are served by all (no NOT_FOUND), through
       the Redis store (adsvc_store_total{result="hit"} on the others);
    c. failover: 4 client threads loop while one replica is stopped (docker stop =
       SIGTERM, grace) and started again: no call is lost, every answer is right; the
       restarted replica (empty cache) serves the old handles from the store;
       Redis restarted under load: still no call lost;
    d. metrics: the calls each replica's /metrics counts add up to the calls it got;
    plus a 16 MB tensor through nginx (its default 1 MB body limit would refuse it) and
    a 72 MB one refused by the server's 64 MiB limit as RESOURCE_EXHAUSTED.
    Client retry policy (as the SDK's): UNAVAILABLE only, jittered exponential backoff
    50 ms doubling to 1 s, within the call's 30 s deadline; every RPC is side-effect free
    (NO_SIDE_EFFECTS), so a retry cannot do anything twice. Retries are counted.
 5. Shutdown: `docker-compose down` (images kept as a cache), dockerd stopped if this
    script started it. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "adsvcverify"
NGINX = "127.0.0.1:50051"
# service -> (gRPC address, metrics port); the same as docker-compose.yml and nginx.conf
REPLICAS = {"adsvc1": ("127.0.0.1:50061", 50071), "adsvc2": ("127.0.0.1:50062", 50072),
            "adsvc3": ("127.0.0.1:50063", 50073)}
REDIS_PORT = 6390
PORTS = [50051, 6390] + [int(a.rsplit(":", 1)[1]) for a, _ in REPLICAS.values()] + \
    [m for _, m in REPLICAS.values()]
PY_BASE, DEBIAN_BASE, LOCAL_BASE = "python:3.11-slim", "debian:bookworm-slim", \
    "adsvc-base:bookworm"
CA_DIR = Path("/usr/local/share/ca-certificates")
MAX_MESSAGE = 64 << 20
DEADLINE = 30.0

RUN_DIR = Path(tempfile.mkdtemp(prefix="adsvc-verify."))
T0 = time.monotonic()
TIMES: list[tuple[str, float]] = []
FIGURES: list[str] = []
FAILURES: list[str] = []
STARTED: dict[str, subprocess.Popen] = {}  # processes this script started


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def figure(msg: str) -> None:
    FIGURES.append(msg)
    say("  " + msg)


def check(ok: bool, what: str) -> bool:
    say(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        FAILURES.append(what)
    return ok


@contextlib.contextmanager
def step(name: str):
    start = time.monotonic()
    say(f"== {name}")
    try:
        yield
    finally:
        TIMES.append((name, time.monotonic() - start))


class Skip(Exception):
    """No Docker engine can be started here."""


def run(cmd, *, check_rc=True, timeout=900, quiet=False, env=None, log=None, **kw):
    """Run a command to completion; its output goes to `log` (a file in RUN_DIR) or is
    returned. On failure the tail of the output is printed and RuntimeError raised."""
    env = {**os.environ, **(env or {})}
    if log is not None:
        path = RUN_DIR / log
        with open(path, "ab") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                               env=env, **kw)
        out = path.read_text(errors="replace")
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           **kw)
        out = (p.stdout or "") + (p.stderr or "")
    if check_rc and p.returncode != 0:
        if not quiet:
            print("\n".join(out.splitlines()[-40:]), file=sys.stderr)
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}")
    return p.returncode, out


# ---------------------------------------------------------------- 1. the engine

def compose_available() -> bool:
    return shutil.which("docker-compose") is not None or (
        shutil.which("docker") is not None and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0)


def apt_install(packages: list[str], why: str) -> None:
    """Install Debian packages (root + apt-get), or Skip saying what is missing."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Skip(f"{why}: missing {', '.join(packages)} and cannot install them "
                   "(needs root and apt-get)")
    say(f"installing {' '.join(packages)} (apt-get)")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "update", "-q"], env=env, log="apt.log")
        run(["apt-get", "install", "-y", "-q", *packages], env=env, log="apt.log")
    except RuntimeError as e:
        raise Skip(f"{why}: cannot install {' '.join(packages)}: {e} (see "
                   f"{RUN_DIR}/apt.log)") from e


def ensure_tools() -> None:
    """The Docker CLI, docker-compose and (when no engine runs) dockerd."""
    missing = set()
    if shutil.which("docker") is None or (shutil.which("dockerd") is None
                                          and not engine_up()):
        missing.add("docker.io")
    if not compose_available():
        missing.add("docker-compose")
    if missing:
        apt_install(sorted(missing), "no Docker engine")


def engine_up() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def ensure_engine() -> None:
    if engine_up():
        say("a Docker engine is running: using it (not stopped at the end)")
        return
    if os.geteuid() != 0:
        raise Skip("no Docker engine is running and starting dockerd needs root")
    log = open(RUN_DIR / "dockerd.log", "wb")
    proc = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false"], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    STARTED["dockerd"] = proc
    say(f"started dockerd --bridge=none --iptables=false (pid {proc.pid}, log "
        f"{RUN_DIR}/dockerd.log)")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if engine_up():
            return
        time.sleep(0.5)
    tail = (RUN_DIR / "dockerd.log").read_text(errors="replace").splitlines()[-15:]
    print("\n".join(tail), file=sys.stderr)
    raise RuntimeError(f"dockerd (pid {proc.pid}) did not come up: exit code {proc.poll()}")


def stop_started() -> None:
    proc = STARTED.pop("dockerd", None)
    if proc is None or proc.poll() is not None:
        return
    say(f"stopping dockerd (pid {proc.pid}, started by this script)")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        say(f"dockerd (pid {proc.pid}) did not stop in 60 s: SIGKILL")
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------- 2. images

def have_image(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name],
                          capture_output=True).returncode == 0


def base_image(official: str) -> str:
    if have_image(official):
        return official
    rc, out = run(["docker", "pull", "-q", official], check_rc=False, timeout=120)
    if rc == 0:
        return official
    say(f"cannot pull {official} ({out.strip().splitlines()[-1][:120] if out else rc}); "
        f"using the local Debian base {LOCAL_BASE}")
    if not have_image(LOCAL_BASE):
        if shutil.which("debootstrap") is None:
            apt_install(["debootstrap"], "no base image")
        run(["bash", str(ROOT / "deploy" / "build-base.sh"), LOCAL_BASE],
            log="build-base.log", timeout=900)
    return LOCAL_BASE


def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        pats = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        for p in pats:
            if any(fnmatch.fnmatchcase(pre, p) for pre in prefixes):
                return True
            if pat.startswith("**/") and any(fnmatch.fnmatchcase(part, p) for part in parts):
                return True
    return False


def build_context() -> Path:
    """A temporary copy of the work tree for `docker build` (tracked and untracked files,
    not git-ignored, not docker-ignored) with the host's extra CA certificates."""
    ctx = Path(tempfile.mkdtemp(prefix="ctx.", dir=RUN_DIR))
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    patterns = _ignore_patterns()
    n = 0
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or _ignored(rel, patterns):
            continue
        dst = ctx / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        n += 1
    for name in (".dockerignore", "Dockerfile"):
        shutil.copy2(ROOT / name, ctx / name)
    cas = sorted(CA_DIR.rglob("*.crt")) if CA_DIR.is_dir() else []
    if cas:
        (ctx / ".build-ca").mkdir()
        for i, ca in enumerate(cas):
            shutil.copy2(ca, ctx / ".build-ca" / f"{i:02d}-{ca.name}")
    say(f"build context: {n} files, {len(cas)} extra CA certificate(s) for the build stage")
    return ctx


def build_images() -> dict[str, str]:
    py_base = os.environ.get("ADSVC_BASE") or base_image(PY_BASE)
    deb_base = os.environ.get("DEBIAN_BASE") or (
        py_base if py_base == LOCAL_BASE else base_image(DEBIAN_BASE))
    figure(f"base images: adsvc on {py_base}, nginx/redis on {deb_base}")
    ctx = build_context()
    try:
        start = time.monotonic()
        run(["docker", "build", "--network", "host", "--build-arg", f"BASE={py_base}",
             "-t", "adsvc:latest", str(ctx)], log="build-adsvc.log")
        say(f"built adsvc:latest in {time.monotonic() - start:.1f}s")
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    for name in ("nginx", "redis"):
        start = time.monotonic()
        run(["docker", "build", "--network", "host", "--build-arg", f"BASE={deb_base}",
             "-f", str(ROOT / "deploy" / f"Dockerfile.{name}"), "-t", f"adsvc-{name}:latest",
             str(ROOT / "deploy")], log=f"build-{name}.log")
        say(f"built adsvc-{name}:latest in {time.monotonic() - start:.1f}s")
    size = run(["docker", "image", "inspect", "-f", "{{.Size}}", "adsvc:latest"])[1]
    figure(f"adsvc:latest is {int(size.strip()) / 1e6:.0f} MB")
    return {"ADSVC_BASE": py_base, "DEBIAN_BASE": deb_base}


# ---------------------------------------------------------------- 3. the stack

def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def compose(*args, env=None, **kw):
    return run([*compose_cmd(), "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"),
                *args], env=env, cwd=ROOT, **kw)


def busy_ports() -> list[int]:
    busy = []
    for port in PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


def container(service: str) -> str:
    cid = compose("ps", "-q", service)[1].strip()
    if not cid:
        raise RuntimeError(f"no container for service {service}")
    return cid.splitlines()[-1]


def health(service: str) -> str:
    rc, out = run(["docker", "inspect", "-f",
                   "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                   container(service)], check_rc=False)
    return out.strip() if rc == 0 else "missing"


def wait_healthy(services, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {s: health(s) for s in services}
        if all(v == "running/healthy" for v in states.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout:.0f}s: {states}")
        time.sleep(0.5)


def stack_up(env) -> None:
    compose_text = (ROOT / "docker-compose.yml").read_text()
    nginx_text = (ROOT / "deploy" / "nginx.conf").read_text()
    for s, (addr, mport) in REPLICAS.items():
        port = addr.rsplit(":", 1)[1]
        if (f'"{port}"' not in compose_text or f'"{mport}"' not in compose_text
                or f"server {addr} " not in nginx_text or f"\n  {s}:" not in compose_text):
            raise RuntimeError(f"{s} ({addr}, metrics {mport}) in this script does not match "
                               "docker-compose.yml / deploy/nginx.conf")
    busy = busy_ports()
    if busy:
        run(["ss", "-ltnp"], check_rc=False, log="ports.log")
        raise RuntimeError(f"ports in use: {busy} (the stack needs {PORTS}; see "
                           f"{RUN_DIR}/ports.log)")
    compose("up", "-d", "--no-build", env=env, log="compose-up.log", timeout=300)
    wait_healthy([*REPLICAS, "nginx", "redis"])


def stack_down(env) -> None:
    with contextlib.suppress(Exception):
        compose("logs", "--no-color", "--timestamps", env=env, log="stack.log", timeout=120)
    compose("down", "-t", "30", env=env, log="compose-down.log", timeout=300, check_rc=False)


# ---------------------------------------------------------------- 4. the client

def load_stub():
    """The generated protobuf/gRPC modules (from the installed adsvc or the SDK)."""
    try:
        import grpc
        from google.protobuf import json_format

        from adsvc_protocol.proto import ir_pb2, service_pb2, service_pb2_grpc
    except ImportError as e:
        raise RuntimeError(f"the generated stub is not importable ({e}): run this from "
                           "a virtual environment with `pip install .`") from e
    return grpc, json_format, ir_pb2, service_pb2, service_pb2_grpc


grpc, json_format, ir_pb2, pb, pb_grpc = (None,) * 5
np = None


def tensor(a) -> object:
    a = np.asarray(a, dtype="<f8")
    return ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=list(a.shape), raw=a.tobytes())


def array(t) -> object:
    assert t.dtype == ir_pb2.DTYPE_FLOAT64, t.dtype
    if t.raw:
        return np.frombuffer(t.raw, dtype="<f8").reshape(tuple(t.dims))
    return np.array(t.values, dtype="<f8").reshape(tuple(t.dims))


def seed_graph():
    """z = x*x + x*y + 2, as a client in any language would write it (protobuf JSON)."""
    return json_format.ParseDict({
        "irVersion": 1, "opsetVersion": 1,
        "inputs": [{"id": 0, "name": "x", "type": {"dtype": "DTYPE_FLOAT64"}},
                   {"id": 1, "name": "y", "type": {"dtype": "DTYPE_FLOAT64"}}],
        "nodes": [{"id": 2, "op": "mul", "operands": [0, 0]},
                  {"id": 3, "op": "mul", "operands": [0, 1]},
                  {"id": 4, "op": "add", "operands": [2, 3]},
                  {"id": 5, "op": "constant",
                   "value": {"dtype": "DTYPE_FLOAT64", "values": [2]}},
                  {"id": 6, "op": "add", "operands": [4, 5]}],
        "outputs": [{"name": "z", "id": 6}]}, ir_pb2.Graph())


N, LAYERS = 128, 12   # the deep graph of the workload: ~10 ms a gradient
SLOW_N, SLOW_LAYERS = 256, 16  # in flight when a replica is stopped: 0.5 s idle, ~6 s loaded


def coef(k: int) -> float:
    return 0.5 + 0.05 * (k % 12)


def deep_graph(n=N, layers=LAYERS):
    """loss = sum(h_L * h_L), h_{k+1} = h_k + c_k * tanh(w @ h_k), h_0 = x (w, x: n x n):
    a residual network whose gradient takes real work (3 matmuls a layer)."""
    f64 = {"dtype": "DTYPE_FLOAT64", "dims": [n, n]}
    nodes, nid = [], 2

    def add(op, *operands, **extra):
        nonlocal nid
        nodes.append({"id": nid, "op": op, "operands": list(operands), **extra})
        nid += 1
        return nid - 1

    h = 1
    for layer in range(layers):
        k = add("constant", value={"dtype": "DTYPE_FLOAT64", "values": [coef(layer)]})
        h = add("add", h, add("mul", k, add("tanh", add("matmul", 0, h))))
    loss = add("sum", add("mul", h, h))
    return json_format.ParseDict({
        "irVersion": 1, "opsetVersion": 1,
        "inputs": [{"id": 0, "name": "w", "type": f64}, {"id": 1, "name": "x", "type": f64}],
        "nodes": nodes, "outputs": [{"name": "loss", "id": loss}]}, ir_pb2.Graph())


def deep_expected(w, x, layers=LAYERS):
    """Value and gradient of deep_graph by hand (numpy backprop)."""
    hs, ts = [x], []
    for layer in range(layers):
        t = np.tanh(w @ hs[-1])
        ts.append(t)
        hs.append(hs[-1] + coef(layer) * t)
    g, gw = 2 * hs[-1], np.zeros_like(w)
    for k in reversed(range(layers)):
        ga = g * coef(k) * (1 - ts[k] ** 2)
        gw += ga @ hs[k].T
        g = g + w.T @ ga
    return float(np.sum(hs[-1] ** 2)), gw, g


def sumsq_graph(n):
    return json_format.ParseDict({
        "irVersion": 1, "opsetVersion": 1,
        "inputs": [{"id": 0, "name": "v", "type": {"dtype": "DTYPE_FLOAT64", "dims": [n]}}],
        "nodes": [{"id": 1, "op": "mul", "operands": [0, 0]},
                  {"id": 2, "op": "sum", "operands": [1]}],
        "outputs": [{"name": "s", "id": 2}]}, ir_pb2.Graph())


class Client:
    """The raw stub through nginx, with the retry policy of the module docstring."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 2 * MAX_MESSAGE),
            ("grpc.max_receive_message_length", 2 * MAX_MESSAGE),
            ("grpc.enable_retries", 0)])  # retries are ours (counted), not the channel's
        self.stub = pb_grpc.AutodiffServiceStub(self.channel)
        self.lock = threading.Lock()
        self.calls = 0         # logical calls made
        self.attempts = 0      # RPCs sent (calls + retries)
        self.retried = Counter()   # status code -> retries
        self.failed = Counter()    # status code -> calls that failed for good
        self.not_found = 0
        self.rids: dict[str, str] = {}  # request id -> rpc

    def call(self, rpc: str, request, rid: str, retry=True, timeout=DEADLINE, expect=()):
        """One call; UNAVAILABLE is retried (see the module docstring). A final error
        is counted as a failed call unless its code is in `expect`."""
        method = getattr(self.stub, rpc)
        deadline = time.monotonic() + timeout
        delay = 0.05
        with self.lock:
            self.calls += 1
            self.rids[rid] = rpc
        while True:
            with self.lock:
                self.attempts += 1
            try:
                return method(request, timeout=max(0.05, deadline - time.monotonic()),
                              metadata=(("x-request-id", rid),))
            except grpc.RpcError as e:
                code = e.code()
                if (retry and code == grpc.StatusCode.UNAVAILABLE
                        and time.monotonic() + delay < deadline):
                    with self.lock:
                        self.retried[code.name] += 1
                    time.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(2 * delay, 1.0)
                    continue
                with self.lock:
                    if code.name not in expect:
                        self.failed[code.name] += 1
                    if code == grpc.StatusCode.NOT_FOUND:
                        self.not_found += 1
                raise


class Workload:
    """The calls by handle that every phase sends: Evaluate of the reverse-mode
    derivative of the seed graph and Gradient of the deep graph, answers checked."""

    def __init__(self, client: Client):
        self.c = client
        self.rng = np.random.default_rng(7)
        self.wrong = 0
        d = client.call("Differentiate", pb.DifferentiateRequest(
            graph=seed_graph(), omit_graph=True,
            differentiation=pb.Differentiation(modes=[pb.MODE_REVERSE], seed=True)),
            "verify-setup-differentiate")
        self.seed_handle = d.handle
        self.w = self.rng.standard_normal((N, N)) / np.sqrt(N)
        self.x = self.rng.standard_normal((N, N))
        r = client.call("Gradient", pb.GradientRequest(
            graph=deep_graph(), mode=pb.MODE_REVERSE,
            inputs={"w": tensor(self.w), "x": tensor(self.x)}), "verify-setup-gradient")
        self.deep_handle = r.handle
        self.deep_expected = deep_expected(self.w, self.x)
        self.check_deep(r)
        figure(f"compiled through nginx: seed gradient graph {d.handle[:12]}... "
               f"({d.stats.nodes_before} -> {d.stats.nodes_after} nodes), deep gradient "
               f"{r.handle[:12]}... ({N}x{N}, {LAYERS} layers)")

    def check_deep(self, r, expected=None) -> bool:
        value, gw, gx = expected or self.deep_expected
        ok = bool(np.isclose(array(r.value), value, rtol=1e-9)
                  and np.allclose(array(r.gradients["w"]), gw, rtol=1e-8, atol=1e-8)
                  and np.allclose(array(r.gradients["x"]), gx, rtol=1e-8, atol=1e-8))
        if not ok:
            self.wrong += 1
        return ok

    def slow_call(self, target: str) -> tuple[threading.Thread, dict]:
        """A Gradient of a big graph sent straight to one replica, in a thread; the dict
        gets `ok` (answered and right), `code` and `end` (monotonic time)."""
        rng = np.random.default_rng(3)
        w = rng.standard_normal((SLOW_N, SLOW_N)) / np.sqrt(SLOW_N)
        x = rng.standard_normal((SLOW_N, SLOW_N))
        expected = deep_expected(w, x, SLOW_LAYERS)
        direct = Client(target)
        out = {"ok": False, "code": None, "end": None}

        def go():
            try:
                r = direct.call("Gradient", pb.GradientRequest(
                    graph=deep_graph(SLOW_N, SLOW_LAYERS),
                    inputs={"w": tensor(w), "x": tensor(x)}), "verify-c-slow", retry=False)
                out["code"] = "OK"
                out["ok"] = self.check_deep(r, expected)
            except grpc.RpcError as e:
                out["code"] = e.code().name
            finally:
                out["end"] = time.monotonic()
                direct.channel.close()

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t, out

    def evaluate(self, rid: str) -> None:
        x, y = (float(v) for v in self.rng.uniform(-5, 5, 2))
        r = self.c.call("Evaluate", pb.EvaluateRequest(
            handle=self.seed_handle, inputs={"x": tensor(x), "y": tensor(y)}), rid)
        got = (float(array(r.outputs["z"])), float(array(r.outputs["grad:x"])),
               float(array(r.outputs["grad:y"])))
        if not np.allclose(got, (x * x + x * y + 2, 2 * x + y, x), rtol=1e-12):
            self.wrong += 1

    def gradient(self, rid: str) -> None:
        r = self.c.call("Gradient", pb.GradientRequest(
            handle=self.deep_handle, inputs={"w": tensor(self.w), "x": tensor(self.x)}), rid)
        self.check_deep(r)

    def one(self, i: int, prefix: str) -> None:
        rid = f"{prefix}-{i}"  # Evaluate or Gradient, pseudo-randomly (never in step
        # with nginx's round robin)
        (self.gradient if random.Random(rid).random() < 0.4 else self.evaluate)(rid)


# ---------------------------------------------------------------- metrics and logs

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m and not line.startswith("#"):
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(snap, name, **want) -> float:
    return sum(v for (n, labels), v in snap.items()
               if n == name and all((k, w) in labels for k, w in want.items()))


def store_count(snap, result: str) -> float:
    """adsvc_store_total{result=...}, or adsvc_store_<result>s_total."""
    return total(snap, "adsvc_store_total", result=result) or \
        total(snap, f"adsvc_store_{result}s_total")


def cache_count(snap, result: str) -> float:
    return total(snap, "adsvc_cache_total", result=result) or \
        total(snap, f"adsvc_cache_{result}s_total")


def scrape_all(services=REPLICAS):
    return {s: scrape(REPLICAS[s][1]) for s in services}


def delta(after, before, fn, *args) -> dict[str, float]:
    return {s: fn(after[s], *args) - fn(before.get(s, {}), *args) for s in after}


def calls(snap, rpc=None) -> float:
    return total(snap, "adsvc_calls_total", **({"rpc": rpc} if rpc else {}))


def served_by(prefix: str) -> dict[str, Counter]:
    """request id -> how many times each replica logged it (its one line per call)."""
    pat = re.compile(r"rpc=(\w+) request_id=(" + re.escape(prefix) + r"[\w-]*) status=(\w+)")
    seen: dict[str, Counter] = defaultdict(Counter)
    for s in REPLICAS:
        _, out = run(["docker", "logs", container(s)], check_rc=False)
        for m in pat.finditer(out):
            seen[m.group(2)][s] += 1
    return seen


def fmt(d) -> str:
    return ", ".join(f"{k}={int(v) if float(v).is_integer() else round(v, 1)}"
                     for k, v in sorted(d.items()))


# ---------------------------------------------------------------- the phases

def phase_spread_and_store(w: Workload, n: int) -> None:
    before = scrape_all()
    failed0, retried0 = sum(w.c.failed.values()), sum(w.c.retried.values())
    start = time.monotonic()
    for i in range(n):
        w.one(i, "verify-a")
    took = time.monotonic() - start
    after = scrape_all()
    got = delta(after, before, calls)
    figure(f"{n} calls by handle in {took:.1f}s ({n / took:.0f}/s), per replica "
           f"(metrics): {fmt(got)}")
    check(sum(w.c.failed.values()) == failed0 and w.wrong == 0,
          f"(b) every call answered and right: {n} calls, failed {dict(w.c.failed)}, "
          f"NOT_FOUND {w.c.not_found}, wrong answers {w.wrong}")
    check(all(v > 0 for v in got.values()) and min(got.values()) >= n / 10,
          f"(a) calls spread over the replicas: {fmt(got)}")

    # Who served what, from the request ids in the replicas' logs (one line per call).
    seen = served_by("verify-a-")
    per, rpcs = Counter(), defaultdict(set)
    for rid, counts in seen.items():
        per.update(counts)
        for s in counts:
            rpcs[s].add(w.c.rids[rid])
    dup = [r for r, c in seen.items() if sum(c.values()) != 1]
    check(len(seen) == n and not dup,
          f"(a) request ids in the replicas' logs: {len(seen)} of {n} calls, each logged "
          f"once ({len(dup)} not); per replica {fmt(per)}")
    compiled = Counter(s for counts in served_by("verify-setup-").values() for s in counts)
    figure("compiled: " + ", ".join(f"{s} {compiled[s]} of the 2 handles"
                                    for s in REPLICAS))
    check(all(rpcs[s] == {"Evaluate", "Gradient"} for s in REPLICAS),
          "(b) every replica served both handles (Evaluate of the seed gradient graph, "
          "Gradient of the deep graph): " + ", ".join(
              f"{s} {'+'.join(sorted(rpcs[s])) or '-'}" for s in REPLICAS))
    hits = delta(after, before, store_count, "hit")
    want = {s: 2 - compiled[s] for s in REPLICAS}
    check(hits == want,
          f"(b) each handle a replica did not compile was loaded from Redis exactly once "
          f"(adsvc_store_total{{result=\"hit\"}}): {fmt(hits)}, expected {fmt(want)}")
    retried = sum(w.c.retried.values()) - retried0
    counted = int(sum(got.values()))
    check(n <= counted <= n + retried and all(per[s] == got[s] for s in REPLICAS),
          f"(d) metrics count the calls: adsvc_calls_total deltas sum to {counted} for "
          f"{n} calls ({retried} retried), and equal each replica's log lines")
    figure(f"Redis holds {redis_keys()} compiled graph(s)")


def redis_keys() -> str:
    _, keys = run(["docker", "exec", container("redis"), "redis-cli", "-p", str(REDIS_PORT),
                   "dbsize"], check_rc=False)
    return keys.strip()


def phase_large(c: Client) -> None:
    n = 2_000_000  # 16 MB: nginx's default client_max_body_size (1 MB) would refuse it
    v = np.linspace(-1, 1, n)
    start = time.monotonic()
    r = c.call("Evaluate", pb.EvaluateRequest(graph=sumsq_graph(n), inputs={"v": tensor(v)}),
               "verify-large-16mb")
    ok = np.isclose(float(array(r.outputs["s"])), float(np.dot(v, v)), rtol=1e-9)
    check(ok, f"16 MB tensor through nginx answered right in {time.monotonic() - start:.2f}s")
    n = 9_000_000  # 72 MB > --max-message-bytes 64 MiB
    code = "OK"
    try:
        c.call("Evaluate", pb.EvaluateRequest(graph=sumsq_graph(n),
                                              inputs={"v": tensor(np.zeros(n))}),
               "verify-large-72mb", retry=False, expect=("RESOURCE_EXHAUSTED",))
    except grpc.RpcError as e:
        code = e.code().name
    check(code == "RESOURCE_EXHAUSTED",
          f"72 MB request refused by the server's 64 MiB limit through nginx: {code}")


def loop(w: Workload, prefix: str, stop: threading.Event, threads=4):
    """`threads` threads sending the workload until `stop`; (errors, threads)."""
    errors: list[Exception] = []

    def work(t):
        i = 0
        while not stop.is_set():
            try:
                w.one(i, f"{prefix}-t{t}")
            except Exception as e:  # a lost call (after retries)
                errors.append(e)
            i += 1

    ts = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    return errors, ts


def phase_failover(w: Workload, env) -> None:
    c = w.c
    victim = "adsvc2"
    cid = container(victim)
    calls0, retried0, wrong0 = c.calls, sum(c.retried.values()), w.wrong
    stop = threading.Event()
    errors, ts = loop(w, "verify-c", stop)
    time.sleep(1.5)
    slow, slow_out = w.slow_call(REPLICAS[victim][0])  # in flight at SIGTERM
    time.sleep(0.2)
    start = time.monotonic()
    run(["docker", "stop", "-t", "30", cid])
    stop_took = time.monotonic() - start
    slow.join(timeout=30)
    if slow_out["end"] is not None and slow_out["end"] < start:
        figure("the slow call ended before SIGTERM (a fast machine): grace not exercised")
    else:
        check(slow_out["ok"],
              f"a {SLOW_N}x{SLOW_LAYERS} gradient in flight on {victim} at SIGTERM finished "
              f"within the grace period, right: {slow_out['code']}, "
              f"{(slow_out['end'] or 0) - start:.1f}s after docker stop")
    _, code = run(["docker", "inspect", "-f", "{{.State.ExitCode}}", cid])
    _, logs = run(["docker", "logs", "--tail", "20", cid], check_rc=False)
    m = re.search(r"stopped: .*", logs)
    figure(f"docker stop {victim}: {stop_took:.1f}s, exit code {code.strip()}; its log: "
           f"{m.group(0) if m else '(no shutdown line)'}")
    check(code.strip() == "0", f"{victim} shut down cleanly on SIGTERM (exit code 0)")
    time.sleep(2.0)
    start = time.monotonic()
    compose("start", victim, env=env)
    wait_healthy([victim])
    figure(f"docker start {victim}: healthy again after {time.monotonic() - start:.1f}s")
    before = scrape_all([victim])
    time.sleep(4.0)
    stop.set()
    for t in ts:
        t.join(timeout=60)
    after = scrape_all([victim])
    n = c.calls - calls0
    retried = sum(c.retried.values()) - retried0
    fresh = calls(after[victim]) - calls(before[victim])
    check(not errors and w.wrong == wrong0,
          f"(c) no call lost while {victim} stopped and restarted: {n} calls from 4 threads, "
          f"{retried} retried after UNAVAILABLE, lost {len(errors)}"
          f"{' (' + repr(errors[0])[:200] + ')' if errors else ''}, wrong answers "
          f"{w.wrong - wrong0}")
    hits = store_count(after[victim], "hit")
    check(fresh > 0 and hits > 0 and c.not_found == 0,
          f"(b) the restarted {victim} (empty cache) served old handles: {int(fresh)} calls, "
          f"{int(hits)} loaded from the store, NOT_FOUND {c.not_found}")


def phase_redis_restart(w: Workload, env) -> None:
    c = w.c
    calls0, retried0, wrong0 = c.calls, sum(c.retried.values()), w.wrong
    stop = threading.Event()
    errors, ts = loop(w, "verify-e", stop, threads=2)
    time.sleep(1.0)
    start = time.monotonic()
    compose("restart", "-t", "10", "redis", env=env)
    wait_healthy(["redis"])
    took = time.monotonic() - start
    time.sleep(1.0)
    stop.set()
    for t in ts:
        t.join(timeout=60)
    n = c.calls - calls0
    check(not errors and w.wrong == wrong0,
          f"Redis restarted under load ({took:.1f}s): {n} calls, "
          f"{sum(c.retried.values()) - retried0} retried, lost {len(errors)}, wrong "
          f"{w.wrong - wrong0}")
    # The store works again: a graph compiled now is served by every replica.
    d = c.call("Differentiate", pb.DifferentiateRequest(
        graph=seed_graph(), omit_graph=True,
        differentiation=pb.Differentiation(modes=[pb.MODE_FORWARD], wrt=["x"])),
        "verify-e-new-differentiate")
    time.sleep(0.2)  # the compiling replica writes to the store in the background
    failed0, bad = sum(c.failed.values()), 0
    for i in range(6):
        r = c.call("Evaluate", pb.EvaluateRequest(handle=d.handle, inputs={
            "x": tensor(3.0), "y": tensor(4.0), "tangent:x": tensor(1.0)}),
            f"verify-e-new-{i}")
        bad += float(array(r.outputs["tangent:z"])) != 10.0
    check(sum(c.failed.values()) == failed0 and not bad,
          f"after the Redis restart a new handle is stored and served by every replica: "
          f"6 calls, failed {sum(c.failed.values()) - failed0}, wrong {bad}; Redis holds "
          f"{redis_keys()} graph(s)")


def phase_metrics(c: Client) -> None:
    snaps = scrape_all()
    for s, snap in snaps.items():
        by = Counter()
        for (name, labels), v in snap.items():
            if name == "adsvc_calls_total":
                d = dict(labels)
                by[f"{d.get('rpc')}/{d.get('status')}"] += v
        figure(f"{s} /metrics: calls {fmt(by)}; cache hit={int(cache_count(snap, 'hit'))} "
               f"miss={int(cache_count(snap, 'miss'))}; store hit="
               f"{int(store_count(snap, 'hit'))} miss={int(store_count(snap, 'miss'))} "
               f"failure={int(store_count(snap, 'failure'))}")
    check(all(calls(snap) > 0 for snap in snaps.values()),
          "(d) every replica's /metrics counts calls")



def exercise(env, n_calls: int) -> None:
    global grpc, json_format, ir_pb2, pb, pb_grpc, np
    grpc, json_format, ir_pb2, pb, pb_grpc = load_stub()
    import numpy
    np = numpy
    c = Client(NGINX)
    grpc.channel_ready_future(c.channel).result(timeout=30)
    with step("calls through nginx: spread, shared store, metrics"):
        w = Workload(c)
        phase_spread_and_store(w, n_calls)
    with step("message size through nginx"):
        phase_large(c)
    with step("failover: stop and restart a replica under load"):
        phase_failover(w, env)
    with step("restart Redis under load"):
        phase_redis_restart(w, env)
    with step("metrics of every replica"):
        phase_metrics(c)
    figure(f"client totals: {c.calls} calls, {c.attempts} RPCs sent, retried "
           f"{dict(c.retried) or 0}, failed {dict(+c.failed) or 0}, NOT_FOUND {c.not_found}")
    c.channel.close()


# ---------------------------------------------------------------- main

DOCKERD_PID_FILE = Path(tempfile.gettempdir()) / "adsvc-deploy-dockerd.pid"


def up_only() -> int:
    """--up: engine, images, the stack (project "adsvc"), left running."""
    global PROJECT
    PROJECT = "adsvc"
    try:
        ensure_tools()
        ensure_engine()
        env = build_images()
        stack_up(env)
    except Skip as e:
        say(f"cannot start the stack: {e}")
        return 1
    except Exception as e:
        say(f"ERROR {type(e).__name__}: {e} (logs in {RUN_DIR})")
        return 1
    if "dockerd" in STARTED:
        DOCKERD_PID_FILE.write_text(str(STARTED["dockerd"].pid))
    say(f"stack {PROJECT!r} is up: gRPC on {NGINX} (nginx), replicas "
        + ", ".join(f"{s} {a} (metrics :{m})" for s, (a, m) in REPLICAS.items())
        + f", Redis 127.0.0.1:{REDIS_PORT}")
    say("try: adsvc grad 'x*x + x*y + 2' --at x=3 --at y=4 --server 127.0.0.1:50051; "
        "stop: python3 deploy/verify.py --down")
    return 0


def down_only() -> int:
    """--down: remove the --up stack; stop the dockerd that --up started (by its PID)."""
    global PROJECT
    PROJECT = "adsvc"
    if engine_up():
        stack_down(None)
        say(f"stack {PROJECT!r} removed")
    with contextlib.suppress(OSError, ValueError):
        pid = int(DOCKERD_PID_FILE.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        DOCKERD_PID_FILE.unlink()
        if cmdline.endswith(b"dockerd"):
            say(f"stopping dockerd (pid {pid}, started by --up)")
            os.kill(pid, signal.SIGTERM)
            for _ in range(600):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true",
                    help="after the checks, leave the stack (and a dockerd this script "
                    "started) running")
    ap.add_argument("--calls", type=int, default=150,
                    help="calls by handle in the spread/store phase (default 150)")
    ap.add_argument("--up", action="store_true",
                    help="only build and start the stack (project 'adsvc'), no checks; "
                    "leave it running")
    ap.add_argument("--down", action="store_true", help="remove the stack of --up")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # shut the stack down on SIGTERM too
    if args.down:
        return down_only()
    if args.up:
        return up_only()
    say(f"adsvc deployment check; logs in {RUN_DIR}")
    env = None
    up = False
    try:
        with step("engine"):
            ensure_tools()
            ensure_engine()
        with step("images"):
            env = build_images()
        with step("stack up"):
            up = True
            stack_up(env)
        exercise(env, args.calls)
    except Skip as e:
        say(f"SKIPPED: {e}")
        return 0
    except Exception as e:  # report, then shut down
        FAILURES.append(f"{type(e).__name__}: {e}")
        say(f"ERROR {type(e).__name__}: {e}")
    finally:
        if up and not args.keep:
            with step("stack down"):
                stack_down(env)
        if not args.keep:
            stop_started()
    return summary()


def summary() -> int:
    print("\n==== summary ====")
    for name, secs in TIMES:
        print(f"  {secs:6.1f}s  {name}")
    print(f"  {time.monotonic() - T0:6.1f}s  total")
    for f in FIGURES:
        print(f"  - {f}")
    if FAILURES:
        print(f"FAILED ({len(FAILURES)}):")
        for f in FAILURES:
            print(f"  x {f}")
        print(f"logs: {RUN_DIR}")
        return 1
    print(f"PASSED (logs: {RUN_DIR})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
