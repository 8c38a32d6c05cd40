"""Build hook: generate the protobuf/gRPC Python modules from protos/ at build time.

The generated modules are never committed. They are written into the SDK package
(clients/python/adsvc_protocol/proto/), the ground floor every layer imports, with their
cross-file imports made package-relative so the package can live anywhere.
"""

import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "clients" / "python"))
from protogen import generate  # noqa: E402


class BuildWithProtos(build_py):
    def run(self):
        generate(ROOT / "protos", ROOT / "clients" / "python" / "adsvc_protocol" / "proto")
        super().run()


# The scalar VM (adsvc/runtime/_scalarvm.c): compiled once at install time; optional, so
# an install without a C compiler still works (plans then run on the numpy interpreter).
# -O3: the block VM's loops over 512-element registers are vectorized; no FMA contraction,
# so every fused result is the numpy kernel's (fusion.py); no errno from sqrt (results
# unchanged; it kept sqrt out of vector code).
SCALAR_VM = Extension("adsvc.runtime._scalarvm",
                      [f"adsvc/runtime/{f}.c" for f in
                       ("_scalarvm", "_vmflatten", "_vmsweeps", "_vmblocks")],
                      depends=["adsvc/runtime/_scalarvm.h",
                               "adsvc/runtime/_vmblocks_typed.h"],
                      extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
                      optional=True)

class BuildExtInTree(build_ext):
    """Also copy the built VM next to its sources: tests run from a checkout import adsvc
    from the source tree (`python -m pytest` puts the checkout first on sys.path), which
    would otherwise have no VM and skip every test of it."""

    def run(self):
        super().run()
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            dest = ROOT / self.get_ext_filename(ext.name)
            if built.exists() and built.resolve() != dest.resolve():
                shutil.copyfile(built, dest)


setup(cmdclass={"build_py": BuildWithProtos, "build_ext": BuildExtInTree},
      ext_modules=[SCALAR_VM])
