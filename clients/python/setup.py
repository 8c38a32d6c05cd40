"""Build hook: generate adsvc_protocol/proto/*_pb2*.py from ../../protos at build time.

Build from a checkout of the adsvc repository (`pip install ./clients/python`): the
.proto files live two directories up and are never copied or committed here.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from protogen import generate  # noqa: E402

PROTOS = HERE.parent.parent / "protos"


class BuildWithProtos(build_py):
    def run(self):
        if not PROTOS.is_dir():
            raise RuntimeError(f"{PROTOS} not found: build adsvc-client from a checkout of "
                               "the adsvc repository")
        generate(PROTOS, HERE / "adsvc_protocol" / "proto")
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
