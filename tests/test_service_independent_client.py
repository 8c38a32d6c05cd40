"""A client generated from the .proto files alone (no SDK, no adsvc package) gets the
same answers as the SDK.

A subprocess compiles protos/ with grpc_tools.protoc into a temporary directory, builds
the graph `z = x*x + x*y + 2` as a hand-written Graph message (constants as `values`,
inputs as raw little-endian bytes), calls every RPC and prints its results as JSON.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from service_fixtures import ROOT, running_server, seed_graph

import adsvc

SCRIPT = r'''
import json, os, pathlib, struct, sys
out, protos, target = sys.argv[1:4]
import grpc_tools
from grpc_tools import protoc
well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
files = sorted(str(p) for p in pathlib.Path(protos, "adsvc", "v1").glob("*.proto"))
assert protoc.main(["protoc", f"-I{protos}", f"-I{well_known}", f"--python_out={out}",
                    f"--grpc_python_out={out}", *files]) == 0
for d in ("adsvc", "adsvc/v1"):
    open(os.path.join(out, d, "__init__.py"), "w").close()
sys.path.insert(0, out)
import grpc
from adsvc.v1 import ir_pb2, service_pb2 as S, service_pb2_grpc
import adsvc
assert adsvc.__file__.startswith(out), adsvc.__file__  # the generated package, not ours

F64 = ir_pb2.DTYPE_FLOAT64
def scalar(v):
    return ir_pb2.Tensor(dtype=F64, raw=struct.pack("<d", v))
def value(t):
    assert t.dtype == F64 and list(t.dims) == []
    return struct.unpack("<d", t.raw)[0]

g = ir_pb2.Graph(ir_version=1, opset_version=1, name="seed")
g.inputs.add(id=0, name="x", type=ir_pb2.TensorType(dtype=F64))
g.inputs.add(id=1, name="y", type=ir_pb2.TensorType(dtype=F64))
g.nodes.add(id=2, op="mul", operands=[0, 0])
g.nodes.add(id=3, op="mul", operands=[0, 1])
g.nodes.add(id=4, op="add", operands=[2, 3])
g.nodes.add(id=5, op="constant", value=ir_pb2.Tensor(dtype=F64, values=[2.0]))
g.nodes.add(id=6, op="add", operands=[4, 5])
g.outputs.add(name="z", id=6)
xy = {"x": scalar(3.0), "y": scalar(4.0)}

result = {}
with grpc.insecure_channel(target) as ch:
    rpc = service_pb2_grpc.AutodiffServiceStub(ch)
    for name, mode in (("reverse", S.MODE_REVERSE), ("forward", S.MODE_FORWARD)):
        r = rpc.Gradient(S.GradientRequest(graph=g, mode=mode, inputs=xy), timeout=30)
        result["gradient_" + name] = [value(r.value), {k: value(v) for k, v in
                                                       r.gradients.items()}]
    d = rpc.Differentiate(S.DifferentiateRequest(graph=g, differentiation=S.Differentiation(
        modes=[S.MODE_REVERSE], seed=True)), timeout=30)
    e = rpc.Evaluate(S.EvaluateRequest(handle=d.handle, inputs=xy), timeout=30)
    result["evaluate_handle"] = {k: value(v) for k, v in e.outputs.items()}
    result["differentiated_outputs"] = [o.name for o in d.graph.outputs]
    e = rpc.Evaluate(S.EvaluateRequest(graph=g, differentiation=S.Differentiation(
        modes=[S.MODE_FORWARD]), inputs={**xy, "tangent:x": scalar(0.5),
                                          "tangent:y": scalar(2.0)}), timeout=30)
    result["jvp"] = {k: value(v) for k, v in e.outputs.items()}
    def stream():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=g))
        for x in (0.0, 1.0, 2.0):
            yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": scalar(x),
                                                              "y": scalar(4.0)}))
    result["stream"] = [value(r.outputs["z"]) for r in rpc.EvaluateStream(stream(),
                                                                         timeout=30)]
    info = rpc.GetServerInfo(S.GetServerInfoRequest(), timeout=30)
    result["ops"] = sorted(o.name for o in info.ops)
assert "adsvc_client" not in sys.modules
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def target():
    with running_server() as (_, t):
        yield t


def test_proto_only_client_matches_sdk(target, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(ROOT / "protos"),
                           target], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    with adsvc.connect(target, timeout=30) as client:
        g = seed_graph()
        for mode in ("reverse", "forward"):
            value, grads = client.value_and_grad(g, mode=mode, x=3.0, y=4.0)
            assert got[f"gradient_{mode}"] == [float(value), {k: float(v) for k, v in
                                                              grads.items()}]
        assert got["gradient_reverse"] == [23.0, {"x": 10.0, "y": 3.0}]
        ir = client.differentiate(g, "reverse", seed=True)
        assert got["differentiated_outputs"] == [n for n, _ in ir.outputs]
        assert got["evaluate_handle"] == {"z": 23.0, "grad:x": 10.0, "grad:y": 3.0}
        primal, tangent = client.jvp(g, {"x": 3.0, "y": 4.0}, {"x": 0.5, "y": 2.0})
        assert got["jvp"] == {"z": float(primal["z"]), "tangent:z": float(tangent["z"])}
        assert got["stream"] == [float(client.evaluate(g, x=x, y=4.0)["z"])
                                 for x in (0.0, 1.0, 2.0)]
        assert got["ops"] == sorted(op.name for op in client.server_info().ops)
    np.testing.assert_equal(got["jvp"]["tangent:z"], 0.5 * 10.0 + 2.0 * 3.0)
