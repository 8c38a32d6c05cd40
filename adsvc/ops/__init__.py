"""The op table (registry.OPS) and graph-building functions (api)."""

from adsvc.ops import elementwise, misc, reduce, shape  # noqa: F401  (register ops)
from adsvc.ops.registry import OPS, OpDef, get  # noqa: F401
