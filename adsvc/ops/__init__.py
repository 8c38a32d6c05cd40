"""The op declarations, one module per family, registered into the op table
(`adsvc.ir.opdef.OPS`), and the graph builders (`api`)."""

from adsvc.ir.opdef import OPS, OpDef, get
from adsvc.ops import api, elementwise, misc, reduce, shape  # noqa: F401  (register the ops)

__all__ = ["OPS", "OpDef", "api", "get"]

# An op's builder is documented by the op's declaration (OpDef.doc: one home for the
# text), unless the builder says more about its Python arguments itself.
for _name, _op in OPS.items():
    _builder = getattr(api, _name, None)
    if callable(_builder) and not _builder.__doc__:
        _builder.__doc__ = f"{_op.doc}.\n\nBuilds a {_name!r} node (see the op table)."
