"""The names differentiation adds to a graph: one grammar that builds and parses them.

Pass k of a differentiation (k = 1, 2, ...) adds ``tangent{k}:<x>`` inputs and
``tangent{k}:<o>`` outputs (forward), or ``cotangent{k}:<o>`` inputs and
``grad{k}:<x>`` outputs (reverse); the suffix is empty for k = 1. Names nest:
``tangent2:grad:x`` is the tangent (pass 2) of the gradient (pass 1) of input x.
User names never contain ':' (that is what keeps the two apart).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

TANGENT, COTANGENT, GRAD = "tangent", "cotangent", "grad"
KINDS = (TANGENT, COTANGENT, GRAD)
# pass 1 has no number; pass k >= 2 is written out ("tangent1:x" is not a derived name)
_DERIVED = re.compile(r"^(tangent|cotangent|grad)([2-9]|[1-9][0-9]+)?:(.+)$", re.S)


class Derived(NamedTuple):
    """A parsed derived name: `kind` of pass `k` of the value called `base`."""

    kind: str
    k: int
    base: str


def derived(kind: str, base: str, k: int = 1) -> str:
    """The name pass `k` gives the `kind` ("tangent", "cotangent", "grad") of `base`."""
    if kind not in KINDS:
        raise ValueError(f"unknown derived-name kind {kind!r}")
    return f"{kind}{'' if k == 1 else k}:{base}"


def tangent(base: str, k: int = 1) -> str:
    """The name pass `k` gives the tangent of `base` (`tangent:x`, `tangent2:x`)."""
    return derived(TANGENT, base, k)


def cotangent(base: str, k: int = 1) -> str:
    """The name pass `k` gives the cotangent of `base` (`cotangent:z`, `cotangent2:z`)."""
    return derived(COTANGENT, base, k)


def grad(base: str, k: int = 1) -> str:
    """The name pass `k` gives the gradient of `base` (`grad:x`, `grad2:x`)."""
    return derived(GRAD, base, k)


@functools.lru_cache(maxsize=8192)  # a client parses the same few names on every call
def parse(name: str) -> Derived | None:
    """The outermost derivation of `name`, or None if differentiation did not make it."""
    m = _DERIVED.match(name)
    if m is None:
        return None
    return Derived(m.group(1), int(m.group(2) or 1), m.group(3))


def is_primal(name: str) -> bool:
    """True for names the user gave (no ':'), false for names differentiation added."""
    return ":" not in name


def bases(names, kind: str, k: int = 1) -> list[str]:
    """The bases of the names in `names` that are `kind` of pass `k`, in order:
    ``bases(["x", "grad:x", "grad:y"], "grad") == ["x", "y"]``."""
    out = []
    for name in names:
        d = parse(name)
        if d is not None and d.kind == kind and d.k == k:
            out.append(d.base)
    return out


def check_user_name(name, what: str) -> None:
    """ValueError unless `name` is a non-empty string without ':' (names with ':' are the
    ones differentiation adds)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"bad {what} name {name!r}: use a non-empty string without ':' "
                         "(names with ':' are the ones differentiation adds)")
