"""Generate the Python gRPC stubs of `proto/loraledger/v1/*.proto` with grpcio-tools.

The protos are compiled with the repository root as include path, so the generated modules import each
other as `proto.loraledger.v1.*`, which is where they live in this package.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def generate_stubs(repo_root: Path) -> dict[Path, str]:
    """Return {destination path: generated text} for every proto under proto/loraledger/v1."""
    from grpc_tools import protoc  # build-time dependency (dev extra)
    import grpc_tools

    protos = sorted((repo_root / "proto" / "loraledger" / "v1").glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {repo_root / 'proto/loraledger/v1'}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out: dict[Path, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{repo_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(repo_root)) for p in protos],
        ]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code} on {[p.name for p in protos]}")
        for produced in sorted(Path(tmp).rglob("*.py*")):
            rel = produced.relative_to(tmp)
            out[repo_root / rel] = produced.read_text()
    return out
