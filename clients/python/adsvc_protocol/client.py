"""The client interface shared by the in-process and the remote client.

`ClientBase` implements evaluate, grad, value_and_grad, jvp, vjp, jacobian, hessian
and differentiate on top of three primitives a concrete client provides:
`_compile` (differentiate a graph, returning a `Compiled` with its signature),
`_run` (evaluate a compiled graph on named inputs) and `_run_many` (several input
sets for one compiled graph). The names of the inputs/outputs that differentiation
adds are documented in protos/README.md: ``tangent:x``, ``cotangent:z``,
``grad:x`` (and ``tangent2:``, ``grad2:`` ... for higher passes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adsvc_protocol import dtypes
from adsvc_protocol.errors import InvalidRequestError

TypeSig = tuple[str, tuple[int, ...]]  # (dtype, shape)


@dataclass
class Compiled:
    """A compiled (differentiated, planned) graph and its signature."""

    handle: Any
    inputs: dict[str, TypeSig]
    outputs: dict[str, TypeSig]
    graph: Any = None  # the graph object, in the concrete client's representation


MODES = ("forward", "reverse")


def normalize_modes(mode, order: int | None = None) -> tuple[str, ...]:
    """One mode per differentiation pass. `mode` is "forward", "reverse" or a sequence
    of them; a single mode is repeated `order` times; `order` defaults to the number of
    modes given."""
    if order is None:
        order = 1 if isinstance(mode, str) else len(tuple(mode))
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise InvalidRequestError(f"order must be an integer >= 1, got {order!r}",
                                  field="order")
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if len(modes) == 1:
        modes *= order
    if len(modes) != order:
        raise InvalidRequestError(f"{len(modes)} modes given for order {order}",
                                  field="mode")
    for m in modes:
        if m not in MODES:
            raise InvalidRequestError(f"unknown mode {m!r} (use 'forward' or 'reverse')",
                                      field="mode")
    return modes


def _wrt_tuple(wrt) -> tuple[str, ...] | None:
    if wrt is None:
        return None
    return (wrt,) if isinstance(wrt, str) else tuple(wrt)


def _one_hot(dtype: str, shape, flat_index: int) -> np.ndarray:
    a = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=dtypes.to_numpy(dtype))
    a[flat_index] = 1
    return a.reshape(shape)


def _ordered(out: Mapping[str, Any], c: Compiled) -> dict[str, Any]:
    """Results in the graph's output order (a server's map has none)."""
    return {k: out[k] for k in c.outputs if k in out}


def _zeros(sig: TypeSig) -> np.ndarray:
    return np.zeros(sig[1], dtype=dtypes.to_numpy(sig[0]))


class ClientBase:
    """Values and derivatives of graphs. See the module docstring."""

    # -- primitives ------------------------------------------------------------------
    def _compile(self, graph, modes: tuple[str, ...], wrt: tuple[str, ...] | None,
                 seed: bool, timeout: float | None) -> Compiled:
        raise NotImplementedError

    def _run(self, compiled: Compiled, feeds: Mapping[str, Any],
             timeout: float | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _run_many(self, compiled: Compiled, feeds: Sequence[Mapping[str, Any]],
                  timeout: float | None) -> list[dict[str, np.ndarray]]:
        return [self._run(compiled, f, timeout) for f in feeds]

    # -- public API --------------------------------------------------------------------
    def evaluate(self, g, inputs: Mapping[str, Any] | None = None, *,
                 timeout: float | None = None, **kw) -> dict[str, np.ndarray]:
        """{output name: value} of graph `g` at the given inputs."""
        c = self._compile(g, (), None, False, timeout)
        return _ordered(self._run(c, {**(inputs or {}), **kw}, timeout), c)

    def differentiate(self, g, mode="reverse", wrt=None, order: int | None = None, *,
                      seed: bool = False, timeout: float | None = None):
        """The differentiated graph (see protos/README.md for the names it adds).

        `mode` is "forward", "reverse" or one mode per order, e.g. ("reverse", "forward")
        for Hessian-vector products (`order` defaults to the number of modes given).
        `seed` makes a first reverse pass a plain gradient of
        a single scalar output (no cotangent input).
        """
        modes = normalize_modes(mode, order)
        return self._compile(g, modes, _wrt_tuple(wrt), seed, timeout).graph

    def value_and_grad(self, g, wrt=None, mode: str = "reverse",
                       inputs: Mapping[str, Any] | None = None, *,
                       timeout: float | None = None, **kw):
        """(value, {wrt input: gradient}) of a graph with exactly one scalar float output."""
        feeds = {**(inputs or {}), **kw}
        wrt = _wrt_tuple(wrt)
        if mode == "reverse":
            c = self._compile(g, ("reverse",), wrt, True, timeout)
            out = _ordered(self._run(c, feeds, timeout), c)
            name = self._scalar_output(c)
            return out[name], {k[5:]: v for k, v in out.items() if k.startswith("grad:")}
        if mode != "forward":
            raise InvalidRequestError(f"unknown mode {mode!r}", field="mode")
        c = self._compile(g, ("forward",), wrt, False, timeout)
        name = self._scalar_output(c)
        wrt_names = [k[8:] for k in c.inputs if k.startswith("tangent:")]
        runs, index = [], []
        zero = {f"tangent:{x}": _zeros(c.inputs[f"tangent:{x}"]) for x in wrt_names}
        for x in wrt_names:
            dt, shape = c.inputs[f"tangent:{x}"]
            for e in range(int(np.prod(shape, dtype=np.int64))):
                runs.append({**feeds, **zero, f"tangent:{x}": _one_hot(dt, shape, e)})
                index.append((x, e))
        grads = {x: np.zeros(c.inputs[f"tangent:{x}"][1],
                             dtype=dtypes.to_numpy(c.inputs[f"tangent:{x}"][0]))
                 for x in wrt_names}
        if not runs:  # every wrt input is empty: just evaluate
            return self._run(c, {**feeds, **zero}, timeout)[name], grads
        outs = self._run_many(c, runs, timeout)
        for (x, e), out in zip(index, outs):
            grads[x].reshape(-1)[e] = out[f"tangent:{name}"]
        return outs[0][name], grads

    def grad(self, g, wrt=None, mode: str = "reverse",
             inputs: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, **kw) -> dict[str, np.ndarray]:
        """{wrt input: gradient} of a graph with exactly one scalar float output."""
        return self.value_and_grad(g, wrt, mode, inputs, timeout=timeout, **kw)[1]

    def jvp(self, g, primals: Mapping[str, Any], tangents: Mapping[str, Any], *,
            timeout: float | None = None):
        """(outputs, {output: J @ tangent}): forward mode along `tangents` (by input name)."""
        c = self._compile(g, ("forward",), tuple(tangents), False, timeout)
        out = self._run(c, {**primals, **{f"tangent:{k}": v for k, v in tangents.items()}},
                        timeout)
        return self._split(out, c, "tangent:")

    def vjp(self, g, primals: Mapping[str, Any], cotangents: Mapping[str, Any], wrt=None, *,
            timeout: float | None = None):
        """(outputs, {wrt input: J^T @ cotangent}); missing output cotangents are zero."""
        c = self._compile(g, ("reverse",), _wrt_tuple(wrt), False, timeout)
        cts = {k: _zeros(v) for k, v in c.inputs.items() if k.startswith("cotangent:")}
        for k, v in cotangents.items():
            if f"cotangent:{k}" not in cts:
                raise InvalidRequestError(
                    f"no float output named {k!r} to take a cotangent for", field=f"cotangents.{k}")
            cts[f"cotangent:{k}"] = v
        out = self._run(c, {**primals, **cts}, timeout)
        return self._split(out, c, "grad:")

    def jacobian(self, g, wrt=None, mode: str = "reverse",
                 inputs: Mapping[str, Any] | None = None, *,
                 timeout: float | None = None, **kw) -> dict[str, dict[str, np.ndarray]]:
        """{output: {input: array of shape output.shape + input.shape}} (float outputs)."""
        feeds = {**(inputs or {}), **kw}
        if mode not in ("forward", "reverse"):
            raise InvalidRequestError(f"unknown mode {mode!r}", field="mode")
        c = self._compile(g, (mode,), _wrt_tuple(wrt), False, timeout)
        if not any(dtypes.is_float(t[0]) for k, t in c.outputs.items() if ":" not in k):
            raise InvalidRequestError("the graph has no float output to differentiate",
                                      field="outputs")
        seeds = "tangent:" if mode == "forward" else "cotangent:"
        seed_names = [k for k in c.inputs if k.startswith(seeds)]
        base = {k: _zeros(c.inputs[k]) for k in seed_names}
        runs, index = [], []
        for s in seed_names:
            dt, shape = c.inputs[s]
            for e in range(int(np.prod(shape, dtype=np.int64))):
                runs.append({**feeds, **base, s: _one_hot(dt, shape, e)})
                index.append((s[len(seeds):], e))
        if mode == "forward":
            ins = [k[8:] for k in seed_names]
            outs_ = [k[8:] for k in c.outputs if k.startswith("tangent:")]
        else:
            outs_ = [k[10:] for k in seed_names]
            ins = [k[5:] for k in c.outputs if k.startswith("grad:")]
        jac = {o: {x: np.zeros((int(np.prod(c.outputs[o][1], dtype=np.int64)),
                                int(np.prod(c.inputs[x][1], dtype=np.int64))),
                               dtype=dtypes.to_numpy(c.outputs[o][0]))
                   for x in ins} for o in outs_}
        for (name, e), out in zip(index, self._run_many(c, runs, timeout) if runs else []):
            if mode == "forward":  # column e of every output's block for input `name`
                for o in outs_:
                    jac[o][name][:, e] = np.ravel(out[f"tangent:{o}"])
            else:  # row e of output `name`'s blocks
                for x in ins:
                    jac[name][x][e, :] = np.ravel(out[f"grad:{x}"])
        return {o: {x: a.reshape(tuple(c.outputs[o][1]) + tuple(c.inputs[x][1]))
                    for x, a in row.items()} for o, row in jac.items()}

    def hessian(self, g, wrt=None, inputs: Mapping[str, Any] | None = None, *,
                timeout: float | None = None, **kw) -> dict[str, dict[str, np.ndarray]]:
        """{x_i: {x_j: d2f/dx_i dx_j of shape x_i.shape + x_j.shape}} (forward over reverse)."""
        feeds = {**(inputs or {}), **kw}
        c = self._compile(g, ("reverse", "forward"), _wrt_tuple(wrt), True, timeout)
        self._scalar_output(c)
        xs = [k[9:] for k in c.inputs if k.startswith("tangent2:")]
        base = {f"tangent2:{x}": _zeros(c.inputs[f"tangent2:{x}"]) for x in xs}
        runs, index = [], []
        for xj in xs:
            dt, shape = c.inputs[f"tangent2:{xj}"]
            for e in range(int(np.prod(shape, dtype=np.int64))):
                runs.append({**feeds, **base, f"tangent2:{xj}": _one_hot(dt, shape, e)})
                index.append((xj, e))
        size = {x: int(np.prod(c.inputs[x][1], dtype=np.int64)) for x in xs}
        h = {xi: {xj: np.zeros((size[xi], size[xj]), dtype=dtypes.to_numpy(c.inputs[xi][0]))
                  for xj in xs} for xi in xs}
        for (xj, e), out in zip(index, self._run_many(c, runs, timeout) if runs else []):
            for xi in xs:
                h[xi][xj][:, e] = np.ravel(out[f"tangent2:grad:{xi}"])
        return {xi: {xj: a.reshape(tuple(c.inputs[xi][1]) + tuple(c.inputs[xj][1]))
                     for xj, a in row.items()} for xi, row in h.items()}

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _scalar_output(c: Compiled) -> str:
        primal = [k for k in c.outputs if ":" not in k]
        floats = [k for k in primal if dtypes.is_float(c.outputs[k][0])]
        if len(floats) != 1 or c.outputs[floats[0]][1] != ():
            raise InvalidRequestError(
                "a gradient needs exactly one scalar float output; this graph has "
                + (", ".join(f"{k}{list(c.outputs[k][1])}" for k in primal) or "none")
                + " (use jacobian or vjp)", field="outputs")
        return floats[0]

    @staticmethod
    def _split(out: dict, c: Compiled, prefix: str):
        out = _ordered(out, c)
        primal = {k: v for k, v in out.items() if ":" not in k}
        derived = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
        return primal, derived
