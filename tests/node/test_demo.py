"""`loraledger demo` end to end (what `make run` runs), checked against the chain it printed about."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from web3 import Web3

from node.chain import ChainClient
from node.cli import main
from node.contracts_client import Contracts
from node.keys import DEV_CONTRIBUTORS, dev_account
from node.merkle import CONTRIBUTION_LEAF_ENCODING, StandardMerkleTree

REPO = Path(__file__).resolve().parents[2]


def _table(out: str) -> dict[str, str]:
    """`name  value` rows of the printed table (two or more spaces between the columns)."""
    rows: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(\S.*)$", line)
        if m and not line.startswith("["):
            rows[m.group(1)] = m.group(2)
    return rows


def test_demo_end_to_end_and_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.devnet import free_port

    state = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--state-dir", str(state), "--port", str(free_port())],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        for n, stage in enumerate(("devnet", "contributors", "datanet", "adapter"), 1):
            assert f"[{n}/4] {stage}:" in out, f"no progress line for stage {stage}:\n{out}"
        rows = _table(out)
        record = json.loads((state / "devnet" / "deployment.json").read_text())
        for name, address in record["addresses"].items():
            assert rows[name] == address
        w3 = Web3(Web3.HTTPProvider(rows["rpc url"]))
        assert w3.eth.chain_id == int(rows["chain id"]) == record["chainId"]
        c = Contracts.at(ChainClient(w3, dev_account(0)), record["addresses"])

        # contributors: printed and registered on chain
        for i in DEV_CONTRIBUTORS:
            address = dev_account(i).address
            assert rows[f"contributor (account {i})"].startswith(address)
            assert c.contributors.is_active(address)

        # datanet: the printed root is the one on chain, and it is the Merkle root of the written manifest
        root = rows["datanet #1"].removeprefix("root ")
        info = c.datanets.get_datanet(1)
        assert (info.contributions_root, info.contribution_count) == (root, 3)
        manifest = json.loads((state / "demo" / "datanet.json").read_text())
        leaves = [[x["contributor"], x["contributionHash"], x["weight"]] for x in manifest["leaves"]]
        assert StandardMerkleTree.of(leaves, CONTRIBUTION_LEAF_ENCODING).root_hex == root
        assert info.uri == (state / "demo" / "datanet.json").resolve().as_uri()

        # adapter: printed weights hash registered on chain under id 1, naming datanet 1
        weights = rows["adapter #1"].split()[1]
        adapter = c.adapters.get_adapter(1)
        assert (adapter.weights_hash, adapter.datanet_ids, adapter.owner) == (weights, (1,), dev_account(1).address)

        # a second run (in process) reuses everything: no new ids, nothing registered twice
        assert main(["demo", "--state-dir", str(state)]) == 0
        again = capsys.readouterr().out
        assert "reused anvil" in again and "0 newly registered" in again
        assert "datanet #1 already registered" in again and "adapter #1 already registered" in again
        assert (c.datanets.datanet_count(), c.adapters.adapter_count(), c.contributors.contributor_count()) == (1, 1, 3)
    finally:
        assert main(["devnet", "down", "--state-dir", str(state / "devnet")]) == 0
