"""Building and running the server: `create_server`, `serve` (graceful SIGTERM, workers),
and the `adsvc serve` flags (`add_serve_arguments`, `run_from_args`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adsvc.server.config import ServerConfig
from adsvc.server.service import AutodiffServicer, add_to_server
from adsvc_protocol.proto import service_pb2

log = logging.getLogger("adsvc.server")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["AutodiffService"].full_name


def create_server(address: str = "127.0.0.1:0", config: ServerConfig | None = None,
                  reuse_port: bool = False) -> tuple[grpc.Server, int]:
    """A synchronous gRPC server (thread pool: CPU-bound work stays off any event loop)
    with the adsvc service, health and reflection, bound to `address` but not started.

    The servicer and the health servicer are reachable as `server.adsvc_servicer` and
    `server.adsvc_health`. Raises OSError if the address cannot be bound. `reuse_port`
    (SO_REUSEPORT) lets several worker processes share the port; off by default so that
    a port already in use is an error rather than a silently shared port.
    """
    config = config or ServerConfig()
    size = config.max_message_bytes or -1
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    # More threads than adsvc slots (config.pool_threads), so health checks, reflection
    # and GetServerInfo answer while every slot is busy; beyond the pool gRPC itself
    # answers RESOURCE_EXHAUSTED rather than queuing calls without bound.
    pool = config.pool_threads
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=pool,
                                                    thread_name_prefix="adsvc-rpc"),
                         options=options,
                         maximum_concurrent_rpcs=pool if config.max_concurrent_rpcs else None)
    servicer = AutodiffServicer(config)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
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


def _serve_one(address: str, config: ServerConfig, announce: bool,
               stop: threading.Event | None = None, ready=None) -> int:
    server, port = create_server(address, config, reuse_port=ready is not None)
    server.start()
    if ready is not None:
        ready.set()
    host = address.rsplit(":", 1)[0]
    if announce:
        print(f"adsvc serving on {host}:{port} (pid {os.getpid()})", flush=True)
    log.info("serving on %s:%s pid=%s", host, port, os.getpid())
    stop = stop or _stop_event()
    while not stop.wait(0.5):
        pass
    # Graceful shutdown: tell health checkers first, keep serving for the drain period,
    # then refuse new calls and give in-flight calls the grace period to finish.
    log.info("shutting down: health NOT_SERVING, drain %.1fs, grace %.1fs",
             config.drain_seconds, config.grace_seconds)
    server.adsvc_health.enter_graceful_shutdown()
    if config.drain_seconds > 0:
        threading.Event().wait(config.drain_seconds)
    server.stop(config.grace_seconds).wait()
    log.info("stopped")
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
    sys.exit(_serve_one(address, config, announce=False, ready=ready))


def _stop_workers(procs) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join()


def serve(host: str = "127.0.0.1", port: int = 50051, config: ServerConfig | None = None,
          workers: int = 1, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set); returns an exit code.

    With workers > 1, that many processes serve the same port (SO_REUSEPORT); they are
    forked before any gRPC object exists in this process.
    """
    config = config or ServerConfig()
    if workers <= 1:
        return _serve_one(join_host_port(host, port), config, announce=True, stop=stop)
    with _reserve_port(host, port) as bound:
        address = join_host_port(host, bound)
        ctx = multiprocessing.get_context("fork")
        ready = [ctx.Event() for _ in range(workers)]
        procs = [ctx.Process(target=_worker_main, args=(address, config, r), daemon=False)
                 for r in ready]
        for p in procs:
            p.start()
        for p, r in zip(procs, ready):  # announce only once every worker listens
            while not r.wait(0.5):
                if not p.is_alive():
                    _stop_workers(procs)
                    raise RuntimeError(f"worker {p.pid} exited with code {p.exitcode}")
        print(f"adsvc serving on {address} (workers {workers}, pids "
              f"{' '.join(str(p.pid) for p in procs)})", flush=True)
        stop = stop or _stop_event()
        while not stop.wait(0.5):
            if all(not p.is_alive() for p in procs):
                break
        _stop_workers(procs)
    return 0 if all(p.exitcode == 0 for p in procs) else 1


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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `adsvc serve`."""
    default = ServerConfig()
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=50051,
                        help="port (default 50051; 0 picks a free one, printed at start)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port (SO_REUSEPORT)")
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
                        help="seconds in-flight calls may take to finish after SIGTERM")
    parser.add_argument("--drain", type=float, default=default.drain_seconds,
                        help="seconds to report NOT_SERVING before refusing new calls")
    parser.add_argument("--token", default=os.environ.get("ADSVC_TOKEN"),
                        help="require 'authorization: Bearer TOKEN' on every call except "
                             "health and reflection (default: $ADSVC_TOKEN; unset = open)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `adsvc serve` flags (see `add_serve_arguments`)."""
    names = {f.name for f in fields(ServerConfig)}
    kw = {k: getattr(args, k) for k in _LIMIT_FLAGS if k in names}
    return ServerConfig(**kw, grace_seconds=args.grace, drain_seconds=args.drain,
                        stream_idle_seconds=args.stream_idle_seconds, token=args.token or None)


def run_from_args(args: argparse.Namespace) -> int:
    """Run `adsvc serve` with parsed arguments; blocks until SIGTERM/SIGINT."""
    logging.basicConfig(level=getattr(logging, args.log_level, logging.INFO),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s")
    if args.workers < 1:
        print("adsvc serve: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        return serve(args.host, args.port, config_from_args(args), workers=args.workers)
    except (OSError, RuntimeError) as e:
        print(f"adsvc serve: cannot serve on {join_host_port(args.host, args.port)}: {e}",
              file=sys.stderr)
        return 1


def main(argv=None) -> int:
    """`python -m adsvc.server`: the same as `adsvc serve`."""
    parser = argparse.ArgumentParser(prog="python -m adsvc.server",
                                     description="Run the adsvc gRPC server.")
    add_serve_arguments(parser)
    return run_from_args(parser.parse_args(argv))
