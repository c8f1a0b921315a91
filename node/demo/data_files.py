"""The demo's shipped data: sample contributions under `data/sample/` (prose from the Python documentation,
licence and source in that folder's README)."""

from __future__ import annotations

from pathlib import Path

from loraledger.node.demo.processes import DemoError

SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"


def sample_records(name: str, limit: int) -> bytes:
    """The first `limit` lines of the shipped sample `node/demo/data/sample/<name>.jsonl`, newline-terminated."""
    src = SAMPLE_DIR / f"{name}.jsonl"
    if not src.is_file():
        raise DemoError(f"sample contribution {src} is missing; the demo ships it in node/demo/data/sample/")
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()][:limit]
    return ("\n".join(lines) + "\n").encode("utf-8")
