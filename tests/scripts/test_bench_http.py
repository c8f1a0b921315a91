"""`scripts/bench_http.py` runs end to end on a tiny workload: both APIs, both modes, every text checked
against the engine's own output by the script itself (a mismatch exits 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_http_compares_both_apis_on_equal_texts(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_http.py"), "--rounds", "1", "--requests", "4",
                           "--max-tokens", "4", "--adapters", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["texts_equal_engine_output"] is True
    assert set(report["ratio_http_over_grpc"]) == {"unary", "stream"}
    for mode in ("unary", "stream"):
        for api in ("grpc", "http"):
            (run,) = report["runs"][mode][api]
            assert run["tokens"] == 4 * 4 and run["seconds"] > 0
