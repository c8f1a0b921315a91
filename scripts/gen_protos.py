"""Regenerate the committed gRPC stubs from proto/loraledger/v1/*.proto (grpcio-tools).

    python scripts/gen_protos.py            # rewrite the stubs
    python scripts/gen_protos.py --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraledger.proto.codegen import generate_stubs

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    generated = generate_stubs(ROOT)
    stale = []
    for path, text in sorted(generated.items()):
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("stale stubs (run `make protos`):", *[str(p.relative_to(ROOT)) for p in stale], sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
