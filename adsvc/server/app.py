"""Building and running the server: `create_server`, `serve` (graceful SIGTERM,
supervised workers), and the `adsvc serve` flags (`add_serve_arguments`,
`run_from_args`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adsvc.server import access_log, tls
from adsvc.server.config import ServerConfig
from adsvc.server.service import AutodiffServicer, add_to_server, limit_heap_arenas
from adsvc_protocol.proto import service_pb2
from adsvc_protocol.secrets import read_secret_file

log = logging.getLogger("adsvc.server")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["AutodiffService"].full_name

# Supervision of `--workers N`: a worker that dies is restarted; one that dies within
# MIN_UPTIME seconds of starting has failed "immediately", and its restart waits
# FAST_RESTART_DELAY * 2**(k-1) seconds after the k-th such failure in a row (a
# healthy worker that dies is restarted after RESTART_DELAY). After MAX_FAST_FAILURES
# immediate failures in a row the server gives up: it stops every worker and exits 1.
RESTART_DELAY = 0.1
FAST_RESTART_DELAY = 0.2
MAX_RESTART_DELAY = 5.0
MIN_UPTIME = 5.0
MAX_FAST_FAILURES = 5
STOP_MARGIN = 10.0  # beyond drain + grace, before a worker that will not stop is killed


def create_server(address: str = "127.0.0.1:0", config: ServerConfig | None = None,
                  reuse_port: bool = False) -> tuple[grpc.Server, int]:
    """A synchronous gRPC server (thread pool: CPU-bound work stays off any event loop)
    with the adsvc service, health and reflection, bound to `address` but not started;
    TLS (mTLS with a client CA) when the config names certificate files.

    The servicer and the health servicer are reachable as `server.adsvc_servicer` and
    `server.adsvc_health`. Raises OSError if the address cannot be bound and
    `tls.TLSConfigError` for bad TLS files. `reuse_port` (SO_REUSEPORT) lets several
    worker processes share the port; off by default so that a port already in use is
    an error rather than a silently shared port.
    """
    config = config or ServerConfig()
    limit_heap_arenas()
    credentials = tls.server_credentials(config)
    size = config.max_message_bytes or -1
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    # No gRPC-level concurrency limit: it would count health checks too. Admission is
    # the servicer's slots (max_concurrent_rpcs adsvc calls; more answer
    # RESOURCE_EXHAUSTED at once), and the pool has spare threads beyond the slots
    # (config.pool_threads) so health, reflection and GetServerInfo always find one.
    pool = futures.ThreadPoolExecutor(max_workers=config.pool_threads,
                                      thread_name_prefix="adsvc-rpc")
    server = grpc.server(pool, options=options)
    servicer = AutodiffServicer(config)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"could not bind {address}: {e}") from None
    if not port:
        raise OSError(f"could not bind {address}")
    server.adsvc_servicer = servicer
    server.adsvc_health = health_servicer
    return server, port


def join_host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets ("[::1]:50051")."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _stop_event() -> threading.Event:
    """An event set by SIGTERM/SIGINT (when called from the main thread)."""
    stop = threading.Event()
    with contextlib.suppress(ValueError):  # not the main thread: the caller stops us
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def _shutdown(server: grpc.Server, config: ServerConfig) -> None:
    """Graceful shutdown: tell health checkers first, keep serving for the drain
    period, then refuse new calls and give in-flight calls the grace period; log how
    many calls were cut short."""
    log.info("shutting down: health NOT_SERVING, drain %.1fs, grace %.1fs",
             config.drain_seconds, config.grace_seconds)
    server.adsvc_health.enter_graceful_shutdown()
    if config.drain_seconds > 0:
        threading.Event().wait(config.drain_seconds)
    servicer = server.adsvc_servicer
    counters = servicer.counters
    at_stop = counters["calls_in_flight"]
    servicer.stopping = True  # calls ending CANCELLED from now on were cut short
    server.stop(config.grace_seconds).wait()
    end = time.monotonic() + 2.0  # handlers notice the cancellation at their next check
    while counters["calls_in_flight"] and time.monotonic() < end:
        time.sleep(0.01)
    left = counters["cut_short"] + counters["calls_in_flight"]
    servicer.access.flush()  # the access lines of the calls that ended, before these
    if left:
        log.warning("stopped: %d of %d call(s) in flight were still running when the "
                    "%.1fs grace period ran out (cancelled)", left, at_stop,
                    config.grace_seconds)
    else:
        log.info("stopped: %d call(s) were in flight at shutdown, all finished within the "
                 "%.1fs grace period", at_stop, config.grace_seconds)


def _serve_one(address: str, config: ServerConfig, announce: bool,
               stop: threading.Event | None = None, ready=None) -> int:
    server, port = create_server(address, config, reuse_port=ready is not None)
    server.start()
    metrics = None
    if config.metrics_port is not None:
        metrics, _ = server.adsvc_servicer.metrics.serve_http(config.metrics_port,
                                                               address.rsplit(":", 1)[0]
                                                               .strip("[]"))
        log.info("metrics on http://%s:%s/metrics", address.rsplit(":", 1)[0],
                 metrics.server_port)
    if ready is not None:
        ready.set()
    host = address.rsplit(":", 1)[0]
    scheme = "TLS" if tls.enabled(config) else "plaintext"
    if announce:
        print(f"adsvc serving on {host}:{port} (pid {os.getpid()}, {scheme})", flush=True)
    log.info("serving on %s:%s pid=%s %s", host, port, os.getpid(), scheme)
    stop = stop or _stop_event()
    while not stop.wait(0.5):
        pass
    _shutdown(server, config)
    if metrics is not None:
        metrics.shutdown()
    return 0


@contextlib.contextmanager
def _reserve_port(host: str, port: int):
    """Bind a SO_REUSEPORT socket so every worker can bind the same (possibly ephemeral)
    port; held open until the workers exit (grpc examples/python/multiprocessing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _worker_main(address: str, config: ServerConfig, ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        code = _serve_one(address, config, announce=False, ready=ready)
    except (OSError, RuntimeError) as e:
        log.error("worker pid %s cannot serve on %s: %s", os.getpid(), address, e)
        code = 1
    sys.exit(code)


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, from its multiprocessing exit code (negative: a signal)."""
    if exitcode is None:
        return "is running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (signal {-exitcode})"
    return f"exited with code {exitcode}"


class _Slot:
    """One supervised worker: its process, when it started, its immediate failures."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.ready = None
        self.started = 0.0
        self.fast_failures = 0
        self.restart_at: float | None = None


class Supervisor:
    """Runs `workers` server processes on one address and restarts those that die
    (see MIN_UPTIME and MAX_FAST_FAILURES for the back-off and when it gives up)."""

    def __init__(self, address: str, config: ServerConfig, workers: int):
        self.address, self.config = address, config
        self.ctx = multiprocessing.get_context("fork")
        self.slots = [_Slot(i) for i in range(workers)]

    def _spawn(self, slot: _Slot) -> None:
        slot.ready = self.ctx.Event()
        config = self.config  # worker i serves its metrics on --metrics-port + i
        if config.metrics_port:
            config = dataclasses.replace(config, metrics_port=config.metrics_port + slot.index)
        slot.proc = self.ctx.Process(target=_worker_main, daemon=False,
                                     args=(self.address, config, slot.ready))
        slot.proc.start()
        slot.started = time.monotonic()
        slot.restart_at = None

    def start(self) -> list[int]:
        """Start every worker and wait until each listens; their pids. Raises
        RuntimeError (after stopping the others) if one exits before it listens."""
        for slot in self.slots:
            self._spawn(slot)
        for slot in self.slots:
            while not slot.ready.wait(0.5):
                if not slot.proc.is_alive():
                    self.stop()
                    raise RuntimeError(f"worker {slot.proc.pid} "
                                       f"{describe_exit(slot.proc.exitcode)}")
        return [slot.proc.pid for slot in self.slots]

    def _died(self, slot: _Slot, now: float) -> bool:
        """Schedule the restart of a dead worker; False to give up."""
        uptime = now - slot.started
        slot.fast_failures = slot.fast_failures + 1 if uptime < MIN_UPTIME else 0
        how = describe_exit(slot.proc.exitcode)
        if slot.fast_failures >= MAX_FAST_FAILURES:
            log.error("worker %d (pid %d) %s %.1fs after it started, %d times in a row; "
                      "giving up", slot.index, slot.proc.pid, how, uptime,
                      slot.fast_failures)
            return False
        delay = (min(MAX_RESTART_DELAY, FAST_RESTART_DELAY * 2 ** (slot.fast_failures - 1))
                 if slot.fast_failures else RESTART_DELAY)
        log.warning("worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                    slot.index, slot.proc.pid, how, uptime, delay)
        slot.restart_at = now + delay
        return True

    def check(self) -> bool:
        """Notice dead workers and restart them when their delay is over; False when a
        worker keeps failing immediately (give up)."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is None:
                if not slot.proc.is_alive() and not self._died(slot, now):
                    return False
            elif now >= slot.restart_at:
                old = slot.proc.pid
                self._spawn(slot)
                log.warning("restarted worker %d: pid %d (was pid %d)", slot.index,
                            slot.proc.pid, old)
        return True

    def stop(self) -> bool:
        """SIGTERM every live worker (each drains and finishes its calls within the
        grace period), wait, kill any still running after drain + grace + STOP_MARGIN;
        True if every worker exited with code 0."""
        procs = [s.proc for s in self.slots if s.proc is not None and s.restart_at is None]
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        end = time.monotonic() + (self.config.drain_seconds + self.config.grace_seconds
                                  + STOP_MARGIN)
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join()
            log.info("worker pid %d %s", p.pid, describe_exit(p.exitcode))
        return all(p.exitcode == 0 for p in procs)


def serve(host: str = "127.0.0.1", port: int = 50051, config: ServerConfig | None = None,
          workers: int = 1, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set); returns an exit code.

    With workers > 1, that many processes serve the same port (SO_REUSEPORT); they are
    forked before any gRPC object exists in this process, and restarted when they die
    (`Supervisor`). TLS files are checked first (`tls.TLSConfigError`).
    """
    config = config or ServerConfig()
    tls.check(config)
    if workers <= 1:
        return _serve_one(join_host_port(host, port), config, announce=True, stop=stop)
    with _reserve_port(host, port) as bound:
        address = join_host_port(host, bound)
        stop = stop or _stop_event()  # before forking: a SIGTERM now still stops all
        supervisor = Supervisor(address, config, workers)
        pids = supervisor.start()
        print(f"adsvc serving on {address} (workers {workers}, pids "
              f"{' '.join(str(p) for p in pids)}, "
              f"{'TLS' if tls.enabled(config) else 'plaintext'})", flush=True)
        healthy = True
        while healthy and not stop.wait(0.1):
            healthy = supervisor.check()
        log.info("stopping %d workers", workers)
        clean = supervisor.stop()
    return 0 if healthy and clean else 1


# -- command line -------------------------------------------------------------------------
_LIMIT_FLAGS = {
    "max_message_bytes": "largest request/response message in bytes",
    "max_nodes": "most inputs+nodes in a received graph",
    "max_compiled_nodes": "most inputs+nodes in a differentiated graph",
    "max_tensor_elements": "most elements in any tensor (constants, feeds, results)",
    "max_order": "most differentiation passes per request",
    "max_stream_feeds": "most feeds in one EvaluateStream call",
    "cache_entries": "compiled graphs kept in the LRU cache",
    "max_cache_nodes": "compiled nodes kept in the LRU cache in total",
    "max_cache_bytes": "bytes of compiled graphs, plans and constants kept in the cache",
    "max_eval_bytes": "peak bytes of live values one evaluation may plan for",
    "max_name_bytes": "longest input/output name or node label in bytes",
    "threads": "RPC worker threads per process",
    "max_concurrent_rpcs": "adsvc calls in progress at once; more get RESOURCE_EXHAUSTED",
}


class ServeError(Exception):
    """A wrong `adsvc serve` setting: a one-line message and the exit status (2 for a
    bad command line, 1 for a file that cannot be used)."""

    def __init__(self, message: str, exit_status: int = 2):
        super().__init__(message)
        self.exit_status = exit_status


def _port(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `adsvc serve`."""
    default = ServerConfig()
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=_port, default=50051,
                        help="port 0..65535 (default 50051; 0 picks a free one, printed "
                             "at start)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port (SO_REUSEPORT); one that "
                             "dies is restarted")
    for name, doc in _LIMIT_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(default, name),
                            help=f"{doc} (default {getattr(default, name)}; 0 = no limit)"
                            if name.startswith("max") else f"{doc} (default "
                            f"{getattr(default, name)})")
    parser.add_argument("--stream-idle-seconds", type=float,
                        default=default.stream_idle_seconds,
                        help="cancel an EvaluateStream call that waits this long for its "
                             f"next message (default {default.stream_idle_seconds}; 0 = never)")
    parser.add_argument("--grace", type=float, default=default.grace_seconds,
                        help="seconds in-flight calls may take to finish after SIGTERM "
                             f"(default {default.grace_seconds})")
    parser.add_argument("--drain", type=float, default=default.drain_seconds,
                        help="seconds to report NOT_SERVING before refusing new calls")
    _add_security_arguments(parser)
    _add_deployment_arguments(parser)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS and token flags of `adsvc serve`."""
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="serve TLS with this certificate chain (needs --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="require client certificates signed by this CA bundle (mTLS)")
    parser.add_argument("--token", default=None,
                        help="require 'authorization: Bearer TOKEN' on every call except "
                             "health and reflection (default: $ADSVC_TOKEN; unset = open). "
                             "Visible in the process list: prefer --token-file")
    parser.add_argument("--token-file", metavar="PATH",
                        help="read the token from the first line of this file")


def _add_deployment_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared-store and metrics flags of `adsvc serve`."""
    default = ServerConfig()
    parser.add_argument("--store", metavar="redis://HOST:PORT/DB",
                        help="share compiled graphs with other replicas through this Redis "
                             "(default: none, the in-process cache only)")
    parser.add_argument("--store-secret-file", metavar="PATH",
                        help="sign and check stored graphs with the secret in this file "
                             "(the same file on every replica)")
    parser.add_argument("--store-ttl", type=int, default=default.store_ttl_seconds,
                        metavar="S", help="seconds a stored compiled graph lives "
                        f"(default {default.store_ttl_seconds})")
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (with "
                             "--workers N, worker i on PORT+i; default: off)")


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, else the first line of --token-file, else
    $ADSVC_TOKEN; None for an open server."""
    path = getattr(args, "token_file", None)
    if args.token and path:
        raise ServeError("give --token or --token-file, not both")
    if not path:
        return args.token or os.environ.get("ADSVC_TOKEN") or None
    token = read_secret_file(path, "--token-file", lambda m: ServeError(m, 1))
    if not token:
        raise ServeError(f"the token file {path!r} is empty: its first line is the token", 1)
    return token


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `adsvc serve` flags (see `add_serve_arguments`).
    Raises ServeError for a token given twice or a token file that cannot be read."""
    names = {f.name for f in fields(ServerConfig)}
    kw = {k: getattr(args, k) for k in _LIMIT_FLAGS if k in names}
    return ServerConfig(**kw, grace_seconds=args.grace, drain_seconds=args.drain,
                        stream_idle_seconds=args.stream_idle_seconds, token=_token(args),
                        tls_cert=getattr(args, "tls_cert", None),
                        tls_key=getattr(args, "tls_key", None),
                        tls_client_ca=getattr(args, "tls_client_ca", None),
                        store=_store(args), store_ttl_seconds=args.store_ttl,
                        store_secret=_store_secret(args),
                        metrics_port=args.metrics_port)


def _store_secret(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "store_secret_file", None)
    if not path:
        return None
    secret = read_secret_file(path, "--store-secret-file", lambda m: ServeError(m, 1))
    if len(secret) < 16:
        raise ServeError(f"the store secret in {path!r} is shorter than 16 bytes", 1)
    return secret.encode()


def _store(args: argparse.Namespace) -> str | None:
    url = getattr(args, "store", None)
    if url and not (url.startswith(("redis://", "rediss://")) and len(url) > 8):
        raise ServeError(f"--store must be a redis://HOST:PORT/DB address, not {url!r}")
    return url or None


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, not {args.port}")
    if args.workers < 1:
        raise ServeError(f"--workers must be >= 1, not {args.workers}")


def _warn_about_token(args: argparse.Namespace, config: ServerConfig) -> None:
    if not config.token:
        return
    if args.token:
        log.warning("the token was given with --token, which other users can read in the "
                    "process list; prefer --token-file or $ADSVC_TOKEN")
    loopback = args.host in ("localhost", "127.0.0.1", "::1", "[::1]") or \
        args.host.startswith("127.")
    if not tls.enabled(config) and not loopback:
        log.warning("a token is required but TLS is off: it crosses the network in clear "
                    "text (use --tls-cert and --tls-key)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run `adsvc serve` with parsed arguments; blocks until SIGTERM/SIGINT. Errors are
    one line on stderr ("adsvc: error: ..."): exit 2 for a bad command line, 1 when
    the server cannot start (a file, the address)."""
    logging.basicConfig(level=getattr(logging, args.log_level, logging.INFO),
                        format=access_log.FORMAT)
    try:
        _check_args(args)
        config = config_from_args(args)
        _warn_about_token(args, config)
        return serve(args.host, args.port, config, workers=args.workers)
    except ServeError as e:
        message, code = str(e), e.exit_status
    except tls.TLSConfigError as e:
        message, code = str(e), 1
    except (OSError, RuntimeError) as e:
        message, code = f"cannot serve on {join_host_port(args.host, args.port)}: {e}", 1
    print(f"adsvc: error: {message}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("adsvc: error: ...", exit 2), as the CLI's."""

    def error(self, message: str):
        """Raise a ServeError instead of printing the usage and exiting."""
        raise ServeError(f"{message} (see '{self.prog} --help')")


def main(argv=None) -> int:
    """`python -m adsvc.server`: the same as `adsvc serve`; returns the exit status."""
    parser = _Parser(prog="python -m adsvc.server", description="Run the adsvc gRPC server.")
    add_serve_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except ServeError as e:
        print(f"adsvc: error: {e}", file=sys.stderr)
        return e.exit_status
    return run_from_args(args)
