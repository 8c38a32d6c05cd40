"""Shared helper of the bench/ promise scripts: a server subprocess on 127.0.0.1:0.

`BenchServer(*flags)` starts `python -m adsvc.server --host 127.0.0.1 --port 0 FLAGS`
with its address space capped (RLIMIT_AS, default 6 GB: a regression cannot eat a
shared machine), reads the announced address, collects its log lines (stderr) and
reads its memory from /proc (`rss()`, `peak_rss()` = VmHWM). `call_lines()` parses the
one log line per call (`rpc=... request_id=... status=... ms=...`). `health()` asks
grpc.health.v1; `info()` is GetServerInfo. Used as a context manager it stops the
server (SIGTERM, then SIGKILL) on exit.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.proto import service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MEM_CAP = 6_000_000_000  # bytes of address space the server may map
MSG = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MSG + 1024),
                   ("grpc.max_send_message_length", -1),
                   ("grpc.use_local_subchannel_pool", 1)]
LOG_POLL = 0.02  # seconds between reads of the server's log file
LINE = re.compile(r"rpc=(\S+) request_id=(\S+) status=(\S+) ms=([\d.]+)(.*)")
# every status an adsvc call may end with (README "What the service promises")
DOCUMENTED = frozenset({"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND",
                        "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "CANCELLED"})


@dataclass
class CallLine:
    """One call's log line: rpc, request id, final status, server-side milliseconds."""

    rpc: str
    request_id: str
    status: str
    ms: float
    rest: str
    seen: float  # time.monotonic() when the helper read the line


def _cap(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.setpgid(0, 0)  # its own process group: stopped by pid, not by name
    return preexec


class BenchServer:
    """A capped `python -m adsvc.server` subprocess (see the module docstring)."""

    def __init__(self, *flags: str, mem_cap: int = MEM_CAP, timeout: float = 60.0,
                 env: dict[str, str] | None = None):
        self.flags = flags
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # the log goes to a file, read in batches (`_drain_stderr`): a pipe read line by
        # line would wake this (the measuring) process once per call the server logs
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adsvc.server", "--host", "127.0.0.1", "--port", "0",
             *flags], stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
            cwd=ROOT, preexec_fn=_cap(mem_cap))
        self.lines: list[str] = []
        self.calls: list[CallLine] = []
        self._lock = threading.Lock()
        self._new = threading.Condition(self._lock)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.target = self._read_target(timeout)
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.AutodiffServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    # -- process ----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def rss(self) -> int:
        """Resident bytes now (VmRSS)."""
        return self._status_kb("VmRSS") * 1024

    def peak_rss(self) -> int:
        """Most resident bytes since start (VmHWM)."""
        return self._status_kb("VmHWM") * 1024

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        self.channel.close()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- log --------------------------------------------------------------------------
    def _drain_stderr(self) -> None:
        """Read the log file as it grows, every LOG_POLL seconds, until the server exits
        and the file is read to its end (pread at an offset of our own: the server's
        stderr shares the file's offset, which is always at the end)."""
        fd, at, rest = self._log.fileno(), 0, b""
        while True:
            exited = not self.alive()
            chunk = os.pread(fd, 1 << 20, at)
            at += len(chunk)
            if chunk:
                *done, rest = (rest + chunk).split(b"\n")
                self._add_lines([ln.decode(errors="replace") + "\n" for ln in done])
            elif exited:
                if rest:
                    self._add_lines([rest.decode(errors="replace")])
                with self._lock:
                    self._new.notify_all()
                return
            else:
                time.sleep(LOG_POLL)

    def _add_lines(self, lines: list[str]) -> None:
        seen = time.monotonic()
        with self._lock:
            for line in lines:
                self.lines.append(line)
                m = LINE.search(line)
                if m:
                    self.calls.append(CallLine(m[1], m[2], m[3], float(m[4]), m[5], seen))
            self._new.notify_all()

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    def _read_target(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                m = re.search(r"serving on (\S+?:\d+)", line)
                if m:
                    found.append(m.group(1))
                    return
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        return found[0]

    def call_line(self, request_id: str, timeout: float = 120.0) -> CallLine | None:
        """The log line of the call with this request id (waits for it)."""
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                for c in reversed(self.calls):
                    if c.request_id == request_id:
                        return c
                left = end - time.monotonic()
                if left <= 0 or not self.alive():
                    return None
                self._new.wait(min(left, 0.5))

    def tracebacks(self) -> list[str]:
        """Log lines that start a Python traceback (a bug on the server's side)."""
        with self._lock:
            return [ln for ln in self.lines if "Traceback" in ln or " ERROR " in ln]

    # -- calls ------------------------------------------------------------------------
    def health(self, timeout: float = 5.0) -> str:
        """The health status name ("SERVING", ...) or the error code's name."""
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                   timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name

    def info(self, timeout: float = 10.0) -> S.ServerInfo:
        return self.stub.GetServerInfo(S.GetServerInfoRequest(), timeout=timeout)

    def in_flight(self) -> int:
        """calls_in_flight minus this GetServerInfo call itself."""
        return self.info().stats.calls_in_flight - 1

    def wait_idle(self, limit: float = 300.0) -> float:
        """Poll every 10 ms until no call is in flight; the time.monotonic() at which the
        server was seen idle. RuntimeError after `limit` seconds."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.in_flight() == 0:
                return time.monotonic()
            time.sleep(0.01)
        raise RuntimeError(f"the server stayed busy for {limit} s")


def mb(n: float) -> str:
    """Bytes as MB with one decimal."""
    return f"{n / 1e6:.1f} MB"


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan when empty."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return v[k]


def table(rows, headers) -> str:
    """A plain text table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for k, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
