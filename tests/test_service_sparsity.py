"""Sparse derivatives through a real server: the SDK (Sparsity RPC for the pattern, the
sweeps over EvaluateStream, recovery in the shared recipes), the Sparsity and
SparseDerivative RPCs with raw generated stubs, their errors and the cache."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import scipy.sparse as sp
from service_fixtures import channel, running_server, stub
from sparsecheck import assert_colorings, check_sparse_hessian, check_sparse_jacobian
from test_sparsity import banded, rosenbrock

import adsvc as ad
from adsvc.server.config import ServerConfig
from adsvc_protocol import sparse
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor


def _mixed(x, y):
    return {"r": ad.concat([x[1:] * y[:2], ad.sin(x) * y[3:]], 0),
            "s": ad.sum(ad.reshape(y, (2, 3)) @ x)}


def test_sdk_sparse_jacobians_and_hessians_equal_dense(server):
    _, target = server
    rng = np.random.default_rng(0)
    with ad.connect(target, timeout=60) as c:
        g = ad.trace(banded, x=ad.f64(50))
        check_sparse_jacobian(c, g, {"x": rng.standard_normal(50)})
        g = ad.trace(_mixed, x=ad.f64(3), y=ad.f64(6))
        feeds = {"x": rng.standard_normal(3), "y": rng.standard_normal(6)}
        check_sparse_jacobian(c, g, feeds)
        h = ad.trace(rosenbrock, x=ad.f64(30))
        check_sparse_hessian(c, h, {"x": rng.standard_normal(30)})
        assert c.sparsity(h, hessian=True).colors()["star"] <= 3
        arrow = ad.trace(lambda x, y: ad.sum(x[0] * ad.sin(x[1:] * y)) + ad.sum(y ** 3),
                         x=ad.f64(20), y=ad.f64(19))
        check_sparse_hessian(c, arrow, {"x": rng.standard_normal(20),
                                        "y": rng.standard_normal(19)})


def test_sdk_results_match_the_local_client(server):
    _, target = server
    g = ad.trace(rosenbrock, x=ad.f64(40))
    x = np.linspace(-1, 1, 40)
    local = ad.local()
    with ad.connect(target, timeout=60) as c:
        s_remote, s_local = c.sparsity(g, hessian=True), local.sparsity(g, hessian=True)
        assert (s_remote.pattern != s_local.pattern).nnz == 0
        assert s_remote.colors() == s_local.colors()
        assert c.sparsity(g, hessian=True) is s_remote  # kept in the SDK's cache
        h = c.hessian(g, sparse=True, x=x)["x"]["x"]
        assert abs(h - local.hessian(g, sparse=True, x=x)["x"]["x"]).max() < 1e-12
        np.testing.assert_allclose(c.hessian_diag(g, x=x)["x"], h.diagonal(), rtol=1e-12)


def _request(g, kind, **kw):
    return dict(graph=ad.to_proto(g), kind=sparse.KIND_TO_ENUM[kind], **kw)


def test_sparsity_rpc_sends_a_coo_pattern_and_colorings(server):
    _, target = server
    g = ad.trace(banded, x=ad.f64(20))
    with channel(target) as ch:
        resp = stub(ch).Sparsity(S.SparsityRequest(**_request(g, "jacobian")), timeout=30)
    assert resp.kind == S.SPARSITY_KIND_JACOBIAN
    assert [t.name for t in resp.rows] == ["out"] and [t.name for t in resp.cols] == ["x"]
    idx = from_tensor(resp.pattern.indices)
    assert idx.shape == (20 * 5 - 6, 2) and not resp.pattern.HasField("values")
    assert all(abs(int(i) - int(j)) <= 2 for i, j in idx)
    names = {c.name: c.colors for c in resp.colorings}
    assert names == {"forward": 5, "reverse": 5}
    assert_colorings(sparse.from_proto(resp))


def test_sparse_derivative_rpc_values(server):
    _, target = server
    local = ad.local()
    x = np.linspace(-1.0, 1.0, 25)
    inputs = {"x": to_tensor(x)}
    jg, hg = ad.trace(banded, x=ad.f64(25)), ad.trace(rosenbrock, x=ad.f64(25))
    with channel(target) as ch:
        rpc = stub(ch)
        j = rpc.SparseDerivative(S.SparseDerivativeRequest(
            **_request(jg, "jacobian"), inputs=inputs), timeout=30)
        h = rpc.SparseDerivative(S.SparseDerivativeRequest(
            **_request(hg, "hessian"), inputs=inputs), timeout=30)
        d = rpc.SparseDerivative(S.SparseDerivativeRequest(
            **_request(hg, "hessian"), inputs=inputs, diagonal_only=True), timeout=30)
        r = rpc.SparseDerivative(S.SparseDerivativeRequest(
            **_request(jg, "jacobian"), inputs=inputs, mode=S.MODE_REVERSE), timeout=30)
    dense_j = local.jacobian(jg, x=x)["out"]["x"]
    np.testing.assert_allclose(sparse.matrix_from_proto(j.matrix).toarray(), dense_j)
    np.testing.assert_allclose(sparse.matrix_from_proto(r.matrix).toarray(), dense_j)
    assert (j.coloring, j.colors, r.coloring) == ("forward", 5, "reverse")
    dense_h = local.hessian(hg, x=x)["x"]["x"]
    np.testing.assert_allclose(sparse.matrix_from_proto(h.matrix).toarray(), dense_h)
    assert (h.coloring, h.colors) == ("star", 3)
    np.testing.assert_allclose(from_tensor(d.diagonal["x"]), np.diag(dense_h))
    assert not d.HasField("matrix") and d.coloring == "diagonal"


def test_sparse_rpc_errors(server):
    _, target = server
    vec = ad.trace(lambda x: ad.sin(x), x=ad.f64(3))
    with channel(target) as ch:
        rpc = stub(ch)
        with pytest.raises(grpc.RpcError) as e:
            rpc.Sparsity(S.SparsityRequest(graph=ad.to_proto(vec)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kind" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            rpc.Sparsity(S.SparsityRequest(**_request(vec, "hessian")), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scalar" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            rpc.Sparsity(S.SparsityRequest(**_request(vec, "jacobian"), wrt=["nope"]),
                         timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            rpc.SparseDerivative(S.SparseDerivativeRequest(
                **_request(vec, "jacobian"), diagonal_only=True), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pattern_entries_are_bounded_by_max_tensor_elements():
    dense = ad.trace(lambda x: x - ad.mean(x), x=ad.f64(100))
    with running_server(ServerConfig(max_tensor_elements=5000)) as (_, target):
        with ad.connect(target, timeout=30, retry_seconds=0) as c:
            with pytest.raises(ad.errors.LimitExceededError, match="pattern"):
                c.sparsity(dense)
            small = ad.trace(lambda x: x - ad.mean(x), x=ad.f64(50))
            assert c.jacobian(small, sparse=True, x=np.ones(50))["out"]["x"].nnz == 2500


def test_pattern_is_cached_with_the_compiled_graph(server):
    srv, target = server
    g = ad.trace(lambda x: ad.sum(ad.exp(x[1:] * x[:-1])), x=ad.f64(12))
    compiler = srv.adsvc_servicer.compiler
    with channel(target) as ch:
        first = stub(ch).Sparsity(S.SparsityRequest(**_request(g, "hessian")), timeout=30)
        entries = [e for e in list(compiler.cache._items.values()) if e[0].sparsity]
        held = {id(s) for e, _ in entries for s in e.sparsity.values()}
        again = stub(ch).Sparsity(S.SparsityRequest(**_request(g, "hessian")), timeout=30)
        now = {id(s) for e, _ in compiler.cache._items.values() for s in e.sparsity.values()}
    assert first == again and held <= now
    weights = [w for e, w in compiler.cache._items.values() if e.sparsity]
    assert all(w[0] > 0 for w in weights)
    assert isinstance(sparse.from_proto(first).pattern, sp.csr_matrix)
