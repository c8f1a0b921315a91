"""Generate the Python gRPC stubs of `proto/loraledger/v1/*.proto` with grpcio-tools.

The package installs as `loraledger.proto` (see pyproject.toml), so the protos are compiled from a staging
tree that places them at `loraledger/proto/loraledger/v1/`: the generated modules then import each other as
`loraledger.proto.loraledger.v1.*`, which is where they live once installed. The protobuf package itself
stays `loraledger.v1`; only the Python import path depends on this.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

IMPORT_PREFIX = Path("loraledger")  # the proto/ folder installs as loraledger/proto/


def generate_stubs(repo_root: Path) -> dict[Path, str]:
    """Return {destination path: generated text} for every proto under proto/loraledger/v1."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency (dev extra)

    protos = sorted((repo_root / "proto" / "loraledger" / "v1").glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {repo_root / 'proto/loraledger/v1'}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out: dict[Path, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "out"
        staged = []
        for p in protos:
            rel = IMPORT_PREFIX / p.relative_to(repo_root)
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, src / rel)
            staged.append(str(rel))
        dst.mkdir()
        args = [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{well_known}",
            f"--python_out={dst}",
            f"--pyi_out={dst}",
            f"--grpc_python_out={dst}",
            *staged,
        ]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code} on {[p.name for p in protos]}")
        for produced in sorted(dst.rglob("*.py*")):
            rel = produced.relative_to(dst / IMPORT_PREFIX)
            out[repo_root / rel] = produced.read_text()
    return out
