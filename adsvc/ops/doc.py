"""Render the op table as Markdown (protos/README.md embeds it; a test keeps it in sync).

    python -m adsvc.ops.doc
"""

from __future__ import annotations

from adsvc.ir.opdef import NONE, OPS, REQUIRED, RULE, ZERO

# The table's "differentiable" column for each kind of OpDef.derivative.
DIFFERENTIABLE = {RULE: "yes", ZERO: "zero", NONE: "no"}


def _attr(name, spec) -> str:
    if spec.default is REQUIRED:
        return f"`{name}`: {spec.kind}"
    if spec.default is None:
        return f"`{name}`: {spec.kind}, optional"
    return f"`{name}`: {spec.kind} = {spec.default!r}"


def sparsity_name(d) -> str:
    """The table's "sparsity" column: the name of the op's rule in adsvc.ops.patterns
    ("dense" where it declares none; "none" where no derivative flows)."""
    if d.derivative != RULE:
        return "none"
    return d.sparsity.__name__ if d.sparsity is not None else "dense"


def op_table_markdown() -> str:
    """The op table as a Markdown table, one row per op, sorted by name. It lists the
    ops registered so far: import `adsvc.ops` first."""
    lines = ["| op | operands | attributes | differentiable | sparsity | meaning |",
             "|---|---|---|---|---|---|"]
    for name in sorted(OPS):
        d = OPS[name]
        arity = "1+" if d.arity is None else str(d.arity)
        attrs = "; ".join(_attr(k, s) for k, s in d.attrs.items()) or "-"
        diff = DIFFERENTIABLE[d.derivative]
        lines.append(f"| `{name}` | {arity} | {attrs} | {diff} | {sparsity_name(d)} | "
                     f"{d.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import adsvc.ops  # noqa: F401  (registers the op table)

    print(op_table_markdown())
