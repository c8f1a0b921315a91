"""Forge's fuzz and invariant suites (contracts/test/foundry/), run offline through the solcjs wrapper.

Skipped only where the forge binary of npm `@foundry-rs/forge` is absent. The suites check, over three operators
with revocations, time jumps, refunds, stray tokens and sweeps: claimed <= funded per operator; the ledger's
balance = sum of (funded - claimed - refunded) + stray tokens; claimed never decreases; a revoked root never pays;
and they write the gas of a claim at 0 and 1,000 pending epochs to test/foundry/snapshots/LedgerFuzzTest.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from loraledger.node.chain.artifacts import CONTRACTS_DIR, REPO_ROOT


def _forge() -> Path | None:
    for p in sorted(REPO_ROOT.glob("node_modules/@foundry-rs/forge-*/bin/forge")):
        if os.access(p, os.X_OK):
            return p
    return None


FORGE = _forge()


@pytest.mark.slow
@pytest.mark.skipif(FORGE is None, reason="forge (npm @foundry-rs/forge) is not installed; run `make deps`")
def test_forge_fuzz_and_invariant_suites_pass() -> None:
    assert FORGE is not None
    proc = subprocess.run([str(FORGE), "test", "--root", str(CONTRACTS_DIR), "--offline"], capture_output=True,
                          text=True, cwd=CONTRACTS_DIR, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = set(re.findall(r"\[PASS\] (\w+)\(", out))
    for name in ("invariant_claimedWithinFunded", "invariant_balanceIsOwedPlusStray", "invariant_claimedNeverDecreases",
                 "invariant_revokedRootNeverPays", "testFuzz_claimsPayTheIncrease", "testFuzz_feeOnTransferRefused",
                 "testFuzz_revokedNeverPays", "test_gasClaimAt0And1000Pending"):
        assert name in passed, f"{name} did not pass:\n{out[-4000:]}"
    snap = json.loads((CONTRACTS_DIR / "test/foundry/snapshots/LedgerFuzzTest.json").read_text())
    at0, at1000 = int(snap["claim_0_pending"]), int(snap["claim_1000_pending"])
    assert 0 < at1000 <= at0 + 200, snap
