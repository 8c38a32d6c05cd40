"""Load: 8 client processes × 2,000 mixed well-formed calls, with a health-check loop.

One server subprocess (default flags: --max-concurrent-rpcs 8; bench/_server.py,
127.0.0.1:0, address space capped at 6 GB). Two graphs: the seed example
z = x*x + x*y + 2 and a 1,000-node random scalar DAG over 8 inputs (bench/core_timing's
`random_scalar_graph`). Their gradient and plain-evaluation handles are compiled first;
then each of --clients processes (own channel) makes --calls calls, each picking a
graph and one of:

- `Gradient/handle` (30%): value and gradient by handle;
- `Gradient/graph` (10%): the graph sent again (a cache hit on the server);
- `Evaluate/handle` (25%);
- `EvaluateStream` (20%): target by handle, then 3 feeds (3 responses);
- `GetServerInfo` (15%).

Every answer is checked against the in-process result (adsvc.local()); a wrong value
counts as an error. Meanwhile the main process checks grpc.health.v1 every 20 ms and
samples the server's RSS.

Printed: per call kind the count, errors, busy rejections, p50/p99/max latency; the
throughput; the health checks (count, not SERVING, p99); RSS before, after and most
seen. Promise (README "What the service promises"): 0 errors other than the documented
RESOURCE_EXHAUSTED "server is busy" rejections (counted separately; with 8 clients and
8 slots there should be none), every health check SERVING. RSS growth is printed, not
checked (the cache legitimately holds the compiled graphs). Exit status 1 if broken.

    python bench/load.py [--quick] [--clients N] [--calls M]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor

import grpc
import numpy as np
from _server import CHANNEL_OPTIONS, BenchServer, mb, percentile, table
from core_timing import random_scalar_graph

import adsvc
from adsvc_protocol.proto import ir_pb2, service_pb2_grpc
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

KINDS = (("Gradient/handle", 0.30), ("Gradient/graph", 0.10), ("Evaluate/handle", 0.25),
         ("EvaluateStream", 0.20), ("GetServerInfo", 0.15))
TIMEOUT = 30.0


def graphs():
    """{name: (graph, feeds, value, gradient)} with the expected results computed
    in-process."""
    big, names = random_scalar_graph(1000, 8, seed=1)
    out = {}
    for name, g, feeds in (
            ("seed", adsvc.trace(lambda x, y: x * x + x * y + 2), {"x": 3.0, "y": 4.0}),
            ("dag1k", big, {n: 0.1 * (i + 1) for i, n in enumerate(names)})):
        with adsvc.local() as c:
            value, grad = c.value_and_grad(g, **feeds)
        out[name] = (g, feeds, float(value), {k: float(v) for k, v in grad.items()})
    return out


def setup(stub) -> dict:
    """Compile every graph for a gradient and for plain evaluation: the picklable plan
    the clients follow."""
    plan = {}
    for name, (g, feeds, value, grad) in graphs().items():
        proto = adsvc.to_proto(g)
        inputs = {k: to_tensor(np.float64(v)) for k, v in feeds.items()}
        gr = stub.Gradient(S.GradientRequest(graph=proto, inputs=inputs), timeout=60)
        ev = stub.Differentiate(S.DifferentiateRequest(graph=proto, omit_graph=True),
                                timeout=60)
        plan[name] = {"graph": proto.SerializeToString(), "grad_handle": gr.handle,
                      "eval_handle": ev.handle, "out": ev.outputs[0].name,
                      "feeds": {k: t.SerializeToString() for k, t in inputs.items()},
                      "value": value, "grad": grad}
    return plan


def _close(a, b) -> bool:
    return bool(np.allclose(a, b, rtol=1e-9, atol=1e-12))


def _feeds(p) -> dict:
    return {k: ir_pb2.Tensor.FromString(raw) for k, raw in p["feeds"].items()}


def one_call(stub, kind: str, p: dict) -> bool:
    """Make one call of `kind` for graph plan `p`; True if the answer is right."""
    feeds = _feeds(p)
    if kind.startswith("Gradient"):
        req = S.GradientRequest(inputs=feeds)
        if kind.endswith("handle"):
            req.handle = p["grad_handle"]
        else:
            req.graph.ParseFromString(p["graph"])
        r = stub.Gradient(req, timeout=TIMEOUT)
        grads = {k: float(from_tensor(t)) for k, t in r.gradients.items()}
        return _close(float(from_tensor(r.value)), p["value"]) and grads.keys() == \
            p["grad"].keys() and all(_close(grads[k], v) for k, v in p["grad"].items())
    if kind == "Evaluate/handle":
        r = stub.Evaluate(S.EvaluateRequest(handle=p["eval_handle"], inputs=feeds),
                          timeout=TIMEOUT)
        return _close(float(from_tensor(r.outputs[p["out"]])), p["value"])
    if kind == "EvaluateStream":
        msgs = [S.EvaluateStreamRequest(target=S.StreamTarget(handle=p["eval_handle"]))]
        msgs += [S.EvaluateStreamRequest(feed=S.Feed(inputs=feeds)) for _ in range(3)]
        rs = list(stub.EvaluateStream(iter(msgs), timeout=TIMEOUT))
        return len(rs) == 3 and all(
            _close(float(from_tensor(r.outputs[p["out"]])), p["value"]) for r in rs)
    info = stub.GetServerInfo(S.GetServerInfoRequest(), timeout=TIMEOUT)
    return info.limits.max_concurrent_rpcs > 0


def client(target: str, index: int, calls: int, plan: dict) -> tuple[list[tuple], float,
                                                                    float]:
    """One client process: ([(kind, graph, status, seconds, details)], wall-clock start
    and end of its calls)."""
    rng = random.Random(index)
    began = time.time()
    kinds, weights = [k for k, _ in KINDS], [w for _, w in KINDS]
    out = []
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = service_pb2_grpc.AutodiffServiceStub(ch)
        for _ in range(calls):
            kind = rng.choices(kinds, weights)[0]
            name = rng.choice(sorted(plan))
            start = time.perf_counter()
            try:
                ok = one_call(stub, kind, plan[name])
                code, details = ("OK", "") if ok else ("WRONG_ANSWER", "")
            except grpc.RpcError as e:
                code, details = e.code().name, e.details() or ""
            out.append((kind, name, code, time.perf_counter() - start, details[:200]))
    return out, began, time.time()


class Watch:
    """A thread checking health every 20 ms and sampling RSS every 0.5 s."""

    def __init__(self, server: BenchServer):
        self.server, self.stop = server, threading.Event()
        self.health: list[tuple[str, float]] = []
        self.rss: list[int] = [server.rss()]
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.02):
            start = time.perf_counter()
            status = self.server.health(timeout=2.0)
            self.health.append((status, time.perf_counter() - start))
            if time.monotonic() - last > 0.5 and self.server.alive():
                self.rss.append(self.server.rss())
                last = time.monotonic()


def report(results: list[tuple], elapsed: float, watch: Watch) -> list[str]:
    by_kind: dict[str, list] = defaultdict(list)
    for r in results:
        by_kind[r[0]].append(r)
    rows = []
    for kind, _ in KINDS:
        rs = by_kind[kind]
        lat = [r[3] for r in rs]
        busy = sum(1 for r in rs if r[2] == "RESOURCE_EXHAUSTED" and "busy" in r[4])
        errors = sum(1 for r in rs if r[2] != "OK") - busy
        rows.append((kind, len(rs), errors, busy, f"{percentile(lat, 50) * 1000:.2f}",
                     f"{percentile(lat, 99) * 1000:.2f}", f"{max(lat, default=0) * 1000:.1f}"))
    print(table(rows, ("call", "calls", "errors", "busy", "p50 ms", "p99 ms", "max ms")))
    health = Counter(s for s, _ in watch.health)
    hl = [t for _, t in watch.health]
    print(f"throughput {len(results) / elapsed:.0f} calls/s ({len(results)} calls in "
          f"{elapsed:.1f} s); health checks {len(hl)}: {dict(health)}, p50 "
          f"{percentile(hl, 50) * 1000:.1f} ms, p99 {percentile(hl, 99) * 1000:.1f} ms")
    broken = [f"{r[0]} ({r[1]}): {r[2]} {r[4]}" for r in results
              if r[2] != "OK" and not (r[2] == "RESOURCE_EXHAUSTED" and "busy" in r[4])]
    broken += [f"health check: {s}" for s, _ in watch.health if s != "SERVING"]
    return broken


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="250 calls per client")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--calls", type=int, default=None, help="per client (default 2,000)")
    args = p.parse_args(argv)
    calls = args.calls or (250 if args.quick else 2_000)
    with BenchServer() as server:
        plan = setup(server.stub)
        before = server.rss()
        print(f"server {server.target} pid {server.pid}: {args.clients} clients x {calls} "
              f"calls; RSS after setup {mb(before)}")
        watch = Watch(server)
        watch.thread.start()
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.clients, mp_context=ctx) as pool:
            futures = [pool.submit(client, server.target, k, calls, plan)
                       for k in range(args.clients)]
            done = [f.result() for f in futures]
        results = [r for rs, _, _ in done for r in rs]
        elapsed = max(e for _, _, e in done) - min(b for _, b, _ in done)
        watch.stop.set()
        watch.thread.join()
        after = server.rss()
        broken = report(results, elapsed, watch)
        print(f"RSS before {mb(before)}, after {mb(after)} (growth {mb(after - before)}), "
              f"most seen {mb(max(watch.rss))}")
        if not server.alive():
            broken.append("the server died")
        for b in broken[:20]:
            print("BROKEN:", b)
        busy = sum(1 for r in results if r[2] == "RESOURCE_EXHAUSTED" and "busy" in r[4])
        print(f"summary: {len(results)} calls, {len(broken)} errors/broken, {busy} busy "
              f"rejections, {len(results) / elapsed:.0f} calls/s, RSS growth "
              f"{mb(after - before)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
