"""The client interface shared by the in-process client and the SDK's remote client.

`ClientBase` gives evaluate, grad, value_and_grad, jvp, vjp, jacobian, hessian,
sparsity, hessian_diag and differentiate, each a call of the recipe of the same name
(`recipes.py`) on the primitives a concrete client provides: `_compile` (differentiate a
graph, returning a `Compiled` with its signature), `_run` (evaluate a compiled graph on
named inputs), `_run_many` (several input sets for one compiled graph) and `_sparsity`
(the pattern and colorings of a Jacobian or Hessian, for the sparse recipes). The names
differentiation adds (``tangent:x``, ``cotangent:z``, ``grad:x``, ``tangent2:`` ...) are
documented in protos/README.md and built by `names.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adsvc_protocol import recipes
from adsvc_protocol.modes import normalize_modes
from adsvc_protocol.recipes import Compiled
from adsvc_protocol.sparse import HESSIAN, JACOBIAN, Sparsity

__all__ = ["ClientBase", "Compiled"]


class _Call:
    """A client's primitives bound to one call's timeout: the recipes' `Backend`."""

    def __init__(self, client: ClientBase, timeout: float | None):
        self.client, self.timeout = client, timeout

    def compile(self, g, modes, wrt, seed) -> Compiled:
        """The client's `_compile`, with this call's timeout."""
        return self.client._compile(g, modes, wrt, seed, self.timeout)

    def run(self, compiled, feeds, outputs=None):
        """The client's `_run`, with this call's timeout."""
        return self.client._run(compiled, feeds, self.timeout, outputs)

    def run_many(self, compiled, feeds):
        """The client's `_run_many`, with this call's timeout."""
        return self.client._run_many(compiled, feeds, self.timeout)

    def sparsity(self, g, kind, wrt) -> Sparsity:
        """The client's `_sparsity`, with this call's timeout."""
        return self.client._sparsity(g, kind, wrt, self.timeout)

    def compile_sweeps(self, g, mode, wrt, count) -> Compiled | None:
        """The client's `_compile_sweeps` (None: it has none), with this call's timeout."""
        return self.client._compile_sweeps(g, mode, wrt, count, self.timeout)


def _feeds(inputs: Mapping[str, Any] | None, kw: Mapping[str, Any]) -> dict[str, Any]:
    return {**(inputs or {}), **kw}


class ClientBase:
    """Values and derivatives of graphs. See the module docstring."""

    # -- primitives ------------------------------------------------------------------
    def _compile(self, graph, modes: tuple[str, ...], wrt: tuple[str, ...] | None,
                 seed: bool, timeout: float | None) -> Compiled:
        raise NotImplementedError

    def _run(self, compiled: Compiled, feeds: Mapping[str, Any], timeout: float | None,
             outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{output: value}; `outputs`: the names the caller reads (None: all; the result
        may hold more)."""
        raise NotImplementedError

    def _run_many(self, compiled: Compiled, feeds: Sequence[Mapping[str, Any]],
                  timeout: float | None) -> list[dict[str, np.ndarray]]:
        return [self._run(compiled, f, timeout) for f in feeds]

    def _sparsity(self, graph, kind: str, wrt: tuple[str, ...] | None,
                  timeout: float | None) -> Sparsity:
        raise NotImplementedError

    def _compile_sweeps(self, graph, mode: str, wrt: tuple[str, ...] | None, count: int,
                        timeout: float | None) -> Compiled | None:
        """`count` compressed sweeps compiled as one graph (vector mode), or None: the
        recipes then evaluate one sweep per color."""
        return None

    def _graph(self, compiled: Compiled, timeout: float | None):
        """The differentiated graph of `compiled` (a remote client fetches it once)."""
        return compiled.graph

    def close(self) -> None:
        """Release what the client holds (a channel, cached plans)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API --------------------------------------------------------------------
    def evaluate(self, g, inputs: Mapping[str, Any] | None = None, *,
                 timeout: float | None = None, **kw) -> dict[str, np.ndarray]:
        """{output name: value} of graph `g` at the given inputs."""
        return recipes.evaluate(_Call(self, timeout), g, _feeds(inputs, kw))

    def differentiate(self, g, mode="reverse", wrt=None, order: int | None = None, *,
                      seed: bool = False, timeout: float | None = None):
        """The differentiated graph (see protos/README.md for the names it adds).

        `mode` is "forward", "reverse" or one mode per order, e.g. ("reverse", "forward")
        for Hessian-vector products (`order` defaults to the number of modes given).
        `seed` makes a first reverse pass a plain gradient of a single scalar output (no
        cotangent input).
        """
        modes = normalize_modes(mode, order)
        compiled = self._compile(g, modes, recipes.wrt_tuple(wrt), seed, timeout)
        return self._graph(compiled, timeout)

    def value_and_grad(self, g, wrt=None, mode: str = "reverse",
                       inputs: Mapping[str, Any] | None = None, *,
                       timeout: float | None = None, **kw):
        """(value, {wrt input: gradient}) of a graph with exactly one scalar float output."""
        return recipes.value_and_grad(_Call(self, timeout), g, wrt, mode, _feeds(inputs, kw))

    def grad(self, g, wrt=None, mode: str = "reverse",
             inputs: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, **kw) -> dict[str, np.ndarray]:
        """{wrt input: gradient} of a graph with exactly one scalar float output."""
        return recipes.value_and_grad(_Call(self, timeout), g, wrt, mode, _feeds(inputs, kw),
                                      value=False)[1]

    def jvp(self, g, primals: Mapping[str, Any], tangents: Mapping[str, Any], *,
            timeout: float | None = None):
        """(outputs, {output: J @ tangent}): forward mode along `tangents` (by input name)."""
        return recipes.jvp(_Call(self, timeout), g, primals, tangents)

    def vjp(self, g, primals: Mapping[str, Any], cotangents: Mapping[str, Any], wrt=None, *,
            timeout: float | None = None):
        """(outputs, {wrt input: J^T @ cotangent}); missing output cotangents are zero."""
        return recipes.vjp(_Call(self, timeout), g, primals, cotangents, wrt)

    def jacobian(self, g, wrt=None, mode: str | None = None,
                 inputs: Mapping[str, Any] | None = None, *, sparse: bool = False,
                 timeout: float | None = None, **kw) -> dict[str, dict[str, Any]]:
        """{output: {input: array of shape output.shape + input.shape}} (float outputs).

        `mode`: "reverse" (the default when dense) or "forward". With `sparse`, each
        block is a scipy.sparse CSR matrix (output.size × input.size) computed with one
        sweep per color of the pattern's coloring (`sparsity`), in the mode with fewer
        colors unless `mode` is given."""
        call, feeds = _Call(self, timeout), _feeds(inputs, kw)
        if sparse:
            return recipes.sparse_jacobian(call, g, wrt, mode, feeds)
        return recipes.jacobian(call, g, wrt, mode or "reverse", feeds)

    def hessian(self, g, wrt=None, inputs: Mapping[str, Any] | None = None, *,
                sparse: bool = False, timeout: float | None = None,
                **kw) -> dict[str, dict[str, Any]]:
        """{x_i: {x_j: d2f/dx_i dx_j of shape x_i.shape + x_j.shape}} (forward over reverse).

        With `sparse`, each block is a scipy.sparse CSR matrix (x_i.size × x_j.size) from
        one Hessian-vector product per color of a star coloring of the pattern."""
        call, feeds = _Call(self, timeout), _feeds(inputs, kw)
        if sparse:
            return recipes.sparse_hessian(call, g, wrt, feeds)
        return recipes.hessian(call, g, wrt, feeds)

    def hessian_diag(self, g, wrt=None, inputs: Mapping[str, Any] | None = None, *,
                     timeout: float | None = None, **kw) -> dict[str, np.ndarray]:
        """{x: the diagonal of d2f/dx2, of x's shape}, exact for any Hessian: one
        Hessian-vector product per color of a distance-1 coloring of its pattern."""
        return recipes.hessian_diag(_Call(self, timeout), g, wrt, _feeds(inputs, kw))

    def sparsity(self, g, wrt=None, *, hessian: bool = False,
                 timeout: float | None = None) -> Sparsity:
        """The structural pattern (no values) of the Jacobian of `g`'s float outputs, or
        with `hessian` of the Hessian of its one scalar float output, with respect to
        `wrt`, and its colorings (`.pattern`, `.blocks()`, `.colors()`, `.mode`; see
        adsvc_protocol.sparse). Computed once per graph and kept with it."""
        return recipes.sparsity(_Call(self, timeout), g, wrt, HESSIAN if hessian else JACOBIAN)
