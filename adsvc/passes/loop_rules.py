"""Derivatives of loops: passes over their bodies (no second AD implementation).

- JVP of a loop: the same loop over the body's JVP (`jvp_graph`), with a tangent carry
  for every carry that is active, found as a fixed point (a carry that starts constant
  becomes active once the body mixes an active value into it).
- VJP of a scan: a saving variant of the scan stores the carry entering every step; a
  reverse scan runs the body's VJP (`vjp_graph`), which recomputes the body's inner
  values from the stored carry, carries the carries' cotangents back, sums the consts'
  cotangents in a carry and emits the xs' cotangents as its ys.
- Checkpointing: when the stored carries would exceed the budget (`carry_budget`), or
  the scan asks for it (`checkpoint` = k), only every k-th carry is stored (k = ⌈√n⌉ by
  default); the backward sweep runs over segments, recomputing each segment's carries
  from its checkpoint with a saving inner scan and reversing it. The padded tail of
  the last segment leaves the carry unchanged (a mask), so any length works.
- VJP of a while loop: its saving variant records the trip count and the carries
  (bounded by max_iters); a reverse scan with that trip count runs the body's VJP.

`share_saved` then lets the primal results read the saving loop, so a gradient runs
the forward loop once. Everything built here is ordinary IR: derivatives of derivatives
(Hessians through loops) come from the same rules.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from adsvc.interrupt import compile_check
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, make
from adsvc.machine import memory_fraction
from adsvc.ops import api as A
from adsvc.passes import loops
from adsvc.passes.activity import active_nodes
from adsvc.passes.bodies import fresh_inputs, make_body, role_names, substitute
from adsvc.passes.forward import jvp_graph
from adsvc.passes.reverse import vjp_graph
from adsvc_protocol import dtypes

# The default budget for stored carries: a quarter of the default evaluation budget
# (half the machine's memory), what adsvc.local() uses, so that differentiating by hand
# and through a client make the same choice.
_BUDGET: ContextVar[int] = ContextVar("adsvc_carry_budget", default=memory_fraction(0.5) // 4)

# The JVP of a loop or branch node S is a node T whose results include S's own:
# T -> (S, {index of S's result: index of the same value among T's}). `share_loops`
# reads it so that forward mode runs the loop once (a fact about interned nodes, kept
# only while T lives).
PRIMAL_RESULTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_primal(t: Node, s: Node, mapping: dict[int, int]) -> None:
    """Note that results `mapping` of `s` are results of `t` (its JVP node)."""
    PRIMAL_RESULTS[t] = (s, mapping)


@contextmanager
def carry_budget(nbytes: int | None) -> Iterator[None]:
    """Within the block, a scan's VJP checkpoints (unless its `checkpoint` says) when
    storing every carry would take more than `nbytes` (None: the default, an eighth
    of this machine's memory)."""
    token = _BUDGET.set(_BUDGET.get() if nbytes is None else int(nbytes))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _float(n: Node) -> bool:
    return dtypes.is_float(n.dtype)


def _varying(n: Node) -> bool:
    """A float operand that may carry a derivative (constants never do)."""
    return _float(n) and n.op != "constant"


def _nbytes(n: Node) -> int:
    return n.size * np.dtype(dtypes.to_numpy(n.dtype)).itemsize


def _zeros(n: Node) -> Node:
    return A.zeros(n.shape, n.dtype)


def _attrs(node: Node, **changes) -> dict:
    return {**dict(node.attrs), **changes}


def _outs(graph: Graph) -> list[Node]:
    return [n for _, n in graph.outputs]


# -- forward mode -----------------------------------------------------------------------------
def active_carries(body: Graph, n_c: int, seeds: set[int]) -> set[int]:
    """Body input indices that carry tangents: `seeds` and, to a fixed point, every
    float carry whose new value depends on an active input."""
    active = set(seeds)
    outs = _outs(body)[:n_c]
    while True:
        wrt = [body.inputs[i] for i in sorted(active)]
        live = active_nodes(body, wrt, outs) if wrt else set()
        new = active | {i for i, o in enumerate(outs) if id(o) in live and _float(o)}
        if new == active:
            return active
        active = new


def tangent_body(body: Graph, n_c: int, n_x: int, act: set[int]):
    """The body's JVP laid out as a loop body: inputs (c, dc, x, dx, k, dk), outputs
    (c', dc', y, dy); returns (graph, active carries, xs, consts, ys: index lists)."""
    wrt = [body.inputs[i] for i in sorted(act)]
    outs = _outs(body)
    live = active_nodes(body, wrt, outs)
    ac = [i for i in sorted(act) if i < n_c]
    ax = [i - n_c for i in sorted(act) if n_c <= i < n_c + n_x]
    ak = [i - n_c - n_x for i in sorted(act) if i >= n_c + n_x]
    ay = [j - n_c for j in range(n_c, len(outs)) if id(outs[j]) in live and _float(outs[j])]
    targets = ac + [n_c + j for j in ay]
    tg, _ = jvp_graph(body, wrt, [body.outputs[j][0] for j in targets],
                      check=compile_check())
    n_in, n_out = len(body.inputs), len(outs)
    tan_in = dict(zip(sorted(act), tg.inputs[n_in:]))
    tan_out = dict(zip(targets, _outs(tg)[n_out:]))
    ins = (list(tg.inputs[:n_c]) + [tan_in[i] for i in ac]
           + list(tg.inputs[n_c:n_c + n_x]) + [tan_in[n_c + i] for i in ax]
           + list(tg.inputs[n_c + n_x:n_in]) + [tan_in[n_c + n_x + i] for i in ak])
    new_outs = (outs[:n_c] + [tan_out[i] for i in ac] + outs[n_c:]
                + [tan_out[n_c + j] for j in ay])
    n_k = n_in - n_c - n_x
    names = (role_names("c", n_c + len(ac)) + role_names("x", n_x + len(ax))
             + role_names("k", n_k + len(ak)))
    out_names = role_names("c", n_c + len(ac)) + role_names("y", len(new_outs) - n_c - len(ac))
    return make_body(ins, new_outs, names, out_names, body.name), ac, ax, ak, ay


def _tangents(ops, ts, idx) -> list[Node]:
    return [ts[i] if ts[i] is not None else _zeros(ops[i]) for i in idx]


def scan_jvp(node: Node, ts):
    """JVP of a scan: a scan over the body's JVP."""
    p = loops.scan_parts(node.inputs, dict(node.attrs))
    body, off = node.attr("body"), p.offset
    n_c, n_x, n_k = len(p.carries), len(p.xs), len(p.consts)
    seeds = {i for i in range(n_c + n_x + n_k) if ts[off + i] is not None}
    act = active_carries(body, n_c, seeds)
    if not act:
        return None
    tb, ac, ax, ak, ay = tangent_body(body, n_c, n_x, act)
    ts_c, ts_x, ts_k = ts[off:off + n_c], ts[off + n_c:off + n_c + n_x], ts[off + n_c + n_x:]
    operands = ([p.count] if p.count is not None else []) + [
        *p.carries, *_tangents(p.carries, ts_c, ac), *p.xs, *_tangents(p.xs, ts_x, ax),
        *p.consts, *_tangents(p.consts, ts_k, ak)]
    t = make("scan", operands, _attrs(node, body=tb, carries=n_c + len(ac), xs=n_x + len(ax)))
    n_y = len(body.outputs) - n_c
    same = {i: i for i in range(n_c)} | {n_c + j: n_c + len(ac) + j for j in range(n_y)}
    if p.save:
        base = n_c + len(ac) + n_y + len(ay)
        same |= {n_c + n_y + i: base + i for i in range(n_c)}
    record_primal(t, node, same)
    out: list[Node | None] = [None] * len(node.types)
    for q, i in enumerate(ac):
        out[i] = A.element(t, n_c + q)
    for q, j in enumerate(ay):
        out[n_c + j] = A.element(t, n_c + len(ac) + n_y + q)
    if p.save:
        base = n_c + len(ac) + n_y + len(ay) + n_c
        for q, i in enumerate(ac):
            out[n_c + n_y + i] = A.element(t, base + q)
    return tuple(out) if any(o is not None for o in out) else None


def while_jvp(node: Node, ts):
    """JVP of a while loop: a while loop over the body's JVP (same condition)."""
    n_c = node.attr("carries")
    body, cond = node.attr("body"), node.attr("cond")
    seeds = {i for i, t in enumerate(ts) if t is not None}
    act = active_carries(body, n_c, seeds)
    if not any(i < n_c for i in act):
        return None
    tb, ac, _, ak, _ = tangent_body(body, n_c, 0, act)
    n_k = len(node.inputs) - n_c
    extra_c = fresh_inputs("dc", [(body.inputs[i].dtype, body.inputs[i].shape) for i in ac])
    extra_k = fresh_inputs("dk", [(body.inputs[n_c + i].dtype, body.inputs[n_c + i].shape)
                                  for i in ak])
    cins = list(cond.inputs[:n_c]) + extra_c + list(cond.inputs[n_c:]) + extra_k
    cond2 = make_body(cins, _outs(cond), role_names("c", n_c + len(ac))
                      + role_names("k", n_k + len(ak)), cond.output_names, cond.name)
    carries, consts = node.inputs[:n_c], node.inputs[n_c:]
    operands = [*carries, *_tangents(carries, ts, ac), *consts,
                *_tangents(consts, ts[n_c:], ak)]
    t = make("while_loop", operands, _attrs(node, body=tb, cond=cond2,
                                            carries=n_c + len(ac)))
    same = {i: i for i in range(n_c)}
    if node.attr("save"):
        same |= {n_c + j: n_c + len(ac) + j for j in range(1 + n_c)}
    record_primal(t, node, same)
    out: list[Node | None] = [None] * len(node.types)
    for q, i in enumerate(ac):
        out[i] = A.element(t, n_c + q)
        if node.attr("save"):
            out[n_c + 1 + i] = A.element(t, n_c + len(ac) + 1 + n_c + q)
    return tuple(out)


# -- reverse mode ------------------------------------------------------------------------------
def relevant_carries(body: Graph, floats, seeds: set[int], ys) -> list[int]:
    """The float carries whose cotangent is not identically zero: `seeds` (a cotangent
    arrives for them from outside) and, to a fixed point, every carry whose value in a
    step reaches (differentiably) a relevant carry's new value or a y with a cotangent
    (`ys`, output indices). A carry that only feeds the loop's condition is not one."""
    relevant = set(seeds)
    outs = _outs(body)
    while True:
        targets = [outs[i] for i in sorted(relevant)] + [outs[j] for j in ys]
        new = set(relevant)
        for i in floats:
            if i not in new and targets and id(body.inputs[i]) in active_nodes(
                    body, [body.inputs[i]], targets):
                new.add(i)
        if new == relevant:
            return sorted(relevant)
        relevant = new


def backward_body(body: Graph, n_c: int, n_x: int, fc, ax, ak, yc, sc) -> Graph:
    """The body's VJP laid out as the body of the backward scan.

    carries: the cotangents of the float carries `fc`, the sums of the consts' `ak`
    cotangents; xs: the stored carries (all), the xs, the ys' cotangents `yc`, the stored
    carries' own cotangents `sc`; consts: the consts. Returns the cotangents of the
    carries entering the step, the sums so far, and (as ys) the xs' `ax` cotangents.
    """
    b_in, outs = body.inputs, _outs(body)
    n_k = len(b_in) - n_c - n_x
    wrt = [b_in[i] for i in fc] + [b_in[n_c + i] for i in ax] + [b_in[n_c + n_x + i] for i in ak]
    targets = [body.outputs[i][0] for i in fc] + [body.outputs[n_c + j][0] for j in yc]
    vg, _ = vjp_graph(body, wrt, targets, check=compile_check())

    def types(idx, base=0):
        return [(b_in[base + i].dtype, b_in[base + i].shape) for i in idx]
    ct_c = fresh_inputs("ct", types(fc))
    acc = fresh_inputs("acc", types(ak, n_c + n_x))
    stored = fresh_inputs("c", types(range(n_c)))
    xs = fresh_inputs("x", types(range(n_x), n_c))
    ct_y = fresh_inputs("cty", [(outs[n_c + j].dtype, outs[n_c + j].shape) for j in yc])
    ct_s = fresh_inputs("cts", types(sc))
    consts = fresh_inputs("k", types(range(n_k), n_c + n_x))
    mapping = {id(b): v for b, v in zip(b_in, stored + xs + consts)}
    cot_in = vg.inputs[len(b_in):]
    mapping.update({id(b): v for b, v in zip(cot_in, ct_c + ct_y)})
    grads = substitute(_outs(vg)[len(outs):], mapping)
    g_c, g_x, g_k = grads[:len(fc)], grads[len(fc):len(fc) + len(ax)], grads[len(fc) + len(ax):]
    extra = dict(zip(sc, ct_s))
    new_c = [A.add(g, extra[i]) if i in extra else g for g, i in zip(g_c, fc)]
    new_acc = [A.add(a, g) for a, g in zip(acc, g_k)]
    ins = ct_c + acc + stored + xs + ct_y + ct_s + consts
    n_carry = len(fc) + len(ak)
    names = (role_names("c", n_carry) + role_names("x", n_c + n_x + len(yc) + len(sc))
             + role_names("k", n_k))
    return make_body(ins, new_c + new_acc + g_x, names,
                     role_names("c", n_carry) + role_names("y", len(ax)), body.name)


def _expand_saved(ct: Node, length: int, save: int) -> Node:
    """Cotangents of every save-th stored carry as one row per step (zeros between)."""
    if save == 1:
        return ct
    rows = ct.shape[0]
    high = length - ((rows - 1) * save + 1)
    rest = (0,) * (ct.ndim - 1)
    return A.pad(ct, (0, *rest), (high, *rest), (save - 1, *rest))


def checkpoint_interval(node: Node, p) -> int:
    """1: store every carry; k > 1: store every k-th (only forward scans without a trip
    count are checkpointed; the backward scans of derivatives store)."""
    if p.count is not None or p.reverse or p.save or not isinstance(p.length, int) \
            or p.length < 4:  # a symbolic length: stored whole (segments need its value)
        return 1
    asked = node.attr("checkpoint")
    if asked >= 1:
        return min(asked, p.length)
    stored = p.length * sum(_nbytes(c) for c in p.carries)
    if not isinstance(stored, int):  # symbolic carries: the budget is checked when bound
        return 1
    return math.isqrt(p.length - 1) + 1 if stored > _BUDGET.get() else 1


def scan_vjp(node: Node, ct):
    """VJP of a scan: a reverse scan over the body's VJP from the stored carries."""
    p = loops.scan_parts(node.inputs, dict(node.attrs))
    body = node.attr("body")
    n_c, n_x = len(p.carries), len(p.xs)
    n_y = len(body.outputs) - n_c
    ct = list(ct)
    ct_c, ct_y = ct[:n_c], ct[n_c:n_c + n_y]
    ct_s = ct[n_c + n_y:] if p.save else [None] * n_c
    floats = [i for i, c in enumerate(p.carries) if _float(c)]
    ax = [i for i, x in enumerate(p.xs) if _varying(x)]
    ak = [i for i, k in enumerate(p.consts) if _varying(k)]
    yc = [j for j in range(n_y) if ct_y[j] is not None]
    sc = [i for i in floats if ct_s[i] is not None]
    fc = relevant_carries(body, floats, {i for i in floats if ct_c[i] is not None} | set(sc),
                          [n_c + j for j in yc])
    interval = checkpoint_interval(node, p)
    if interval > 1:
        return _checkpointed_vjp(node, p, (ct_c, ct_y), (fc, ax, ak, yc), interval)
    saving = node if p.save == 1 else make("scan", node.inputs, _attrs(node, save=1))
    stored = [A.element(saving, n_c + n_y + i) for i in range(n_c)]
    bb = backward_body(body, n_c, n_x, fc, ax, ak, yc, sc)
    operands = ([p.count] if p.count is not None else []) + [
        *[ct_c[i] if ct_c[i] is not None else _zeros(p.carries[i]) for i in fc],
        *[_zeros(p.consts[i]) for i in ak], *stored, *p.xs, *[ct_y[j] for j in yc],
        *[_expand_saved(ct_s[i], p.length, p.save) for i in sc], *p.consts]
    b = make("scan", operands, _attrs(
        node, body=bb, carries=len(fc) + len(ak), xs=n_c + n_x + len(yc) + len(sc),
        reverse=not p.reverse, save=0, checkpoint=1))
    return _scan_cts(p, b, fc, ax, ak)


def _scan_cts(p, b: Node, fc, ax, ak, xs_of=lambda v: v) -> list:
    """The scan operands' cotangents from the backward scan `b`'s results."""
    res: list[Node | None] = [None] * (p.offset + len(p.carries) + len(p.xs) + len(p.consts))
    off = p.offset
    for q, i in enumerate(fc):
        res[off + i] = A.element(b, q)
    for q, i in enumerate(ak):
        res[off + len(p.carries) + len(p.xs) + i] = A.element(b, len(fc) + q)
    for q, i in enumerate(ax):
        res[off + len(p.carries) + i] = xs_of(A.element(b, len(fc) + len(ak) + q))
    return res


def _masked_body(body: Graph, n_c: int, n_x: int, masked: bool = True) -> Graph:
    """The body with one more xs input, a bool m: carries change only where m holds
    (`masked` False: m is ignored)."""
    b_in, outs = list(body.inputs), _outs(body)
    m = fresh_inputs("m", [(dtypes.BOOL, ())])[0]
    new_c = ([A.where(m, o, c) for o, c in zip(outs[:n_c], b_in[:n_c])] if masked
             else outs[:n_c])
    ins = b_in[:n_c + n_x] + [m] + b_in[n_c + n_x:]
    n_k = len(b_in) - n_c - n_x
    return make_body(ins, new_c + outs[n_c:], role_names("c", n_c) + role_names("x", n_x + 1)
                     + role_names("k", n_k), body.output_names, body.name)


def _checkpointed_vjp(node: Node, p, cts, idx, k: int) -> list:
    """VJP of a forward scan storing every k-th carry (see the module docstring)."""
    (ct_c, ct_y), (fc, ax, ak, yc) = cts, idx
    body, n = node.attr("body"), p.length
    n_c, n_x = len(p.carries), len(p.xs)
    n_y = len(body.outputs) - n_c
    q = -(-n // k)
    padded = q * k
    ck = make("scan", node.inputs, _attrs(node, save=k))
    checkpoints = [A.element(ck, n_c + n_y + i) for i in range(n_c)]
    # each segment gets its index; its body masks the padded steps from it (O(√n)
    # constants, never O(n): a scan may be as long as its trip count allows)
    index = constant(np.arange(q, dtype=np.int64))

    def segments(v: Node, pad_zeros: bool) -> Node:
        """`v` (n rows) as (q, k) rows: padded with zero rows (cotangents) or with copies
        of its last row (xs, so the padded steps see real values)."""
        rest = (0,) * (v.ndim - 1)
        if padded == n:
            full = v
        elif pad_zeros:
            full = A.pad(v, (0, *rest), (padded - n, *rest))
        else:
            last = A.slice(v, (n - 1, *rest), v.shape)
            full = A.concat([v, A.broadcast_to(last, (padded - n, *v.shape[1:]))], 0)
        return A.reshape(full, (q, k, *v.shape[1:]))
    sb = _segment_body(body, p, (fc, ax, ak, yc), k)
    operands = [*[ct_c[i] if ct_c[i] is not None else _zeros(p.carries[i]) for i in fc],
                *[_zeros(p.consts[i]) for i in ak], *checkpoints,
                *[segments(x, False) for x in p.xs], index,
                *[segments(ct_y[j], True) for j in yc], *p.consts]
    b = make("scan", operands, {"body": sb, "carries": len(fc) + len(ak),
                                "xs": n_c + n_x + 1 + len(yc), "length": q, "reverse": True,
                                "checkpoint": 1})

    def unsegment(v: Node) -> Node:
        flat = A.reshape(v, (padded, *v.shape[2:]))
        rest = (0,) * (flat.ndim - 1)
        return A.slice(flat, (0, *rest), (n, *flat.shape[1:]))
    return _scan_cts(p, b, fc, ax, ak, unsegment)


def _segment_body(body: Graph, p, idx, k: int) -> Graph:
    """Body of the checkpointed backward scan: one segment of k steps, its carries
    recomputed from the checkpoint by a saving scan, then reversed by `scan_vjp`. (When
    k divides the length no step is padding: the mask input is there but unused.)"""
    fc, ax, ak, yc = idx
    n_c, n_x = len(p.carries), len(p.xs)
    masked = _masked_body(body, n_c, n_x, p.length % k != 0)
    outs = _outs(body)
    ct_c = fresh_inputs("ct", [(p.carries[i].dtype, p.carries[i].shape) for i in fc])
    acc = fresh_inputs("acc", [(p.consts[i].dtype, p.consts[i].shape) for i in ak])
    cp = fresh_inputs("c", [(c.dtype, c.shape) for c in p.carries])
    xs = fresh_inputs("x", [(x.dtype, (k, *x.shape[1:])) for x in p.xs])
    seg = fresh_inputs("j", [(dtypes.INT64, ())])  # the segment's index
    m = A.lt(A.add(A.mul(seg[0], k), constant(np.arange(k, dtype=np.int64))),
             constant(np.int64(p.length)))  # which of its k steps are real
    ct_y = fresh_inputs("cty", [(outs[n_c + j].dtype, (k, *outs[n_c + j].shape)) for j in yc])
    consts = fresh_inputs("k", [(c.dtype, c.shape) for c in p.consts])
    inner = make("scan", [*cp, *xs, m, *consts], {
        "body": masked, "carries": n_c, "xs": n_x + 1, "length": k, "save": 1,
        "checkpoint": 1})
    inner_ct: list[Node | None] = [None] * len(inner.types)
    for q, i in enumerate(fc):
        inner_ct[i] = ct_c[q]
    for q, j in enumerate(yc):
        inner_ct[n_c + j] = ct_y[q]
    got = scan_vjp(inner, tuple(inner_ct))
    new_c = [got[i] if got[i] is not None else _zeros(p.carries[i]) for i in fc]
    new_acc = [A.add_any(a, got[n_c + n_x + 1 + i]) for a, i in zip(acc, ak)]
    g_x = [got[n_c + i] if got[n_c + i] is not None else A.zeros(x.shape, x.dtype)
           for i, x in zip(ax, [xs[i] for i in ax])]
    ins = ct_c + acc + cp + xs + seg + ct_y + consts
    n_carry = len(fc) + len(ak)
    return make_body(ins, new_c + new_acc + g_x,
                     role_names("c", n_carry) + role_names("x", n_c + n_x + 1 + len(yc))
                     + role_names("k", len(p.consts)),
                     role_names("c", n_carry) + role_names("y", len(ax)), body.name)


def while_vjp(node: Node, ct):
    """VJP of a while loop: a reverse scan, as long as the recorded trip count, over the
    body's VJP from the recorded carries."""
    n_c = node.attr("carries")
    body, m = node.attr("body"), node.attr("max_iters")
    carries, consts = node.inputs[:n_c], node.inputs[n_c:]
    ct = list(ct)
    ct_c = ct[:n_c]
    ct_s = ct[n_c + 1:] if node.attr("save") else [None] * n_c
    floats = [i for i, c in enumerate(carries) if _float(c)]
    ak = [i for i, k in enumerate(consts) if _varying(k)]
    sc = [i for i in floats if ct_s[i] is not None]
    fc = relevant_carries(body, floats, {i for i in floats if ct_c[i] is not None} | set(sc),
                          [])
    saving = node if node.attr("save") else make("while_loop", node.inputs,
                                                 _attrs(node, save=True))
    trips = A.element(saving, n_c)
    stored = [A.element(saving, n_c + 1 + i) for i in range(n_c)]
    bb = backward_body(body, n_c, 0, fc, [], ak, [], sc)
    operands = [trips, *[ct_c[i] if ct_c[i] is not None else _zeros(carries[i]) for i in fc],
                *[_zeros(consts[i]) for i in ak], *stored, *[ct_s[i] for i in sc], *consts]
    b = make("scan", operands, {"body": bb, "carries": len(fc) + len(ak),
                                "xs": n_c + len(sc), "length": m, "reverse": True,
                                "counted": True, "checkpoint": 1})
    res: list[Node | None] = [None] * len(node.inputs)
    for q, i in enumerate(fc):
        res[i] = A.element(b, q)
    for q, i in enumerate(ak):
        res[n_c + i] = A.element(b, len(fc) + q)
    return res


# -- sharing the forward loop ------------------------------------------------------------------
LOOPS = ("scan", "while_loop", "cond")


def _loop_key(n: Node) -> tuple:
    return (n.op, tuple(map(id, n.inputs)), tuple(kv for kv in n.attrs if kv[0] != "save"))


def _aliases(graph: Graph) -> dict[int, Node]:
    """element(S, i) -> the same value read from a node that computes more and is in
    the graph anyway: S's saving variant (made by a VJP), or S's JVP node."""
    nodes = graph.nodes
    present = {id(n) for n in nodes}
    saving = {}
    for n in nodes:
        if n.op in ("scan", "while_loop") and n.attr("save"):
            saving.setdefault(_loop_key(n), n)
    covers: dict[int, tuple[Node, dict]] = {}
    for n in nodes:
        got = PRIMAL_RESULTS.get(n) if n.op in LOOPS else None
        if got is not None and id(got[0]) in present:
            covers.setdefault(id(got[0]), (n, got[1]))
    mapping = {}
    for n in nodes:
        src = n.inputs[0] if n.op == "element" else None
        if src is None or src.op not in LOOPS:
            continue
        i = n.attr("index")
        if id(src) in covers and i in covers[id(src)][1]:
            t, same = covers[id(src)]
            mapping[id(n)] = A.element(t, same[i])
        elif src.op != "cond" and not src.attr("save") and _loop_key(src) in saving:
            mapping[id(n)] = A.element(saving[_loop_key(src)], i)
    return mapping


def share_saved(graph: Graph) -> Graph:
    """`graph` with the results of each loop (or branch) read from a node that computes
    them anyway — its saving variant (made by a VJP) or its JVP — so that a derivative
    runs each loop once."""
    for _ in range(8):  # a JVP of a saving loop: two hops
        mapping = _aliases(graph)
        if not mapping:
            return graph
        outs = substitute([n for _, n in graph.outputs], mapping)
        graph = Graph(graph.inputs, list(zip(graph.output_names, outs)), graph.name)
    return graph


loops.register_loops(scan_jvp, scan_vjp, while_jvp, while_vjp)
