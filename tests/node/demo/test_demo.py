"""`loraledger demo --small` end to end (what `make run` runs, smaller): the printed who-earned-what table is
checked against `loraledger rewards show` and against the chain, a second run must reuse everything and be fast,
and `loraledger demo --stop` must leave no process behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.devnet import free_port, pid_alive
from loraledger.node.chain.keys import DEV_CONTRIBUTORS, DEV_OPERATOR, dev_account
from loraledger.node.cli import main
from loraledger.node.demo.processes import NODE_PID
from loraledger.node.demo.stages import DEV_ADAPTER_OWNER, PLANS, STAGES

REPO = Path(__file__).resolve().parents[3]
ROW = re.compile(r"^(\S.*?)\s{2,}(0x[0-9a-fA-F]{40})\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def _table(out: str) -> dict[str, tuple[int, int, int]]:
    """account -> (earned, claimed, balance) from the printed who-earned-what table."""
    rows: dict[str, tuple[int, int, int]] = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(2)] = (int(m.group(3)), int(m.group(4)), int(m.group(5)))
    return rows


def _rewards_show(address: str, config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, int]:
    """(owed, claimed) as `loraledger rewards show ADDRESS --config node.toml` prints them."""
    assert main(["rewards", "show", address, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    owed = re.search(r"cumulative under epoch \d+ \(in effect\): (\d+)", out)
    claimed = re.search(r"^\s+claimed: (\d+)$", out, re.MULTILINE)
    assert owed and claimed, out
    return int(owed.group(1)), int(claimed.group(1))


def _check_against_show_and_chain(rows: dict[str, tuple[int, int, int]], state: Path, c: Contracts,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    operator = dev_account(DEV_OPERATOR).address
    for address, (earned, claimed, balance) in rows.items():
        assert _rewards_show(address, state / "node.toml", capsys) == (earned, claimed), address
        assert int(c.ledger.claimed(operator, address)) == claimed
        assert int(c.token.balance_of(address)) == balance
    assert sum(e for e, _, _ in rows.values()) == int(c.ledger.funded_total(operator))
    assert sum(cl for _, cl, _ in rows.values()) == int(c.ledger.claimed_total(operator))


@pytest.mark.slow
def test_demo_end_to_end_idempotent_and_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "loraledger.node.cli", "demo", "--small", "--state-dir", str(state),
         "--port", str(free_port()), "--node-port", str(free_port())],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    first_s = time.monotonic() - t0
    node_pid = anvil_pid = None
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        node_pid = int((state / NODE_PID).read_text())
        anvil_pid = int((state / "devnet" / "anvil.pid").read_text())
        for n, (stage, _) in enumerate(STAGES, 1):
            assert f"[{n}/{len(STAGES)}] {stage}:" in out, f"no progress line for stage {stage}:\n{out}"
        assert out.count("        -> ") == len(PLANS) + 1, "one request per adapter and one merged"

        record = json.loads((state / "devnet" / "deployment.json").read_text())
        w3 = Web3(Web3.HTTPProvider(record["extra"]["rpcUrl"]))
        c = Contracts.at(ChainClient(w3, dev_account(0)), record["addresses"])
        # lineage on chain: one datanet by account 5, three adapters it owns trained on it
        assert c.datanets.datanet_count() == 1 and c.adapters.adapter_count() == len(PLANS)
        owner = dev_account(DEV_ADAPTER_OWNER).address
        for i, plan in enumerate(PLANS, 1):
            info = c.adapters.get_adapter(i)
            assert (info.owner, info.datanet_ids, int(info.fee_per_token)) == (owner, (1,), plan.fee_per_token)
            lineage = json.loads((state / "adapters" / plan.name / "lineage.json").read_text())
            assert lineage["registration"]["adapter_id"] == i and lineage["weights_hash"] == info.weights_hash

        rows = _table(out)
        expected = {dev_account(i).address for i in (DEV_OPERATOR, DEV_ADAPTER_OWNER, *DEV_CONTRIBUTORS)}
        assert set(rows) == expected
        assert all(earned > 0 and claimed == earned for earned, claimed, _ in rows.values()), rows
        assert all(rows[dev_account(i).address][2] == rows[dev_account(i).address][1] for i in DEV_CONTRIBUTORS)
        _check_against_show_and_chain(rows, state, c, capsys)

        # a second run (in process) reuses everything, sends the same requests again and settles epoch 2
        t1 = time.monotonic()
        assert main(["demo", "--small", "--state-dir", str(state)]) == 0
        second_s = time.monotonic() - t1
        again = capsys.readouterr().out
        for reused in ("reused anvil", "reused tiny model", "(0 newly registered)", "(0 files newly signed)",
                       "reused manifest and index", "datanet #1 already registered", f"reused node pid {node_pid}",
                       *(f"{p.name} reused" for p in PLANS), *(f"= #{i} (reused)" for i in range(1, len(PLANS) + 1))):
            assert reused in again, f"{reused!r} missing from the second run:\n{again}"
        assert "settle: epoch 2:" in again
        assert second_s < min(60.0, first_s), (first_s, second_s)
        assert (c.datanets.datanet_count(), c.adapters.adapter_count()) == (1, len(PLANS))
        rows2 = _table(again)
        # the same seeded requests again: every account's cumulative amount exactly doubles
        assert {a: v[0] for a, v in rows2.items()} == {a: 2 * v[0] for a, v in rows.items()}
        _check_against_show_and_chain(rows2, state, c, capsys)
    finally:
        assert main(["demo", "--stop", "--state-dir", str(state)]) == 0
    stopped = capsys.readouterr().out
    assert f"node pid {node_pid} stopped" in stopped and "devnet at" in stopped
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in (node_pid, anvil_pid) if p):
        time.sleep(0.1)
    assert not pid_alive(node_pid) and not pid_alive(anvil_pid), "stray node or anvil process"
    assert not (state / NODE_PID).exists()
