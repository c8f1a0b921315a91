"""Every Triton kernel the engine launches compiles for real GPUs (sm_90: H100/H200, sm_80: A100), with no GPU.

The interpreter tests check what the kernels compute; this one checks what only a compiler can: tile shapes,
types and globals the interpreter lets through, shared memory per block, and register spills (a spilling
kernel is correct but slow). `scripts/check_triton_compile.py` runs the engine on the CPU with the Triton
backends over a model shape and records each launch instead of running it, then compiles each distinct
specialization ahead of time through ptxas."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="the triton wheel has no NVIDIA backend here")

ROOT = Path(__file__).resolve().parents[2]
MAX_SPILL_BYTES = 256  # fp32 tiles on sm_80 may spill a few words; the tiles this test caught spilled 1 to 38 KB


def jit_kernels() -> set[str]:
    """Names of every @triton.jit function under kernels/."""
    names: set[str] = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names.update(re.findall(r"@triton\.jit\s*\ndef (\w+)", path.read_text()))
    return names


@pytest.mark.slow
def test_every_engine_kernel_compiles_for_sm90_and_sm80_without_spills(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_triton_compile.py"), "--sizes", "tiny,llama3-8b",
         "--dtypes", "bf16,fp32", "--targets", "sm90,sm80", "--out", str(out)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    errors = [f"{r['target']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in report["results"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the engine's run reached every kernel the package defines (a new kernel must be exercised here too)
    assert set(report["kernels"]) == jit_kernels()
    assert {r["target"] for r in report["results"]} == {"sm90", "sm80"}
    spilling = [f"{r['target']} {r['kernel']} {r['constexprs']} {r['options']}: {r['spill_bytes']} B"
                for r in report["results"] if r["spill_bytes"] is None or r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not spilling, "register spills (None: no ptxas log read):\n" + "\n".join(spilling)
    # both dtypes and both shapes were specialized: bf16 tensor-core dots and fp32 IEEE dots, head_dim 16 and 128
    attention = [r["constexprs"] for r in report["results"] if r["kernel"] == "_paged_attention_kernel"]
    assert {c["DOT_PRECISION"] for c in attention} == {"'tf32'", "'ieee'"}
    assert {c["BLOCK_D"] for c in attention} == {"16", "128"}
