"""What the client libraries add to a *cached* call (compile once, evaluate many).

A random scalar DAG of N nodes (built as in core_timing.py, fixed seed, one scalar
output) is traced with `adsvc.trace`; its gradient is compiled once and then evaluated
repeatedly. Each row times one call per repeat; SDK and raw calls alternate within a
repeat, so both see the same machine noise, and the ratios are measured in this process:

1. remote, in-process server on 127.0.0.1 (port 0):
   a. SDK: `adsvc.connect(...).value_and_grad(g, **feeds)` after one warm-up call;
   b. raw: generated stubs only: a `Differentiate` request gives the handle (outside
      the timing), then each call builds an `EvaluateRequest` by handle, calls
      `stub.Evaluate` and decodes the outputs with `from_tensor`;
   c. ratio a/b (project target: <= 1.2).
2. in-process: `adsvc.local().value_and_grad(g, **feeds)` after one warm-up call versus
   `Plan(compile_graph(g, ("reverse",), None, True)).run(feeds)` (no client caches).
3. for context, the first call of 1a and of 2 (it compiles), timed once.

The SDK and raw results are compared once, outside the timing (numpy.allclose); the
script exits with status 1 if they differ. Nothing is asserted about times.

    python bench/sdk_cached_call.py [--nodes N] [--repeat R] [--inputs K]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import grpc
import numpy as np
from core_timing import random_scalar_graph  # the same random DAG

import adsvc as ad
from adsvc.passes.pipeline import compile_graph
from adsvc.runtime.plan import Plan
from adsvc.server.app import create_server
from adsvc_protocol.proto import service_pb2, service_pb2_grpc
from adsvc_protocol.tensors import from_tensor, to_tensor

TIMEOUT = 300.0  # seconds, every RPC: keeps a stuck call bounded


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def paired_times(fa, fb, repeat):
    """Per-repeat times of fa and fb, alternating (a, b), (b, a), ... against drift."""
    ta, tb = [], []
    for i in range(repeat):
        if i % 2 == 0:
            ta.append(timed(fa)[0])
            tb.append(timed(fb)[0])
        else:
            tb.append(timed(fb)[0])
            ta.append(timed(fa)[0])
    return ta, tb


def iqr(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def row(label, ts):
    lo, hi = iqr(ts)
    ms = [x * 1e3 for x in (statistics.median(ts), lo, hi, min(ts), max(ts))]
    return f"  {label:44s}" + "".join(f"{v:10.3f}" for v in ms)


def ratio_line(label, ta, tb, target=None):
    med = statistics.median(ta) / statistics.median(tb)
    paired = [a / b for a, b in zip(ta, tb)]
    lo, hi = iqr(paired)
    note = f"; target <= {target}" if target is not None else ""
    return (f"{label}: {med:.3f} (ratio of medians; paired per-repeat ratios: "
            f"median {statistics.median(paired):.3f}, IQR {lo:.3f}-{hi:.3f}{note})")


def same(label, value_a, grads_a, value_b, grads_b) -> bool:
    ok = (grads_a.keys() == grads_b.keys()
          and np.allclose(value_a, value_b, rtol=1e-12, atol=0)
          and all(np.allclose(grads_a[k], grads_b[k], rtol=1e-12, atol=1e-300)
                  for k in grads_a))
    if not ok:
        print(f"MISMATCH ({label}): value {value_a!r} vs {value_b!r}; "
              f"gradients {grads_a!r} vs {grads_b!r}", file=sys.stderr)
    return ok


def split(outputs):
    """(value of `out`, {x: grad:x}) from a {name: array} result."""
    return outputs["out"], {k[5:]: v for k, v in outputs.items() if k.startswith("grad:")}


def bench_remote(g, feeds, repeat):
    server, port = create_server("127.0.0.1:0")
    server.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    try:
        client = ad.connect(target, timeout=TIMEOUT)
        try:
            # 1a: SDK; the first call compiles on the server
            t_first, (v_sdk, g_sdk) = timed(lambda: client.value_and_grad(g, **feeds))

            # 1b: raw stubs; the handle from Differentiate (a server cache hit by now)
            stub = service_pb2_grpc.AutodiffServiceStub(channel)
            diff = stub.Differentiate(service_pb2.DifferentiateRequest(
                graph=ad.to_proto(g),
                differentiation=service_pb2.Differentiation(
                    modes=[service_pb2.MODE_REVERSE], seed=True),
                omit_graph=True), timeout=TIMEOUT)
            handle = diff.handle

            def raw_call():
                request = service_pb2.EvaluateRequest(
                    handle=handle, inputs={k: to_tensor(v) for k, v in feeds.items()})
                resp = stub.Evaluate(request, timeout=TIMEOUT)
                return {k: from_tensor(t) for k, t in resp.outputs.items()}

            v_raw, g_raw = split(raw_call())  # also the raw warm-up
            ok = same("remote SDK vs raw stubs", v_sdk, g_sdk, v_raw, g_raw)

            def sdk_call():
                return client.value_and_grad(g, **feeds)

            t_sdk, t_raw = paired_times(sdk_call, raw_call, repeat)
        finally:
            client.close()
    finally:
        channel.close()
        server.stop(0)
    return ok, t_first, t_sdk, t_raw, diff.stats


def bench_local(g, feeds, repeat):
    client = ad.local()
    t_first, (v_loc, g_loc) = timed(lambda: client.value_and_grad(g, **feeds))
    plan = Plan(compile_graph(g, ("reverse",), None, True))
    v_plan, g_plan = split(plan.run(feeds))
    ok = same("local client vs plan", v_loc, g_loc, v_plan, g_plan)
    t_loc, t_plan = paired_times(lambda: client.value_and_grad(g, **feeds),
                                 lambda: plan.run(feeds), repeat)
    return ok, t_first, t_loc, t_plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--inputs", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=15)
    a = ap.parse_args()
    if a.nodes < a.inputs or a.inputs < 1 or a.repeat < 1:
        ap.error("need --inputs >= 1, --nodes >= --inputs and --repeat >= 1")

    t_trace, (g, names) = timed(lambda: random_scalar_graph(a.nodes, a.inputs))
    feeds = {n: 0.1 * (i + 1) for i, n in enumerate(names)}

    ok_r, first_r, t_sdk, t_raw, stats = bench_remote(g, feeds, a.repeat)
    ok_l, first_l, t_loc, t_plan = bench_local(g, feeds, a.repeat)

    print(f"random scalar graph: {len(g.nodes)} nodes, {a.inputs} inputs "
          f"(traced in {t_trace * 1e3:.0f} ms); gradient graph {stats.nodes_after} nodes; "
          f"{a.repeat} repeats, one call each")
    print(f"  {'cached call, per call [ms]':44s}" + "".join(
        f"{h:>10s}" for h in ("median", "q1", "q3", "min", "max")))
    print(row("1a remote: SDK value_and_grad", t_sdk))
    print(row("1b remote: raw stubs Evaluate by handle", t_raw))
    print(row("2  local: adsvc.local() value_and_grad", t_loc))
    print(row("2  local: Plan.run (no client)", t_plan))
    print("  first call (compiles) [ms]")
    print(f"  {'1a remote: SDK value_and_grad':44s}{first_r * 1e3:10.3f}")
    print(f"  {'2  local: adsvc.local() value_and_grad':44s}{first_l * 1e3:10.3f}")
    print(ratio_line("1c remote SDK / raw stubs", t_sdk, t_raw, target=1.2))
    print(ratio_line("2  local client / Plan.run", t_loc, t_plan))
    print(f"SDK overhead per cached call: remote "
          f"{(statistics.median(t_sdk) - statistics.median(t_raw)) * 1e3:.3f} ms, local "
          f"{(statistics.median(t_loc) - statistics.median(t_plan)) * 1e3:.3f} ms (medians)")
    if not (ok_r and ok_l):
        print("results differ (see above)", file=sys.stderr)
        return 1
    print("check: SDK and raw gradients agree (numpy.allclose)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
