"""loraledger.node.chain.devnet (the anvil process) and `loraledger devnet up|status|down` on free ports in tmp state dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from web3 import Web3

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.chain.bindings import OPERATOR_ROLE, Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.devnet import Anvil, DevnetInfo, find_anvil, free_port, rpc_call
from loraledger.node.chain.devnet_setup import DEFAULT_OPERATOR_FUNDING
from loraledger.node.chain.keys import dev_account
from loraledger.node.cli import main
from loraledger.node.errors import DevnetError

REPO = Path(__file__).resolve().parents[3]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_anvil_lifecycle_files_and_chain_id(tmp_path: Path) -> None:
    port = free_port()
    with Anvil(tmp_path, port=port, chain_id=4242, accounts=3) as node:
        assert node.rpc_url == f"http://127.0.0.1:{port}"
        assert int(str(rpc_call(node.rpc_url, "eth_chainId")), 16) == 4242
        assert len(rpc_call(node.rpc_url, "eth_accounts")) == 3  # type: ignore[arg-type]
        assert int(node.pid_file.read_text()) == node.pid
        info = DevnetInfo.from_json(node.info_file.read_text())
        assert (info.pid, info.port, info.chain_id, info.rpc_url) == (node.pid, port, 4242, node.rpc_url)
        attached = Anvil.attach(tmp_path)
        assert attached is not None and attached.pid == node.pid and attached.is_answering()
        # a second anvil on the same port fails with anvil's reason, not a hang
        with pytest.raises(DevnetError, match="(?i)in use|exited"):
            Anvil(tmp_path / "second", port=port, startup_timeout=10).start()
        pid = node.pid
        assert pid is not None
    assert not _alive(pid)
    assert not node.pid_file.exists() and not node.info_file.exists()
    assert "Listening on" in node.log_file.read_text()
    assert Anvil.attach(tmp_path) is None


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(DevnetError, match="does not exist or is not executable"):
        find_anvil(tmp_path / "no-anvil")
    with pytest.raises(DevnetError, match="chain id must be positive"):
        Anvil(tmp_path, chain_id=0)
    with pytest.raises(DevnetError, match="has not been started"):
        _ = Anvil(tmp_path).rpc_url
    # a stale record (process gone) is dropped by attach
    (tmp_path / "anvil.json").write_text(DevnetInfo(pid=2**22 + 12345, rpc_url="http://127.0.0.1:1", port=1,
                                                    chain_id=31337).to_json())
    assert Anvil.attach(tmp_path) is None
    assert not (tmp_path / "anvil.json").exists()


def test_cli_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "devnet"
    port = free_port()
    # `up` in a separate process: anvil must keep running after that process exits
    proc = subprocess.run(
        [sys.executable, "-m", "loraledger.node.cli", "devnet", "up", "--state-dir", str(state), "--port", str(port)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert "devnet up" in proc.stdout
        info = DevnetInfo.from_json((state / "anvil.json").read_text())
        assert info.port == port and _alive(info.pid)

        record = json.loads((state / "deployment.json").read_text())
        assert record["chainId"] == 31337
        assert record["extra"]["rpcUrl"] == f"http://127.0.0.1:{port}"
        assert record["deployer"] == dev_account(0).address
        assert record["operator"] == dev_account(1).address
        names = {"RewardToken", "ContributorRegistry", "DatanetRegistry", "AdapterRegistry", "AttributionLedger"}
        assert set(record["addresses"]) == names
        assert record["artifactSha256"] == {n: load_artifact(n).sha256 for n in names}
        w3 = Web3(Web3.HTTPProvider(info.rpc_url))
        for addr in record["addresses"].values():
            assert len(w3.eth.get_code(addr)) > 0
        assert record["blockNumber"] >= 1
        c = Contracts.at(ChainClient(w3, dev_account(0)), record["addresses"])
        assert c.ledger.has_role(OPERATOR_ROLE, dev_account(1).address)
        assert c.token.balance_of(dev_account(1).address) == DEFAULT_OPERATOR_FUNDING

        assert main(["devnet", "status", "--state-dir", str(state)]) == 0
        out = capsys.readouterr().out
        assert f"running pid {info.pid}" in out and record["addresses"]["AttributionLedger"] in out

        # idempotent: a second `up` reuses the process and the deployment
        before = (state / "deployment.json").read_text()
        assert main(["devnet", "up", "--state-dir", str(state)]) == 0
        assert "reused running devnet" in capsys.readouterr().out
        assert (state / "deployment.json").read_text() == before
        assert DevnetInfo.from_json((state / "anvil.json").read_text()).pid == info.pid
        # asking for another chain id while it runs is refused, not silently ignored
        assert main(["devnet", "up", "--state-dir", str(state), "--chain-id", "5"]) == 1
        assert "devnet down" in capsys.readouterr().err
    finally:
        assert main(["devnet", "down", "--state-dir", str(state)]) == 0
    assert "devnet stopped" in capsys.readouterr().out
    assert not _alive(info.pid)
    assert not (state / "deployment.json").exists()
    assert main(["devnet", "status", "--state-dir", str(state)]) == 3
    assert "not running" in capsys.readouterr().out


def test_cli_deploy_to_any_rpc_with_a_keystore(w3: Web3, anvil: Anvil, chain_snapshot: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from loraledger.node.chain.keys import PASSWORD_ENV, PRIVATE_KEY_ENV, write_keystore

    deployer = dev_account(5)
    key_file = write_keystore(tmp_path / "deployer.json", deployer, "deploy-pw", kdf="pbkdf2", iterations=2)
    out = tmp_path / "out" / "deployment.json"
    monkeypatch.delenv(PRIVATE_KEY_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    argv = ["deploy", "--rpc-url", anvil.rpc_url, "--key-file", str(key_file), "--challenge-delay", "60",
            "--operator", dev_account(6).address, "--out", str(out)]
    assert main(argv) == 1  # no password anywhere: refused before any transaction
    assert PASSWORD_ENV in capsys.readouterr().err and not out.exists()

    monkeypatch.setenv(PASSWORD_ENV, "deploy-pw")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["deployer"] == deployer.address and record["challengeDelay"] == 60
    assert "rpcUrl" not in record["extra"]  # the URL stays with the node (it may carry an API key)
    for name, address in record["addresses"].items():
        assert len(w3.eth.get_code(address)) > 0, name
        assert address in printed
    c = Contracts.at(ChainClient(w3, deployer), record["addresses"])
    assert c.ledger.has_role(OPERATOR_ROLE, dev_account(6).address)
    assert c.ledger.challenge_delay() == 60
    assert main(argv) == 1  # an existing record is not overwritten without --force
    assert "--force" in capsys.readouterr().err
