"""Symbolic dimensions: a shape entry may be a `Dim`, an integer polynomial in named
symbols (`n`, `2*n + 1`, `n*m`), instead of an int.

A graph traced with `adsvc.f64("n", 3)` has the input type `f64[n,3]`; shape rules
compute with Dims (n + 1, n * 3, n // 2 when exact), and two dims are equal when their
polynomials are. Feeds bind the symbols (`bind`): every input's shape must match its
declared one, with each symbol taking one value across all inputs — an error names the
symbol when two feeds disagree. On the wire a symbolic dim is its text (`Dim.parse`).

Comparisons that depend on the symbols' values (is n < 3?) cannot be decided and raise
ShapeError: a shape rule that needs one does not support symbolic dimensions there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from adsvc_protocol.errors import InputError, ShapeError

Monomial = tuple[tuple[str, int], ...]  # ((symbol, power), ...), sorted; () = constant
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Dim:
    """An integer polynomial in named symbols, used as a shape entry. Immutable."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[Monomial, int]):
        object.__setattr__(self, "terms",
                           tuple(sorted((m, c) for m, c in terms.items() if c != 0)))

    def __setattr__(self, key, value):
        raise AttributeError("Dim is immutable")

    # -- construction -----------------------------------------------------------------
    @staticmethod
    def symbol(name: str) -> Dim:
        """The dimension called `name` (an identifier)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ShapeError(f"a symbolic dimension is named by an identifier, got {name!r}")
        return Dim({((name, 1),): 1})

    @staticmethod
    def parse(text: str) -> int | Dim:
        """The dim written `text` ("n", "2*n + 1", "n*m - 3"; what `str` gives)."""
        return _parse(text)

    # -- arithmetic ------------------------------------------------------------------------
    def _coerce(self, other) -> Dim | None:
        if isinstance(other, Dim):
            return other
        if isinstance(other, int) or hasattr(other, "__index__"):
            return Dim({(): int(other)})
        return None

    def __add__(self, other):
        o = self._coerce(other)
        if o is None:
            return NotImplemented
        t = dict(self.terms)
        for m, c in o.terms:
            t[m] = t.get(m, 0) + c
        return simplify(Dim(t))

    __radd__ = __add__

    def __neg__(self):
        return simplify(Dim({m: -c for m, c in self.terms}))

    def __sub__(self, other):
        o = self._coerce(other)
        return NotImplemented if o is None else self + (-o)

    def __rsub__(self, other):
        o = self._coerce(other)
        return NotImplemented if o is None else o + (-self)

    def __mul__(self, other):
        o = self._coerce(other)
        if o is None:
            return NotImplemented
        t: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in o.terms:
                m = _times(m1, m2)
                t[m] = t.get(m, 0) + c1 * c2
        return simplify(Dim(t))

    __rmul__ = __mul__

    def __pow__(self, k: int):
        if not isinstance(k, int) or k < 0:
            return NotImplemented
        out: DimLike = 1
        for _ in range(k):
            out = self * out
        return out

    def __floordiv__(self, other):
        """Exact division by an int or a monomial dim; ShapeError when not exact."""
        q = self.divide(other)
        if q is None:
            raise ShapeError(f"{self} is not divisible by {other} for every value of its "
                             "symbols")
        return q

    def __mod__(self, other):
        return 0 if self.divide(other) is not None else _undecidable(f"{self} % {other}")

    def divide(self, other) -> int | Dim | None:
        """self / other when it is exact for every value of the symbols, else None."""
        o = self._coerce(other)
        if o is None or len(o.terms) != 1:
            return None
        (mo, co), = o.terms
        out: dict[Monomial, int] = {}
        for m, c in self.terms:
            rest = _over(m, mo)
            if rest is None or c % co:
                return None
            out[rest] = c // co
        return simplify(Dim(out))

    # -- comparison --------------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        o = self._coerce(other)
        return o is not None and self.terms == o.terms

    def __hash__(self) -> int:
        return hash(("Dim", self.terms))

    def __lt__(self, other):
        return _undecidable(f"{self} < {other}")

    __le__ = __gt__ = __ge__ = __lt__

    def __bool__(self) -> bool:
        return True  # a symbolic size is never known to be zero

    def __int__(self):
        raise ShapeError(f"the dimension {self} is symbolic: bind it (feed an input that has "
                         "it) to get a number")

    __index__ = __int__

    # -- reading -----------------------------------------------------------------------------
    @property
    def symbols(self) -> frozenset[str]:
        """The symbols it depends on."""
        return frozenset(s for m, _ in self.terms for s, _ in m)

    def evaluate(self, binding: Mapping[str, int]) -> int:
        """Its value with each symbol bound (ShapeError naming an unbound symbol)."""
        total = 0
        for m, c in self.terms:
            v = c
            for s, p in m:
                if s not in binding:
                    raise ShapeError(f"the dimension {s!r} is not bound")
                v = v * binding[s] ** p  # a symbol may be bound to another dim (calls)
            total = total + v
        return total

    def __str__(self) -> str:
        parts = []
        for m, c in sorted(self.terms, key=lambda t: (-len(t[0]), t[0])):
            mono = "*".join(s if p == 1 else "*".join([s] * p) for s, p in m)
            if not mono:
                parts.append(str(c))
            elif c == 1:
                parts.append(mono)
            elif c == -1:
                parts.append("-" + mono)
            else:
                parts.append(f"{c}*{mono}")
        text = " + ".join(parts)
        return text.replace("+ -", "- ") or "0"

    def __repr__(self) -> str:  # as written in shapes: [n, 3] (messages print lists)
        return str(self)


DimLike = int | Dim


def _undecidable(what: str):
    raise ShapeError(f"cannot decide {what} for symbolic dimensions (it depends on the "
                     "values bound to them); this shape rule needs concrete sizes")


def _times(a: Monomial, b: Monomial) -> Monomial:
    powers = dict(a)
    for s, p in b:
        powers[s] = powers.get(s, 0) + p
    return tuple(sorted(powers.items()))


def _over(a: Monomial, b: Monomial) -> Monomial | None:
    powers = dict(a)
    for s, p in b:
        if powers.get(s, 0) < p:
            return None
        powers[s] -= p
    return tuple(sorted((s, p) for s, p in powers.items() if p))


def simplify(d: Dim) -> DimLike:
    """An int if `d` has no symbols left, else `d`."""
    if not d.terms:
        return 0
    if len(d.terms) == 1 and d.terms[0][0] == ():
        return d.terms[0][1]
    return d


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(.))")


def _parse(text: str) -> DimLike:
    """A dim from its text: sums and differences of products of ints and symbols."""
    tokens = [m.groups() for m in _TOKEN.finditer(text) if any(m.groups())]
    if not tokens or len(text) > 200:
        raise ShapeError(f"bad symbolic dimension {text!r}")
    total: DimLike = 0
    sign, term = 1, None
    expect_factor = True
    for num, name, op in tokens:
        if expect_factor:
            if op == "-" and term is None:
                sign = -sign
                continue
            if num is None and name is None:
                raise ShapeError(f"bad symbolic dimension {text!r}")
            factor = int(num) if num is not None else Dim.symbol(name)
            term = factor if term is None else term * factor
            expect_factor = False
        elif op == "*":
            expect_factor = True
        elif op is not None and op in "+-":
            total = total + sign * term
            sign, term, expect_factor = (1 if op == "+" else -1), None, True
        else:
            raise ShapeError(f"bad symbolic dimension {text!r}")
    if expect_factor:
        raise ShapeError(f"bad symbolic dimension {text!r}")
    return total + sign * term


def is_symbolic(shape) -> bool:
    """Does `shape` have a symbolic entry?"""
    return any(isinstance(d, Dim) for d in shape)


def as_dim(d) -> DimLike:
    """A shape entry: an int (from any integer), a Dim, or a symbol's name."""
    if isinstance(d, Dim):
        return d
    if isinstance(d, str):
        return Dim.symbol(d)
    return int(d)


def concrete(shape, binding: Mapping[str, int]) -> tuple[int, ...]:
    """`shape` with its symbols bound (to ints; or to dims of an enclosing trace)."""
    return tuple(d.evaluate(binding) if isinstance(d, Dim) else int(d) for d in shape)


def bind(signature: Mapping[str, tuple], shapes: Mapping[str, tuple]) -> dict[str, int]:
    """The value of every symbol of `signature` ({name: (dtype, declared shape)}) from the
    `shapes` of fed values; InputError naming the input (and the symbol) whose shape does
    not fit, or the symbol two inputs give different values."""
    binding: dict[str, int] = {}
    source: dict[str, str] = {}
    pending = []
    for name, (_, declared) in signature.items():
        if name not in shapes or not is_symbolic(declared):
            continue
        got = tuple(shapes[name])
        if len(got) != len(declared):
            raise InputError(f"input {name!r} has shape {list(got)}; expected "
                             f"{_show(declared)}", field=f"inputs.{name}")
        for want, have in zip(declared, got):
            if isinstance(want, Dim) and len(want.terms) == 1 and want.terms[0] == (
                    ((next(iter(want.symbols)), 1),), 1):
                s = next(iter(want.symbols))
                if s in binding and binding[s] != have:
                    raise InputError(
                        f"input {name!r} has shape {list(got)}, so {s} = {have}; but input "
                        f"{source[s]!r} gives {s} = {binding[s]}", field=f"inputs.{name}")
                binding[s], source[s] = have, name
            elif isinstance(want, Dim):
                pending.append((name, want, have, got, declared))
    for name, want, have, got, declared in pending:
        try:
            value = want.evaluate(binding)
        except ShapeError:
            raise InputError(f"input {name!r} ({_show(declared)}): the dimension {want} "
                             "needs its symbols bound by an input of shape [..., n, ...]",
                             field=f"inputs.{name}") from None
        if value != have:
            raise InputError(f"input {name!r} has shape {list(got)}; expected "
                             f"{_show(declared)} = {list(concrete(declared, binding))}",
                             field=f"inputs.{name}")
    if any(isinstance(v, int) and v < 0 for v in binding.values()):
        raise InputError("a symbolic dimension is bound to a negative size", field="inputs")
    return binding


def _show(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def symbols_of(signature: Mapping[str, tuple]) -> set[str]:
    """Every symbol the shapes of `signature` use."""
    return {s for _, shape in signature.values() for d in shape if isinstance(d, Dim)
            for s in d.symbols}


def known_le(a: DimLike, b: DimLike) -> bool | None:
    """Is a <= b for every value of the symbols (sizes are >= 0)? True, False when it
    is false for all of them (both ints), None when it depends on the values."""
    d = b - a
    if isinstance(d, int):
        return d >= 0
    if all(c >= 0 for _, c in d.terms):
        return True
    return None


def check_le(a: DimLike, b: DimLike, error) -> None:
    """Raise `error()` if a <= b is known to be false; undecidable cases are checked
    again when the symbols are bound (the graph is rebuilt with their values)."""
    if known_le(a, b) is False:
        raise error()
