"""Reverse-mode differentiation (backpropagation), step by step: one sweep for all inputs.

    z = x*x + x*y + 2      at x = 3, y = 4:   z = 23, ∂z/∂x = 10, ∂z/∂y = 3

A forward sweep computes every node's value and keeps it. A backward sweep then starts
at the root with z̄ = ∂z/∂z = 1 and goes to the leaves: each node hands its operands
their share of its adjoint v̄ = ∂z/∂v (for v = a*b: ā += v̄·b, b̄ += v̄·a, using the kept
values a and b), and a node used several times (x is used three times) adds up its
shares. One backward sweep gives ∂z/∂x and ∂z/∂y together, whatever the number of
inputs. This script prints both sweeps node by node (`adsvc.explain`), checks them with
one vector-Jacobian product of the in-process client, and draws the gradient graph with
every node's value: the cotangent nodes reuse the primal values (dashed edges).

    python examples/backward_sweep.py [PICTURE_DIR]

Pictures go to PICTURE_DIR, else $ADSVC_PICTURES, else a new temporary directory; SVG
with Graphviz's `dot` installed, else DOT text (draw it with `dot -Tsvg`).
"""

import os
import sys
import tempfile
from pathlib import Path

import adsvc
from adsvc.ir.dot import have_graphviz


def picture_dir() -> Path:
    """The first argument, else $ADSVC_PICTURES, else a new temporary directory."""
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ADSVC_PICTURES")
    path = Path(target) if target else Path(tempfile.mkdtemp(prefix="adsvc-pictures-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    g = adsvc.trace(lambda x, y: x * x + x * y + 2, name="seed")
    ex = adsvc.explain(g, "reverse", x=3.0, y=4.0)
    print(ex.text())

    # The same backward sweep as one vector-Jacobian product: seed the output with 1.
    with adsvc.local() as c:
        value, grads = c.vjp(g, {"x": 3.0, "y": 4.0}, {"out": 1.0})
    print(f"one backward sweep: z = {float(value['out']):g}, ∂z/∂x = "
          f"{float(grads['x']):g}, ∂z/∂y = {float(grads['y']):g}")
    adjoints = {r.op: float(r.derivative["out"]) for r in ex.table()}
    assert adjoints["input x"] == float(grads["x"]) == 10.0
    assert adjoints["input y"] == float(grads["y"]) == 3.0

    path = picture_dir() / ("seed_reverse" + (".svg" if have_graphviz() else ".dot"))
    ex.render(path)
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
