"""README's CLI reference is the parser's own usage: regenerate it with scripts/gen_cli_reference.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_cli_reference_is_current() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_cli_reference.py", "--check"], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, ("README.md's CLI reference is stale: run `python scripts/gen_cli_reference.py`"
                                  + proc.stderr)
