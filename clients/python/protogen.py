"""Generate Python protobuf/gRPC modules for adsvc from the .proto files (build-time only)."""

import re
from pathlib import Path


def generate(proto_root: Path, out_dir: Path) -> None:
    """Compile every .proto under proto_root/adsvc/v1 into out_dir with relative imports."""
    import grpc_tools
    from grpc_tools import protoc  # build dependency, pinned in pyproject.toml

    protos = sorted((proto_root / "adsvc" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "_gen"
    tmp.mkdir(exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={tmp}",
        f"--pyi_out={tmp}",
        f"--grpc_python_out={tmp}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    for src in (tmp / "adsvc" / "v1").glob("*.py*"):
        text = src.read_text()
        # "from adsvc.v1 import ir_pb2 as x" -> "from . import ir_pb2 as x"
        text = re.sub(r"^from adsvc\.v1 import ", "from . import ", text, flags=re.M)
        (out_dir / src.name).write_text(text)
    for p in sorted(tmp.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    tmp.rmdir()
