"""Memory bombs: small (or merely large) requests built to exhaust a server's memory.

Against one server subprocess with default limits (bench/_server.py: 127.0.0.1:0,
address space capped at 6 GB so a regression cannot eat the machine), each bomb is sent
once, in this order, and its status, message, client-observed time, the server's RSS
after it and the server's peak RSS (VmHWM) so far are printed:

1. `grad_sin120`: Gradient (reverse) of sum(sin^120(broadcast_to(x, [16M]))): a few
   hundred bytes whose backward sweep keeps 120 vectors of 128 MB alive (~15 GB).
2. `live40`: Evaluate of a forward graph holding 40 vectors of 16M float64 alive at
   once in any evaluation order (~5.4 GB planned; one scalar output, so the response
   size is not what refuses it).
3. `order4_chain`: Differentiate, order 4 reverse, of a 60,000-node sin chain.
4. `labels30mb`: forty 1-node graphs (Differentiate) whose node label is 30 MB.
5. `feed_name2mb`: Evaluate with a feed named by 2 MB of text.
6. `output_name2mb`: Evaluate of a graph whose output name is 2 MB.
7. `broadcast_huge`: a graph broadcasting a scalar to 2**40 elements (a view).

Every call has a 20 s deadline (a bomb that is not refused is stopped there); RSS is
read once the server has no call in flight.

Promise (README "What the service promises"): each bomb is refused, with
RESOURCE_EXHAUSTED or INVALID_ARGUMENT and a message, within 1 s as the client sees
it, and the server's RSS grows by less than 100 MB across the whole set; the server
answers health afterwards.

Then the cache bomb, `cache_fill`: N graphs each holding a different float32 constant
of 16M elements (64 MB, just under the message limit) compiled (Differentiate, no
differentiation, omit_graph) so that each one is cached. These are legal requests, so
the promise is not a refusal but a bound: the server's RSS grows by at most
--max-cache-bytes (default 1 GiB) + 100 MB however many are sent.

The script exits 1 if a promise is broken. `--quick` sends 8 labels and 8 constants
instead of 40 and 24; `--flag` passes a flag to the server (repeatable, e.g.
`--flag=--max-eval-bytes=2147483648`).

    python bench/memory_bombs.py [--quick] [--flag=--max-eval-bytes=N ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import grpc
import numpy as np
from _server import BenchServer, mb, table

import adsvc
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import to_tensor

BIG = 16_000_000  # the default element limit: a float64 vector of 128 MB
F64 = ir_pb2.DTYPE_FLOAT64
REFUSED = {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}
MAX_SECONDS = 1.0
MAX_GROWTH = 100e6


def scalar_graph(nodes, outputs, inputs=(("x", ()),)) -> ir_pb2.Graph:
    """A float64 graph: inputs [(name, dims)] get ids 0.., nodes [(id, op, operands,
    attrs, label)], outputs [(name, id)]."""
    g = ir_pb2.Graph(ir_version=1, opset_version=1)
    for i, (name, dims) in enumerate(inputs):
        g.inputs.add(id=i, name=name, type=ir_pb2.TensorType(dtype=F64, dims=list(dims)))
    for nid, op, operands, attrs, label in nodes:
        n = g.nodes.add(id=nid, op=op, operands=operands, label=label)
        for k, v in attrs.items():
            n.attrs[k].CopyFrom(v)
    for name, nid in outputs:
        g.outputs.add(name=name, id=nid)
    return g


def ints(values) -> ir_pb2.AttrValue:
    return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=list(values)))


def sin_tower(n_sins: int = 120, size: int = BIG) -> ir_pb2.Graph:
    def f(x):
        v = adsvc.broadcast_to(x, [size])
        for _ in range(n_sins):
            v = adsvc.sin(v)
        return adsvc.sum(v)
    return adsvc.to_proto(adsvc.trace(f))


def live_vectors(count: int = 40, size: int = BIG) -> ir_pb2.Graph:
    """count vectors v_i, then s = sum_i sum(v_i), then sum_i sum(v_i * s): every v_i is
    used after s, which needs all of them, so all are alive at once in any order."""
    def f(x):
        vs = [adsvc.sin(adsvc.broadcast_to(x, [size]) * float(i + 1)) for i in range(count)]
        s = adsvc.sum(vs[0])
        for v in vs[1:]:
            s = s + adsvc.sum(v)
        total = adsvc.sum(vs[0] * s)
        for v in vs[1:]:
            total = total + adsvc.sum(v * s)
        return total
    return adsvc.to_proto(adsvc.trace(f))


def sin_chain(n: int) -> ir_pb2.Graph:
    return scalar_graph([(i, "sin", [i - 1], {}, "") for i in range(1, n + 1)], [("z", n)])


X = {"x": to_tensor(0.5)}


def bombs(n_labels: int):
    """(name, rpc, count, make(i) -> request) of the refused set (built one at a time:
    forty 30 MB requests are not held at once)."""
    neg = [(1, "neg", [0], {}, "")]
    return [
        ("grad_sin120", "Gradient", 1, lambda i: S.GradientRequest(graph=sin_tower(),
                                                                   inputs=X)),
        ("live40", "Evaluate", 1, lambda i: S.EvaluateRequest(graph=live_vectors(),
                                                              inputs=X)),
        ("order4_chain", "Differentiate", 1, lambda i: S.DifferentiateRequest(
            graph=sin_chain(60_000), omit_graph=True,
            differentiation=S.Differentiation(modes=[S.MODE_REVERSE], order=4))),
        ("labels30mb", "Differentiate", n_labels, lambda i: S.DifferentiateRequest(
            graph=scalar_graph([(1, "neg", [0], {}, chr(65 + i % 26) * 30_000_000)],
                               [("z", 1)]), omit_graph=True)),
        ("feed_name2mb", "Evaluate", 1, lambda i: S.EvaluateRequest(
            graph=scalar_graph(neg, [("z", 1)]),
            inputs={**X, "n" * 2_000_000: to_tensor(1.0)})),
        ("output_name2mb", "Evaluate", 1, lambda i: S.EvaluateRequest(
            graph=scalar_graph(neg, [("o" * 2_000_000, 1)]), inputs=X)),
        ("broadcast_huge", "Evaluate", 1, lambda i: S.EvaluateRequest(graph=scalar_graph(
            [(1, "broadcast_to", [0], {"shape": ints([2**20, 2**20])}, ""),
             (2, "sum", [1], {}, "")], [("z", 2)]), inputs=X)),
    ]


def send(server: BenchServer, rpc: str, request, timeout: float = 20.0):
    """(status name, details, seconds, log status) of one call."""
    rid = uuid.uuid4().hex
    start = time.perf_counter()
    try:
        getattr(server.stub, rpc)(request, timeout=timeout,
                                  metadata=(("x-request-id", rid),))
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    seconds = time.perf_counter() - start
    if server.alive():
        server.wait_idle(120)  # a bomb that was not refused may still be running
    line = server.call_line(rid, timeout=10)
    return code, details, seconds, line.status if line else "-"


# the server trims its heap 1 s after the last big call (service.HeapTrimmer.DELAY)
TRIM_PAUSE = 1.5


def run_refused(server: BenchServer, n_labels: int) -> tuple[list, list[str]]:
    rows, broken = [], []
    for name, rpc, count, make in bombs(n_labels):
        before = server.rss()
        worst, statuses, logs, message = 0.0, set(), set(), ""
        for i in range(count):
            code, details, seconds, logged = send(server, rpc, make(i))
            worst = max(worst, seconds)
            statuses.add(code)
            logs.add(logged)
            message = message or details
            if code not in REFUSED or seconds > MAX_SECONDS:
                broken.append(f"{name}: {code} in {seconds:.2f}s (logged {logged}): "
                              f"{details[:160]}")
            if not server.alive():
                broken.append(f"{name}: the server died (exit {server.proc.returncode})")
                break
        time.sleep(TRIM_PAUSE)  # the server trims its heap once big calls pause
        rows.append((name, f"{count}x {rpc}", "/".join(sorted(statuses)), "/".join(sorted(logs)),
                     f"{worst:.3f}", mb(server.rss()), mb(server.rss() - before),
                     mb(server.peak_rss()), message[:80]))
        if not server.alive():
            break
    return rows, broken


def cache_constant(i: int) -> S.DifferentiateRequest:
    g = ir_pb2.Graph(ir_version=1, opset_version=1)
    g.inputs.add(id=0, name="x", type=ir_pb2.TensorType(dtype=ir_pb2.DTYPE_FLOAT32,
                                                        dims=[BIG]))
    g.nodes.add(id=1, op="constant",
                value=to_tensor(np.full(BIG, float(i), dtype=np.float32)))
    g.nodes.add(id=2, op="add", operands=[0, 1])
    g.outputs.add(name="z", id=2)
    return S.DifferentiateRequest(graph=g, omit_graph=True)


def run_cache_fill(server: BenchServer, n: int, budget: int) -> tuple[list, list[str]]:
    before = server.rss()
    codes: dict[str, int] = {}
    worst = 0.0
    for i in range(n):
        code, details, seconds, _ = send(server, "Differentiate", cache_constant(i))
        codes[code] = codes.get(code, 0) + 1
        worst = max(worst, seconds)
        if not server.alive():
            break
    time.sleep(TRIM_PAUSE)  # the server trims its heap once big calls pause
    growth = server.rss() - before
    info = server.info().stats
    row = ("cache_fill", f"{n}x Differentiate (64 MB constant)",
           " ".join(f"{k}:{v}" for k, v in sorted(codes.items())), "", f"{worst:.3f}",
           mb(server.rss()), mb(growth), mb(server.peak_rss()),
           f"cache_size={info.cache_size} (--max-cache-bytes {mb(budget)})")
    broken = []
    if growth > budget + MAX_GROWTH:
        broken.append(f"cache_fill: RSS grew {mb(growth)} with {info.cache_size} graphs "
                      f"cached; --max-cache-bytes is {mb(budget)}")
    if set(codes) - {"OK", "RESOURCE_EXHAUSTED"}:
        broken.append(f"cache_fill: statuses {codes}")
    return [row], broken


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 labels and 8 constants")
    p.add_argument("--flag", action="append", default=[], help="a server flag")
    args = p.parse_args(argv)
    n_labels, n_constants = (8, 8) if args.quick else (40, 24)
    with BenchServer(*args.flag) as server:
        limits = server.info().limits
        print(f"server {server.target} pid {server.pid} flags {args.flag or 'default'}: "
              f"max_eval_bytes={mb(limits.max_eval_bytes)} "
              f"max_cache_bytes={mb(limits.max_cache_bytes)}")
        start_rss = server.rss()
        print(f"RSS at start {mb(start_rss)}")
        rows, broken = run_refused(server, n_labels)
        growth = server.rss() - start_rss if server.alive() else float("nan")
        if server.alive():
            if growth > MAX_GROWTH:
                broken.append(f"refused set: RSS grew {mb(growth)}")
            if server.health() != "SERVING":
                broken.append("health is not SERVING after the refused set")
            more, more_broken = run_cache_fill(server, n_constants, limits.max_cache_bytes)
            rows += more
            broken += more_broken
        print(table(rows, ("bomb", "calls", "status", "logged", "worst s", "RSS after", "growth",
                           "peak RSS", "message")))
        for b in broken:
            print("BROKEN:", b)
        print(f"summary: {len(rows)} bombs, refused-set RSS growth {mb(growth)}, "
              f"{len(broken)} broken promise(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
