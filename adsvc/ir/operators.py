"""Python operators on nodes (``x * y + 2``, ``x[1:]``, ``x.T``, ``x.sum()`` ...).

`NodeOperators` is a mixin of `Node`: every operator names an op and asks the node's
class to build it (`_apply` for one operand plus attributes, `_binary` for two with
Python numbers lifted to constants of the other operand's dtype), so the tracer,
derivative rules and users build the same nodes as `adsvc.ops.api`.
"""

from __future__ import annotations

import builtins

from adsvc_protocol.dims import Dim


def _symbolic_indices(i, d):
    """(start, stop, step) of slice `i` over a symbolic axis of size `d`: negative
    bounds count from the end; bounds are not clamped (checked once `d` is bound)."""
    step = 1 if i.step is None else int(i.step)

    def bound(v, default):
        if v is None:
            return default
        if isinstance(v, Dim):  # x[2:n-1]: a bound computed from the symbols
            return v
        v = int(v)
        return v if v >= 0 else d + v
    return bound(i.start, 0), bound(i.stop, d), step


class NodeOperators:
    """Python operators and array-style methods for nodes: a mixin of `Node` (see the
    module docstring)."""

    __slots__ = ()

    # -- provided by Node ----------------------------------------------------------------
    def _apply(self, op: str, attrs: dict | None = None): raise NotImplementedError
    def _binary(self, op: str, a, b): raise NotImplementedError

    # -- arithmetic and comparisons --------------------------------------------------------
    def __add__(self, o): return self._binary("add", self, o)
    def __radd__(self, o): return self._binary("add", o, self)
    def __sub__(self, o): return self._binary("sub", self, o)
    def __rsub__(self, o): return self._binary("sub", o, self)
    def __mul__(self, o): return self._binary("mul", self, o)
    def __rmul__(self, o): return self._binary("mul", o, self)
    def __truediv__(self, o): return self._binary("div", self, o)
    def __rtruediv__(self, o): return self._binary("div", o, self)
    def __pow__(self, o): return self._binary("pow", self, o)
    def __rpow__(self, o): return self._binary("pow", o, self)
    def __matmul__(self, o): return self._binary("matmul", self, o)
    def __rmatmul__(self, o): return self._binary("matmul", o, self)
    def __lt__(self, o): return self._binary("lt", self, o)
    def __le__(self, o): return self._binary("le", self, o)
    def __gt__(self, o): return self._binary("gt", self, o)
    def __ge__(self, o): return self._binary("ge", self, o)
    def __neg__(self): return self._apply("neg")
    def __pos__(self): return self
    def __abs__(self): return self._apply("abs")

    def __eq__(self, other):
        if isinstance(other, NodeOperators):
            return self is other  # identity: nodes are interned (and used as dict keys)
        raise TypeError("== / != on a traced value: use adsvc.eq(a, b) / adsvc.ne(a, b)")

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("a traced value has no truth value: use adsvc.where(cond, a, b) "
                        "instead of Python if/and/or on traced values")

    # -- methods -----------------------------------------------------------------------------
    def _reduce(self, op, axes, keepdims):
        attrs = {"keepdims": bool(keepdims)}
        if axes is not None:
            attrs["axes"] = (axes,) if isinstance(axes, int) else tuple(axes)
        return self._apply(op, attrs)

    def sum(self, axes=None, keepdims=False):
        """Sum over `axes` (None: all), as `adsvc.sum`."""
        return self._reduce("sum", axes, keepdims)

    def mean(self, axes=None, keepdims=False):
        """Mean over `axes` (None: all), as `adsvc.mean`."""
        return self._reduce("mean", axes, keepdims)

    def max(self, axes=None, keepdims=False):
        """Maximum over `axes` (None: all), as `adsvc.max`."""
        return self._reduce("max", axes, keepdims)

    def min(self, axes=None, keepdims=False):
        """Minimum over `axes` (None: all), as `adsvc.min`."""
        return self._reduce("min", axes, keepdims)

    def reshape(self, *shape):
        """The same elements in `shape` (one entry may be -1), as `adsvc.reshape`; like
        numpy, `x.reshape(3, 2)`, `x.reshape(-1)` and `x.reshape((3, 2))` all work."""
        if len(shape) == 1 and not hasattr(shape[0], "__index__"):
            shape = tuple(shape[0])
        return self._apply("reshape", {"shape": tuple(shape)})

    def astype(self, dtype: str):
        """The value cast to `dtype` (itself if already of that dtype), as `adsvc.cast`."""
        return self if self.dtype == dtype else self._apply("cast", {"dtype": dtype})

    @property
    def T(self):
        """The transpose: all axes reversed, as `adsvc.transpose` without `perm`."""
        return self._apply("transpose", {"perm": tuple(reversed(range(len(self.shape))))})

    def __getitem__(self, idx):
        """Integer and slice indexing (positive steps): a strided slice, then a reshape
        that drops the integer-indexed axes."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > len(self.shape):
            raise IndexError(f"too many indices for a node of rank {len(self.shape)}")
        starts, stops, steps, squeeze = [], [], [], []
        for axis, d in enumerate(self.shape):
            i = idx[axis] if axis < len(idx) else builtins.slice(None)
            if isinstance(i, builtins.slice):
                a, b, s = i.indices(d) if isinstance(d, int) else _symbolic_indices(i, d)
                if s <= 0:
                    raise IndexError("only positive slice steps are supported")
                starts.append(a), stops.append(b if not isinstance(a, int) or not
                                               isinstance(b, int) else builtins.max(a, b))
                steps.append(s)
                continue
            if isinstance(i, Dim) and not isinstance(d, int):  # x[n - 1]
                pass
            elif not hasattr(i, "__index__"):
                raise IndexError(f"unsupported index {i!r}: use ints, slices or take()")
            elif not isinstance(d, int):  # a symbolic axis: from the front, or from the end
                i = int(i) if int(i) >= 0 else d + int(i)
            elif not -d <= int(i) < d:
                raise IndexError(f"index {i} out of range for axis {axis} of size {d}")
            else:
                i = int(i) % d
            starts.append(i), stops.append(i + 1), steps.append(1), squeeze.append(axis)
        out = self._apply("slice", {"starts": tuple(starts), "stops": tuple(stops),
                                    "steps": tuple(steps)})
        if squeeze:
            out = out.reshape([d for a, d in enumerate(out.shape) if a not in squeeze])
        return out
