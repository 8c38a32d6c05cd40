"""Hostile input: >= 10,000 malformed, mutated and randomly generated requests.

One server subprocess (default flags, bench/_server.py: 127.0.0.1:0, address space
capped at 6 GB) receives, on every RPC of adsvc.v1.AutodiffService (Differentiate,
Evaluate, Gradient, EvaluateStream, GetServerInfo, Sparsity, SparseDerivative), requests
sent as raw bytes:

- `random`: random bytes (0..2,000 of them, sometimes a valid tag prefix);
- `truncated`: a valid serialized request (from the generator below) cut short;
- `mutated`: a valid serialized request with random bytes flipped, inserted or deleted;
- `graph`: a structured random request. 35% are well-typed graphs (elementwise ops,
  comparisons, where, reductions, ending in a scalar sum) differentiated to order 1-3
  and evaluated with hostile values (NaN, ±inf, ±1e308, subnormals, -0); the rest come
  from a generator that knows the op table (read from GetServerInfo, as a client
  would): random ops with random operands, including forward references, self
  references and cycles, undefined ids, wrong arity, unknown ops, attributes of the
  wrong kind or with bad values (axes, perms, shapes), huge and negative dims, bad
  dtypes, NaN/inf constants, values that do not match their shape, long (up to 64 KB)
  and odd names, deep chains (up to 60,000 nodes), huge orders, unknown modes, bad wrt
  lists, and wrong feeds (missing, extra, wrong dtype or shape, raw bytes of the wrong
  length, NaN); by graph or by a handle (random ones, and ones the server returned
  earlier); streams with a missing, repeated or misplaced target, garbage in the
  middle, or no messages at all. Sparsity and SparseDerivative get the same graphs plus
  their own bad fields: unknown kinds (0, 3, 99), unknown modes, mode on a Hessian,
  diagonal_only on a Jacobian, Hessians of non-scalar or several outputs, wrt naming
  int/bool inputs, unknown, derived ("tangent:x"), repeated or output names, empty
  graphs, graphs whose output is an input, and wide inputs (up to 50,000 elements) with
  diagonal, banded or dense patterns (a dense one must be refused, not built).

Case i is generated from `random.Random(f"{seed}:{i}")`, so `--case I` replays one
case against a fresh server, printing its status and the server log (a case that used
a handle the server returned earlier is replayed with a random handle). Every call has
a 10 s deadline; calls are sent by --threads client threads (default 2) in batches of
500, after each of which the server must answer a health check with SERVING.
`--flag` passes a flag to the server (repeatable).

Printed: counts by kind and status, p50/p99 latency per RPC, RSS before and after (the
most seen, and after every batch); "after" is read once the server is idle again (a
call cut short by its deadline may still be running) plus 1 s.

Promise (README "What the service promises"): no UNKNOWN or INTERNAL status (nor any
status outside OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND, DEADLINE_EXCEEDED,
UNAUTHENTICATED, CANCELLED), no crash, SERVING after every batch, every error with a
message, RSS growth < 100 MB over the run. Exit status 1 if broken;
the first few offending cases are listed with their case numbers.

    python bench/hostile.py [--quick] [--cases N] [--seed S] [--threads T] [--case I]
    (--quick: 2,000 cases; default 20,000)
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
from _server import DOCUMENTED, BenchServer, mb, percentile, table

from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S

SERVICE = "/adsvc.v1.AutodiffService/"
RPCS = ("Differentiate", "Evaluate", "Gradient", "EvaluateStream", "GetServerInfo",
        "Sparsity", "SparseDerivative")
GRAPH_RPCS = tuple(rpc for rpc in RPCS if rpc != "GetServerInfo")
SPARSE = ("Sparsity", "SparseDerivative")
KINDS = (("random", 0.12), ("truncated", 0.14), ("mutated", 0.14), ("graph", 0.60))
DTYPES = (1, 1, 1, 1, 2, 3, 4, 5)  # mostly float64
BAD_DTYPES = (0, 6, 99, -1)
NAMES = ("x", "y", "z", "w", "out", "grad:x", "tangent:x", "cotangent:out", "x:y", "",
         " ", "ünï", "a\x00b", "\ud7ff", "tangent1:x", "grad2:y")
VALUES = (0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.5, 1e308, -1e308, 5e-324, 1e-300,
          float("nan"), float("inf"), float("-inf"))
UNARY = ("neg", "sin", "cos", "tan", "exp", "expm1", "log", "log1p", "sqrt", "abs", "sign",
         "tanh", "sigmoid", "softplus", "square", "reciprocal", "stop_gradient")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "mul_or_zero")
REDUCE = ("sum", "mean", "max", "min", "logsumexp")
TIMEOUT = 10.0
BATCH = 500
MAX_GROWTH = 100e6


# -- the structured generator ----------------------------------------------------------
class Gen:
    """Random requests from one rng and the server's op table."""

    def __init__(self, rng: random.Random, ops: dict, handles: list[str]):
        self.r, self.ops, self.handles = rng, ops, handles

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def name(self) -> str:
        r = self.r
        if self.chance(0.03):
            return r.choice("abc") * r.choice((1025, 4096, 65536))
        return r.choice(NAMES) if self.chance(0.3) else r.choice("xyzw")

    def dims(self, base=(3,)) -> list[int]:
        r = self.r
        if self.chance(0.85):
            return list(base)
        return r.choice(([], [0], [1], [2, 3], [3, 2], [-1], [-(2**62)], [2**40],
                         [2**31, 2**31], [16_000_001], [4000, 4000], [1] * 40,
                         [r.randint(-5, 50) for _ in range(r.randint(1, 4))]))

    def tensor(self, dtype: int, dims: list[int]) -> ir_pb2.Tensor:
        r = self.r
        t = ir_pb2.Tensor(dtype=dtype, dims=dims)
        n = 1
        for d in dims:
            n *= max(d, 0)
        n = min(n, 4096)
        pool = (0.0, 1.0, -1.0, 0.5, 1e308, -1e308, 5e-324, float("nan"), float("inf"),
                float("-inf"), 2.0**63, -(2.0**63), 3.0)
        if self.chance(0.5):
            t.values.extend(r.choice(pool) for _ in range(n + r.choice((0, 0, 0, 1, -1))))
        else:
            size = {1: 8, 2: 4, 3: 8, 4: 4, 5: 1}.get(dtype, 8)
            raw = bytes(r.getrandbits(8) for _ in range(min(n * size, 32768)))
            if dtype == 5 and self.chance(0.7):
                raw = bytes(b & 1 for b in raw)
            if self.chance(0.1):
                raw = raw[: r.randint(0, len(raw))] + b"\x00" * r.randint(0, 9)
            t.raw = raw
            if self.chance(0.05):
                t.values.append(1.0)
        return t

    def attr(self, kind: str) -> ir_pb2.AttrValue:
        r, a = self.r, ir_pb2.AttrValue()
        if self.chance(0.1):
            kind = r.choice(("int", "float", "str", "bool", "ints", "dtype"))
        if kind == "int":
            a.i = r.choice((0, 1, -1, 2, 3, -3, 2**62, -(2**63), r.randint(-4, 4)))
        elif kind == "float":
            a.f = r.choice((0.0, 1.5, float("nan"), float("inf")))
        elif kind == "str":
            a.s = self.name()
        elif kind == "bool":
            a.b = self.chance(0.5)
        elif kind == "ints":
            a.ints.values.extend(r.choice((
                [0], [1, 0], [0, 1], [3], [-1], [3, 2], [2**40], [-(2**62)], [0, 0],
                [r.randint(-3, 5) for _ in range(r.randint(0, 5))])))
        elif kind == "dtype":
            a.dtype = r.choice(DTYPES + BAD_DTYPES)
        return a

    def graph(self) -> ir_pb2.Graph:
        r = self.r
        g = ir_pb2.Graph(ir_version=1 if self.chance(0.97) else r.choice((0, 2, 2**32 - 1)),
                         opset_version=1 if self.chance(0.97) else r.choice((0, 7)))
        n_in = r.choice((0, 1, 1, 2, 2, 3))
        base = r.choice(([], [3], [3], [2, 3]))
        for i in range(n_in):
            dt = r.choice(DTYPES) if self.chance(0.95) else r.choice(BAD_DTYPES)
            g.inputs.add(id=i, name=self.name(),
                         type=ir_pb2.TensorType(dtype=dt, dims=self.dims(base)))
        deep = n_in > 0 and self.chance(0.04)
        count = r.randint(1, 14)
        if deep:
            count = r.randint(500, 3000) if self.chance(0.9) else r.randint(20_000, 60_000)
        names = list(self.ops)
        for k in range(count):
            nid = n_in + k
            if not deep and self.chance(0.03):
                nid = r.choice((0, max(n_in + k - 1, 0), 2**32 - 1))
            if deep:
                op = r.choice(("sin", "neg", "exp", "tanh", "square"))
                operands = [nid - 1] if 0 < nid < 2**32 - 1 else []
            else:
                op = r.choice(names) if self.chance(0.95) else r.choice(("", "nope", "SIN"))
                operands = self.operands(op, nid)
            n = g.nodes.add(id=nid, op=op, operands=operands)
            if not deep:  # a deep chain stays valid: its hostility is its depth
                self.fill(n, op, base)
        for _ in range(r.choice((0, 1, 1, 1, 2, 3))):
            top = n_in + count - 1
            oid = top if self.chance(0.7) else r.choice((0, top - 1, top + 5, 2**32 - 1))
            g.outputs.add(name=self.name() if self.chance(0.3) else r.choice(("z", "out")),
                          id=max(oid, 0))
        return g

    def valid_graph(self, scalar: bool = True) -> ir_pb2.Graph:
        """A well-typed float64 graph of elementwise ops, comparisons, where and
        reductions ending in a scalar sum (so it can be differentiated and evaluated):
        the hostility is in its values (NaN/inf/huge constants and feeds). Not `scalar`:
        the output is the last elementwise node instead (a Jacobian's)."""
        r = self.r
        g = ir_pb2.Graph(ir_version=1, opset_version=1)
        shape = r.choice(([], [3], [2, 3]))
        nodes = []  # (id, dims)
        for i in range(r.choice((1, 2, 2, 3))):
            g.inputs.add(id=i, name="xyz"[i], type=ir_pb2.TensorType(dtype=1, dims=shape))
            nodes.append((i, shape))
        nid = len(nodes)
        for _ in range(r.randint(1, 30)):
            full = [n for n, d in nodes if d == shape]
            pick = r.random()
            if pick < 0.1:
                size = 1
                for d in shape:
                    size *= d
                g.nodes.add(id=nid, op="constant").value.CopyFrom(ir_pb2.Tensor(
                    dtype=1, dims=shape, values=[r.choice(VALUES) for _ in range(size)]))
            elif pick < 0.45:
                g.nodes.add(id=nid, op=r.choice(UNARY), operands=[r.choice(full)])
            elif pick < 0.8:
                g.nodes.add(id=nid, op=r.choice(BINARY), operands=[r.choice(full),
                                                                    r.choice(full)])
            elif pick < 0.9:
                a, b = r.choice(full), r.choice(full)
                g.nodes.add(id=nid, op=r.choice(("gt", "lt", "ge", "le")), operands=[a, b])
                nid += 1
                g.nodes.add(id=nid, op="where", operands=[nid - 1, a, b])
            else:
                red = g.nodes.add(id=nid, op=r.choice(REDUCE), operands=[r.choice(full)])
                red.attrs["keepdims"].CopyFrom(ir_pb2.AttrValue(b=True))
                if shape:
                    red.attrs["axes"].CopyFrom(ir_pb2.AttrValue(ints=ir_pb2.IntList(
                        values=[r.randrange(len(shape))])))
                nid += 1
                g.nodes.add(id=nid, op="broadcast_to", operands=[nid - 1]).attrs[
                    "shape"].CopyFrom(ir_pb2.AttrValue(ints=ir_pb2.IntList(values=shape)))
            nodes.append((nid, shape))
            nid += 1
        if not scalar:
            g.outputs.add(name="out", id=nid - 1)
            return g
        g.nodes.add(id=nid, op="sum", operands=[nid - 1])
        g.outputs.add(name="out", id=nid)
        if self.chance(0.3):
            g.outputs.add(name="v", id=nid - 1)
        return g

    def valid_feeds(self, g: ir_pb2.Graph, tangents: bool) -> dict[str, ir_pb2.Tensor]:
        out = {}
        for i in g.inputs:
            size = 1
            for d in i.type.dims:
                size *= d
            names = [i.name] + ([f"tangent:{i.name}"] if tangents else [])
            for name in names:
                out[name] = ir_pb2.Tensor(dtype=1, dims=list(i.type.dims), values=[
                    self.r.choice(VALUES) for _ in range(size)])
        return out

    def valid_request(self, rpc: str):
        r = self.r
        if rpc in SPARSE:
            return self.valid_sparse(rpc)
        g = self.valid_graph()
        order = r.choice((1, 1, 2, 3))
        if rpc == "Differentiate":
            modes = [r.choice((1, 2)) for _ in range(order)]
            return S.DifferentiateRequest(graph=g, omit_graph=self.chance(0.5),
                                          differentiation=S.Differentiation(
                                              modes=modes, seed=modes[0] == 2 and
                                              len(g.outputs) == 1))
        if rpc == "Gradient":
            return S.GradientRequest(graph=g, mode=r.choice((0, 1, 2)), inputs=self.valid_feeds(
                g, False))
        forward = self.chance(0.5)
        diff = S.Differentiation(modes=[1]) if forward else S.Differentiation()
        if rpc == "Evaluate":
            return S.EvaluateRequest(graph=g, differentiation=diff,
                                     inputs=self.valid_feeds(g, forward))
        target = S.EvaluateStreamRequest(target=S.StreamTarget(graph=g, differentiation=diff))
        return [target] + [S.EvaluateStreamRequest(feed=S.Feed(inputs=self.valid_feeds(
            g, forward))) for _ in range(r.randint(1, 4))]

    def wide_graph(self, hessian: bool) -> ir_pb2.Graph:
        """x of 1..50,000 elements through a diagonal (elementwise), banded (shifted
        products) or dense (x - mean(x)) map; summed for a Hessian."""
        r = self.r
        n = r.choice((1, 2, 10, 300, 2000, 5000, 50_000))
        g = ir_pb2.Graph(ir_version=1, opset_version=1)
        g.inputs.add(id=0, name="x", type=ir_pb2.TensorType(dtype=1, dims=[n]))
        shape = r.random()
        if shape < 0.4 or n < 2:
            g.nodes.add(id=1, op=r.choice(UNARY), operands=[0])
            top = 1
        elif shape < 0.75:

            def sliced(nid, lo, hi):
                n = g.nodes.add(id=nid, op="slice", operands=[0])
                for key, v in (("starts", lo), ("stops", hi)):
                    n.attrs[key].CopyFrom(ir_pb2.AttrValue(ints=ir_pb2.IntList(values=[v])))
            sliced(1, 1, n)
            sliced(2, 0, n - 1)
            g.nodes.add(id=3, op="mul", operands=[1, 2])
            g.nodes.add(id=4, op="sin", operands=[3])
            top = 4
        else:
            g.nodes.add(id=1, op="mean", operands=[0]).attrs["keepdims"].CopyFrom(
                ir_pb2.AttrValue(b=True))
            g.nodes.add(id=2, op="sub", operands=[0, 1])
            g.nodes.add(id=3, op="square", operands=[2])
            top = 3
        if hessian:
            g.nodes.add(id=top + 1, op="sum", operands=[top])
            top += 1
        g.outputs.add(name="out", id=top)
        return g

    def sparse_graph(self, hessian: bool) -> ir_pb2.Graph:
        """A graph for a sparsity RPC: well-typed (scalar or not), wide, or degenerate."""
        r = self.r
        pick = r.random()
        if pick < 0.55:
            g = self.valid_graph(scalar=hessian if self.chance(0.85) else not hessian)
        elif pick < 0.8:
            g = self.wide_graph(hessian if self.chance(0.9) else not hessian)
        elif pick < 0.88:  # empty, no outputs, or no nodes at all
            g = self.valid_graph() if self.chance(0.5) else ir_pb2.Graph(ir_version=1,
                                                                        opset_version=1)
            del g.outputs[:]
            if self.chance(0.5):
                del g.nodes[:]
        else:  # the output is an input, or an int/bool function, or a constant
            g = ir_pb2.Graph(ir_version=1, opset_version=1)
            dt = r.choice((1, 1, 2, 3, 4, 5))
            g.inputs.add(id=0, name="x", type=ir_pb2.TensorType(dtype=dt, dims=r.choice((
                [], [3]))))
            if self.chance(0.5):
                g.nodes.add(id=1, op="constant").value.CopyFrom(ir_pb2.Tensor(
                    dtype=1, dims=[], values=[r.choice(VALUES)]))
            g.outputs.add(name="out", id=r.choice((0, 0, 1)) if len(g.nodes) else 0)
        if self.chance(0.25):  # an int or bool input nobody uses (wrt may name it)
            g.inputs.add(id=max([-1] + [i.id for i in g.inputs] + [n.id for n in g.nodes]) + 1,
                         name="n", type=ir_pb2.TensorType(dtype=r.choice((3, 4, 5)),
                                                          dims=[3]))
        return g

    def sparse_wrt(self, g: ir_pb2.Graph) -> list[str]:
        r = self.r
        if self.chance(0.6):
            return []
        names = [i.name for i in g.inputs]
        pool = names + ["n", "nope", "", "tangent:x", "grad:x", "out", "0", "1", "v",
                        "x" * 65536]
        out = [r.choice(pool) for _ in range(r.randint(1, 4))]
        if self.chance(0.2) and out:
            out.append(out[0])  # repeated
        return out

    def sparse_feeds(self, g: ir_pb2.Graph) -> dict[str, ir_pb2.Tensor]:
        """Valid float64 feeds for the float inputs (wide ones: with one value), mostly;
        else the generic hostile ones."""
        if self.chance(0.25):
            return self.feeds(g)
        out = {}
        for i in g.inputs:
            size = 1
            for d in i.type.dims:
                size *= d
            if i.type.dtype == 1:
                out[i.name] = ir_pb2.Tensor(dtype=1, dims=list(i.type.dims), values=[
                    self.r.choice(VALUES) for _ in range(min(size, 50))] * (
                    size // min(size, 50) if size else 0))
                del out[i.name].values[size:]
                while len(out[i.name].values) < size:
                    out[i.name].values.append(0.5)
            elif self.chance(0.7):  # int/bool: valid values
                out[i.name] = ir_pb2.Tensor(dtype=i.type.dtype, dims=list(i.type.dims),
                                            values=[1.0] * size)
            else:
                out[i.name] = self.tensor(i.type.dtype, list(i.type.dims))
        if self.chance(0.05):
            out[self.r.choice(("tangent:x", "grad:x", "nope"))] = self.tensor(1, [3])
        return out

    def valid_sparse(self, rpc: str):
        """A Sparsity/SparseDerivative request: a sensible graph, and mostly sensible
        fields, with the fields these RPCs check broken now and then."""
        r = self.r
        kind = r.choice((1, 2)) if self.chance(0.9) else r.choice((0, 3, 99, -1))
        g = self.sparse_graph(kind == 2)
        wrt = self.sparse_wrt(g)
        if rpc == "Sparsity":
            return S.SparsityRequest(graph=g, kind=kind, wrt=wrt)
        m = S.SparseDerivativeRequest(graph=g, kind=kind, wrt=wrt, inputs=self.sparse_feeds(g))
        if kind == 1 and self.chance(0.6) or self.chance(0.1):
            m.mode = r.choice((0, 1, 2)) if self.chance(0.9) else r.choice((3, 99, -1))
        if kind == 2 and self.chance(0.4) or self.chance(0.1):
            m.diagonal_only = True
        return m

    def operands(self, op: str, nid: int) -> list[int]:
        r = self.r
        arity = self.ops.get(op, (1, {}))[0]
        if arity is None:
            arity = r.randint(1, 3)
        if self.chance(0.08):
            arity = max(0, arity + r.choice((-1, 1, 2)))
        out = []
        for _ in range(arity):
            if nid > 0 and self.chance(0.9):
                out.append(r.randrange(nid))
            else:
                out.append(r.choice((nid, nid + 1, nid + 7, 2**32 - 1)) % 2**32)  # self/forward
        return out

    def fill(self, n: ir_pb2.Node, op: str, base: list[int]) -> None:
        r = self.r
        if op == "constant" or self.chance(0.02):
            dt = r.choice(DTYPES) if self.chance(0.95) else r.choice(BAD_DTYPES)
            n.value.CopyFrom(self.tensor(dt, self.dims(base)))
        for key, kind in self.ops.get(op, (0, {}))[1].items():
            if self.chance(0.85):
                n.attrs[key].CopyFrom(self.attr(kind))
        if self.chance(0.05):
            n.attrs[self.r.choice(("axis", "bogus", "shape", ""))].CopyFrom(self.attr("int"))
        if self.chance(0.05):
            n.label = self.name()
        if self.chance(0.03):
            n.type.CopyFrom(ir_pb2.TensorType(dtype=r.choice(DTYPES), dims=self.dims(base)))

    def differentiation(self) -> S.Differentiation:
        r = self.r
        d = S.Differentiation()
        if self.chance(0.25):
            return d
        d.modes.extend(r.choice((1, 2)) if self.chance(0.93) else r.choice((0, 3, 99))
                       for _ in range(r.choice((1, 1, 1, 2, 2, 3, 4, 5))))
        if self.chance(0.15):
            d.order = r.choice((0, 1, 2, 3, 4, 5, 100, 2**32 - 1))
        if self.chance(0.3):
            d.wrt.extend(self.name() for _ in range(r.randint(0, 3)))
        d.seed = self.chance(0.3)
        return d

    def feeds(self, g: ir_pb2.Graph) -> dict[str, ir_pb2.Tensor]:
        r, out = self.r, {}
        for i in g.inputs:
            if self.chance(0.05):
                continue  # missing
            dt = i.type.dtype if self.chance(0.9) else r.choice(DTYPES + BAD_DTYPES)
            dims = list(i.type.dims) if self.chance(0.9) else self.dims([3])
            if self.chance(0.3):  # derived names a differentiation may need
                out[r.choice(("tangent:", "cotangent:")) + i.name] = self.tensor(dt, dims)
            out[i.name] = self.tensor(dt, dims)
        if self.chance(0.08):
            out[self.name()] = self.tensor(r.choice(DTYPES), [3])
        return out

    def source(self, msg, g: ir_pb2.Graph) -> None:
        """Set `msg`'s oneof source: mostly the graph, else a handle."""
        r = self.r
        if self.chance(0.8) or not hasattr(msg, "handle"):
            msg.graph.CopyFrom(g)
        elif self.handles and self.chance(0.7):
            msg.handle = r.choice(self.handles)
        else:
            msg.handle = r.choice(("", "0" * 64, "zz", "a" * 4096, "\x00"))

    def request(self, rpc: str):
        """A request message for `rpc` (a list for EvaluateStream): a well-typed graph
        with hostile values (35%), a loop, branch or symbolic-size graph (8%), or a
        randomly broken one."""
        if rpc in ("Evaluate", "Gradient", "Differentiate") and self.chance(0.08):
            return loop_request(self, rpc)
        if rpc != "GetServerInfo" and self.chance(0.35):
            return self.valid_request(rpc)
        g = self.graph()
        if rpc == "Differentiate":
            return S.DifferentiateRequest(graph=g, differentiation=self.differentiation(),
                                          omit_graph=self.chance(0.5))
        if rpc == "Evaluate":
            m = S.EvaluateRequest(differentiation=self.differentiation(),
                                  inputs=self.feeds(g))
            self.source(m, g)
            return m
        if rpc == "Gradient":
            m = S.GradientRequest(mode=self.r.choice((0, 1, 2, 2, 3)), inputs=self.feeds(g))
            if self.chance(0.2):
                m.wrt.extend(self.name() for _ in range(self.r.randint(1, 3)))
            self.source(m, g)
            return m
        if rpc == "EvaluateStream":
            return self.stream(g)
        r = self.r
        if rpc == "Sparsity":
            return S.SparsityRequest(graph=g, kind=r.choice((0, 1, 1, 2, 2, 3)),
                                     wrt=self.sparse_wrt(g))
        if rpc == "SparseDerivative":
            m = S.SparseDerivativeRequest(graph=g, kind=r.choice((0, 1, 1, 2, 2, 3)),
                                          wrt=self.sparse_wrt(g), inputs=self.feeds(g),
                                          diagonal_only=self.chance(0.2))
            if self.chance(0.3):
                m.mode = r.choice((0, 1, 2, 3))
            if self.chance(0.03):
                m.ClearField("graph")  # graph is required
            return m
        return S.GetServerInfoRequest()

    def stream(self, g: ir_pb2.Graph) -> list:
        r = self.r
        target = S.EvaluateStreamRequest(target=S.StreamTarget(
            differentiation=self.differentiation()))
        self.source(target.target, g)
        msgs = [target] + [S.EvaluateStreamRequest(feed=S.Feed(inputs=self.feeds(g)))
                           for _ in range(r.choice((0, 1, 2, 3, 5)))]
        shape = r.random()
        if shape < 0.05:
            return []
        if shape < 0.10:
            return msgs[1:] or [S.EvaluateStreamRequest(feed=S.Feed())]
        if shape < 0.15:
            msgs.insert(r.randint(1, len(msgs)), target)
        return msgs


# -- byte-level cases ------------------------------------------------------------------
def random_bytes(r: random.Random) -> bytes:
    n = r.choice((0, 1, 2, 5, 17, 100, 500, 2000))
    data = bytes(r.getrandbits(8) for _ in range(n))
    if r.random() < 0.3:  # a valid tag (graph = field 1, length-delimited) then garbage
        data = b"\x0a" + struct.pack("B", min(n, 127)) + data
    return data


def truncate(r: random.Random, data: bytes) -> bytes:
    return data[: r.randrange(len(data))] if data else b"\x0a"


def mutate(r: random.Random, data: bytes) -> bytes:
    b = bytearray(data or b"\x0a\x00")
    for _ in range(r.choice((1, 1, 2, 4, 16))):
        i = r.randrange(len(b))
        op = r.random()
        if op < 0.5:
            b[i] = r.getrandbits(8)
        elif op < 0.75:
            b.insert(i, r.getrandbits(8))
        elif len(b) > 1:
            del b[i]
    return bytes(b)


def make_case(seed: int, i: int, ops: dict, handles: list[str]):
    """(kind, rpc, payload): bytes, or a list of bytes for EvaluateStream."""
    r = random.Random(f"{seed}:{i}")
    kind = r.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
    rpc = r.choice(RPCS) if kind != "graph" else r.choice(GRAPH_RPCS * 6 + ("GetServerInfo",))
    if kind == "random":
        payload = [random_bytes(r) for _ in range(r.randint(0, 3))] \
            if rpc == "EvaluateStream" else random_bytes(r)
        return kind, rpc, payload
    # GetServerInfo's own request is empty: cut or mutate another RPC's request for it
    source = rpc if rpc != "GetServerInfo" or kind == "graph" else r.choice(
        RPCS[:3] + SPARSE)
    req = Gen(r, ops, handles).request(source)
    if rpc == "EvaluateStream":
        payload = [m.SerializeToString() for m in req]
        if kind != "graph" and payload:
            k = r.randrange(len(payload))
            payload[k] = (truncate if kind == "truncated" else mutate)(r, payload[k])
        return kind, rpc, payload
    data = req.SerializeToString()
    if kind == "truncated":
        data = truncate(r, data)
    elif kind == "mutated":
        data = mutate(r, data)
    return kind, rpc, data


# -- loops, branches and symbolic sizes -------------------------------------------------------
def _loop_graphs():
    """Graphs with scan / while_loop / cond and symbolic sizes, traced once (protos)."""
    import adsvc as ad  # the bench's own process traces them; the server only decodes

    def runaway(x):
        return ad.while_loop(lambda c: c > -1.0, lambda c: c + 1.0, x, max_iters=10**9)
    return {
        "scan": ad.to_proto(ad.trace(lambda x, y: ad.scan(
            lambda c, r: (ad.sin(c) * y + r, c * c), x, ad.constant([1.0, 2.0, 3.0]))[0])),
        "long_scan": ad.to_proto(ad.trace(lambda x: ad.scan(
            lambda c, _: (c * 0.5 + 1.0, None), x, length=10**12)[0])),
        "stacked": ad.to_proto(ad.trace(lambda x: ad.sum(ad.scan(
            lambda c, _: (c, c), x * ad.ones((1000,)), length=10**7)[1]))),
        "runaway": ad.to_proto(ad.trace(runaway)),
        "while": ad.to_proto(ad.trace(lambda x: ad.while_loop(
            lambda c: c[0] < 50.0, lambda c: (c[0] * 1.5 + 1.0, c[1] + 1), (x, 0),
            max_iters=200)[0])),
        "cond": ad.to_proto(ad.trace(lambda x, y: ad.cond(
            x > y, lambda a, b: a * b, lambda a, b: ad.exp(a) - b, x, y))),
        "symbolic": ad.to_proto(ad.trace(lambda a, b: ad.sum(a[1:] * b[:-1]) + ad.sum(
            ad.reshape(a, (-1, 1)) * ad.reshape(b, (1, -1))), a=ad.f64("n"), b=ad.f64("n"))),
    }


_LOOPS: dict = {}


def loop_request(gen: Gen, rpc: str):
    """A request with a loop, branch or symbolic-size graph: as traced, with attributes or
    body nodes mutated, or fed hostile values and sizes."""
    if not _LOOPS:
        _LOOPS.update(_loop_graphs())
    r = gen.r
    name = r.choice(sorted(_LOOPS))
    g = ir_pb2.Graph()
    g.CopyFrom(_LOOPS[name])
    if gen.chance(0.4):  # mutate: an attribute of the loop, or a node inside a body
        loops = [n for n in g.nodes if n.attrs and n.op in ("scan", "while_loop", "cond")]
        if loops:
            n = r.choice(loops)
            key = r.choice(sorted(n.attrs))
            a = n.attrs[key]
            if a.WhichOneof("value") in ("graph", "graphs"):
                body = a.graph if a.HasField("graph") else r.choice(a.graphs.graphs)
                if body.nodes:
                    b = r.choice(body.nodes)
                    b.op = r.choice(("sin", "add", "element", "scan", "nope", "matmul"))
                    if gen.chance(0.5):
                        b.operands.append(r.choice((0, 7, 2**32 - 1)))
            else:
                n.attrs[key].CopyFrom(gen.attr(r.choice(("int", "ints", "bool", "str"))))
    if gen.chance(0.1):
        g.ir_version, g.opset_version = 1, 1
    feeds = {}
    for i in g.inputs:
        size = r.choice((0, 1, 3, 5, 1000)) if name == "symbolic" else None
        shape = [size] if size is not None else []
        if name == "symbolic" and gen.chance(0.2):
            shape = [r.choice((2, 7))]  # the two inputs disagree on n
        feeds[i.name] = gen.tensor(r.choice((ir_pb2.DTYPE_FLOAT64,) * 9 + (ir_pb2.DTYPE_INT64,)),
                                   shape)
    if rpc == "Differentiate":
        modes = [r.choice((1, 2)) for _ in range(r.choice((1, 2)))]
        return S.DifferentiateRequest(graph=g, omit_graph=gen.chance(0.5),
                                      differentiation=S.Differentiation(modes=modes))
    if rpc == "Gradient":
        return S.GradientRequest(graph=g, mode=r.choice((0, 1, 2)), inputs=feeds)
    return S.EvaluateRequest(graph=g, inputs=feeds, differentiation=gen.differentiation()
                             if gen.chance(0.5) else S.Differentiation())


# -- sending ---------------------------------------------------------------------------
class Sender:
    """Raw-bytes calls on one channel; remembers handles the server returned."""

    def __init__(self, server: BenchServer):
        ch = server.channel
        self.unary = {rpc: ch.unary_unary(SERVICE + rpc, request_serializer=None,
                                          response_deserializer=None)
                      for rpc in RPCS if rpc != "EvaluateStream"}
        self.stream = ch.stream_stream(SERVICE + "EvaluateStream", request_serializer=None,
                                       response_deserializer=None)
        self.handles: list[str] = []
        self._lock = threading.Lock()

    def send(self, rpc: str, payload) -> tuple[str, str]:
        """(status name, details) of one call."""
        try:
            if rpc == "EvaluateStream":
                for _ in self.stream(iter(payload), timeout=TIMEOUT):
                    pass
            else:
                resp = self.unary[rpc](payload, timeout=TIMEOUT)
                if rpc == "Differentiate":
                    self._remember(resp)
            return "OK", ""
        except grpc.RpcError as e:
            return e.code().name, e.details() or ""

    def _remember(self, resp: bytes) -> None:
        m = S.DifferentiateResponse()
        m.ParseFromString(resp)
        with self._lock:
            if m.handle and len(self.handles) < 200:
                self.handles.append(m.handle)


def op_table(server: BenchServer) -> dict:
    """{op: (arity or None, {attr: kind})} from GetServerInfo."""
    kinds = {1: "int", 2: "float", 3: "str", 4: "bool", 5: "ints", 6: "dtype"}
    return {o.name: (None if o.variadic else o.arity,
                     {a.name: kinds.get(a.kind, "int") for a in o.attrs})
            for o in server.info().ops}


def run(server: BenchServer, cases: range, seed: int, threads: int):
    ops = op_table(server)
    sender = Sender(server)
    results: dict[int, tuple] = {}
    problems: list[str] = []
    rss_seen = [server.rss()]

    def one(i: int):
        kind, rpc, payload = make_case(seed, i, ops, sender.handles)
        start = time.perf_counter()
        code, details = sender.send(rpc, payload)
        results[i] = (kind, rpc, code, time.perf_counter() - start, details)

    with ThreadPoolExecutor(threads) as pool:
        for lo in range(cases.start, cases.stop, BATCH):
            list(pool.map(one, range(lo, min(lo + BATCH, cases.stop))))
            if not server.alive():
                problems.append(f"the server died after case < {lo + BATCH} "
                                f"(exit {server.proc.returncode})")
                break
            h = server.health()
            if h != "SERVING":
                problems.append(f"health after the batch from case {lo}: {h}")
            rss_seen.append(server.rss())
    if server.alive():  # the final figure once the server is idle (work past deadlines)
        server.wait_idle(120)
        time.sleep(2.5)  # the server trims its heap 1 s after the last big call
        rss_seen.append(server.rss())
    return results, problems, rss_seen


def check(results: dict, problems: list[str]) -> list[str]:
    broken = list(problems)
    for i, (kind, rpc, code, _, details) in sorted(results.items()):
        if code not in DOCUMENTED:
            broken.append(f"case {i} ({kind} {rpc}): {code}: {details[:200]}")
        elif code != "OK" and not details:
            broken.append(f"case {i} ({kind} {rpc}): {code} without a message")
    return broken


def report(results: dict, rss_seen: list[int], server: BenchServer) -> None:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    for kind, rpc, code, secs, _ in results.values():
        by_kind[kind][code] += 1
        latency[rpc].append(secs)
    codes = sorted({c for cnt in by_kind.values() for c in cnt})
    rows = [(k, sum(by_kind[k].values()), *(by_kind[k][c] for c in codes)) for k in by_kind]
    total = Counter()
    for cnt in by_kind.values():
        total.update(cnt)
    rows.append(("all", sum(total.values()), *(total[c] for c in codes)))
    print(table(rows, ("kind", "calls", *codes)))
    print()
    rows = [(rpc, len(v), f"{percentile(v, 50) * 1000:.1f}", f"{percentile(v, 99) * 1000:.1f}",
             f"{max(v) * 1000:.0f}") for rpc, v in sorted(latency.items())]
    print(table(rows, ("rpc", "calls", "p50 ms", "p99 ms", "max ms")))
    print()
    stats = server.info().stats
    print(f"RSS before {mb(rss_seen[0])}, after {mb(rss_seen[-1])}, most seen "
          f"{mb(max(rss_seen))}, peak (VmHWM) {mb(server.peak_rss())}; compiled graphs "
          f"cached {stats.cache_size}, evaluations interrupted "
          f"{stats.evaluations_interrupted}")
    print("RSS after each batch of", BATCH, "and once idle (MB):",
          " ".join(f"{r / 1e6:.0f}" for r in rss_seen[1:]))


def replay(args) -> int:
    with BenchServer(*args.flag) as server:
        ops = op_table(server)
        kind, rpc, payload = make_case(args.seed, args.case, ops, [])
        size = sum(map(len, payload)) if isinstance(payload, list) else len(payload)
        before, start = server.rss(), time.perf_counter()
        code, details = Sender(server).send(rpc, payload)
        seconds = time.perf_counter() - start
        server.wait_idle(120)
        time.sleep(1.0)
        print(f"case {args.case}: {kind} {rpc}, {size} bytes -> {code} in {seconds:.2f} s: "
              f"{details}\nRSS before {mb(before)}, after {mb(server.rss())}, peak "
              f"{mb(server.peak_rss())}")
        time.sleep(0.3)
        print("".join(server.lines[-20:]))
    return 0 if code in DOCUMENTED else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 cases")
    p.add_argument("--cases", type=int, default=None, help="default 20,000")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", type=int, default=None, help="replay one case")
    p.add_argument("--flag", action="append", default=[], help="a server flag")
    args = p.parse_args(argv)
    if args.case is not None:
        return replay(args)
    n = args.cases or (2_000 if args.quick else 20_000)
    with BenchServer(*args.flag) as server:
        print(f"server {server.target} pid {server.pid} flags {args.flag or 'default'}: "
              f"{n} cases, seed {args.seed}, {args.threads} client threads")
        start = time.perf_counter()
        results, problems, rss_seen = run(server, range(n), args.seed, args.threads)
        elapsed = time.perf_counter() - start
        report(results, rss_seen, server)
        broken = check(results, problems)
        growth = rss_seen[-1] - rss_seen[0]
        if growth > MAX_GROWTH:
            broken.append(f"RSS grew {mb(growth)}")
        tracebacks = server.tracebacks()
        if tracebacks:
            broken.append(f"{len(tracebacks)} server log lines with a traceback/ERROR, "
                          f"first: {tracebacks[0].strip()[:200]}")
        for b in broken[:20]:
            print("BROKEN:", b)
        if len(broken) > 20:
            print(f"BROKEN: ... and {len(broken) - 20} more")
        statuses = Counter(code for _, _, code, _, _ in results.values())
        print(f"summary: {len(results)} hostile calls in {elapsed:.0f} s, "
              f"{dict(statuses.most_common())}, RSS growth {mb(growth)}, "
              f"{len(broken)} broken promise(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
