"""`loraledger deploy` for a public chain, on the session anvil: the journal resumes a deploy that failed after
its second contract without deploying those again, and one that failed during its `--mint-to` mints (one landed,
one left pending) without minting twice; the RPC URL (with its credentials) never reaches
deployment.json; `--mint-to` funds the operator and `operator status` / `token mint` report and fund it; a zero
challenge delay is refused off dev chains, with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from loraledger.node.chain.artifacts import CORE_CONTRACTS
from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import SAFE_CHALLENGE_DELAY, deploy_all, safe_challenge_delay
from loraledger.node.config import load_config
from loraledger.node.errors import ChainError, ConfigError


def funded(w3: Any) -> Any:
    acct = Account.create()
    w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**21)])
    return acct


class Boom(RuntimeError):
    pass


def test_a_deploy_that_fails_after_two_contracts_resumes_without_redeploying_them(w3: Any, tmp_path: Path) -> None:
    deployer = funded(w3)
    journal = tmp_path / "deployment.journal.json"

    def fail_after_second(step: str) -> None:
        if step == "ContributorRegistry":
            raise Boom(step)

    with pytest.raises(Boom):
        deploy_all(w3, deployer, journal=journal, on_step=fail_after_second, operator=funded(w3).address)
    first = json.loads(journal.read_text())
    assert set(first["steps"]) == {"RewardToken", "ContributorRegistry"}
    nonce_before = w3.eth.get_transaction_count(deployer.address)
    operator = first["params"]["operator"]
    with pytest.raises(ConfigError, match="re-run with the same arguments"):
        deploy_all(w3, deployer, journal=journal, challenge_delay=5, operator=operator)
    dep = deploy_all(w3, deployer, journal=journal, operator=operator)
    for name in ("RewardToken", "ContributorRegistry"):
        assert dep.addresses[name] == first["steps"][name]["address"]
    # DatanetRegistry, AdapterRegistry, AttributionLedger and the operator grant: four transactions, no more
    assert w3.eth.get_transaction_count(deployer.address) - nonce_before == 4
    c = Contracts.at(ChainClient(w3, deployer), dep.addresses)
    assert c.ledger.reward_token() == dep.addresses["RewardToken"]
    assert c.ledger.has_role("0x" + bytes(w3.keccak(text="OPERATOR_ROLE")).hex(), operator)
    # a finished journal makes a re-run a no-op
    again = deploy_all(w3, deployer, journal=journal, operator=operator)
    assert again.addresses == dep.addresses
    assert w3.eth.get_transaction_count(deployer.address) - nonce_before == 4


def test_mints_are_journal_steps_a_rerun_after_a_failure_during_minting_mints_nothing_twice(
        w3: Any, tmp_path: Path) -> None:
    deployer, op, other = funded(w3), funded(w3), funded(w3)
    journal = tmp_path / "deployment.journal.json"
    mints = [(op.address, 1000), (other.address, 22), (op.address, 300)]

    def fail_after_first_mint(step: str) -> None:
        if step == "mint:0":
            raise Boom(step)

    # 1. the process dies right after the first mint landed
    with pytest.raises(Boom):
        deploy_all(w3, deployer, journal=journal, on_step=fail_after_first_mint, mint_to=mints)
    doc = json.loads(journal.read_text())
    assert "mint:0" in doc["steps"] and "mint:1" not in doc["steps"]
    assert doc["params"]["mintTo"] == [[op.address, "1000"], [other.address, "22"], [op.address, "300"]]
    addresses = {n: doc["steps"][n]["address"] for n in CORE_CONTRACTS}
    token = Contracts.at(ChainClient(w3, deployer), addresses).token
    assert int(token.balance_of(op.address)) == 1000
    # other amounts are another deploy: refused, not mixed in
    with pytest.raises(ConfigError, match="re-run with the same arguments"):
        deploy_all(w3, deployer, journal=journal, mint_to=[(op.address, 1000)])

    # 2. the second mint is sent but its receipt does not come in time (blocks stop): it stays pending
    nonce_before = w3.eth.get_transaction_count(deployer.address)
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        with pytest.raises(ChainError, match="no receipt"):
            deploy_all(w3, deployer, journal=journal, mint_to=mints, receipt_timeout=1.0)
        pending = json.loads(journal.read_text())["pending"]
        assert set(pending) == {"mint:1"}
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    w3.provider.make_request("evm_mine", [])  # ... and lands while no deploy process runs

    # 3. the re-run adopts the landed mint by its hash and sends only the third
    dep = deploy_all(w3, deployer, journal=journal, mint_to=mints)
    assert w3.eth.get_transaction_count(deployer.address) - nonce_before == 2
    assert int(token.balance_of(op.address)) == 1300 and int(token.balance_of(other.address)) == 22
    done = json.loads(journal.read_text())
    assert {"mint:0", "mint:1", "mint:2"} <= set(done["steps"]) and not done["pending"]
    assert done["steps"]["mint:1"]["tx"] == pending["mint:1"]
    # a finished journal: nothing more is minted
    again = deploy_all(w3, deployer, journal=journal, mint_to=mints)
    assert again.addresses == dep.addresses and int(token.balance_of(op.address)) == 1300
    assert w3.eth.get_transaction_count(deployer.address) - nonce_before == 2
    with pytest.raises(ConfigError, match="external token"):
        deploy_all(w3, deployer, token=dep.addresses["RewardToken"], mint_to=mints)


def test_zero_challenge_delay_is_refused_off_dev_chains_and_the_default_is_a_day() -> None:
    assert safe_challenge_delay(31337, None) == 0 and safe_challenge_delay(1337, 0) == 0
    assert safe_challenge_delay(11155111, None) == SAFE_CHALLENGE_DELAY == 86_400
    assert safe_challenge_delay(11155111, 600) == 600
    with pytest.raises(ConfigError, match=r"refused on chain 11155111: .*stolen operator key"):
        safe_challenge_delay(11155111, 0)


def test_deploy_cli_keeps_credentials_out_and_funds_the_operator(w3: Any, anvil: Any, tmp_path: Path) -> None:
    deployer, operator = funded(w3), funded(w3)
    port = anvil.rpc_url.rsplit(":", 1)[1]
    secret_url = f"http://alice:s3cr3t-pass@127.0.0.1:{port}/?apikey=KEY-0123456789"
    env = {**os.environ, "LORALEDGER_PRIVATE_KEY": "0x" + bytes(deployer.key).hex()}
    env.pop("LORALEDGER_DEPLOYMENT", None)

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loraledger.node.cli", *argv], check=False, capture_output=True,
                              text=True, timeout=180, env=env, cwd=tmp_path)

    out = cli("deploy", "--rpc-url", secret_url, "--operator", operator.address,
              "--mint-to", operator.address, "5000")
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "deployment.json").read_text()
    for leaked in ("s3cr3t", "KEY-0123456789", "alice", "rpcUrl", f":{port}"):
        assert leaked not in text
    journal = tmp_path / "deployment.journal.json"
    assert journal.is_file() and "s3cr3t" not in journal.read_text() and "KEY-0123" not in journal.read_text()
    dep = json.loads(text)
    assert dep["challengeDelay"] == 0  # chain 31337 is a dev chain
    token = Contracts.at(ChainClient(w3, deployer), dep["addresses"]).token
    assert int(token.balance_of(operator.address)) == 5000

    # ./deployment.json is found without --deployment; the RPC URL comes from the environment
    env["LORALEDGER_CHAIN_RPC_URL"] = anvil.rpc_url
    assert load_config(environ={}).chain.deployment != "deployment.json"  # not in this test's cwd
    out = cli("token", "mint", "--to", operator.address, "--amount", "7000")
    assert out.returncode == 0, out.stderr
    assert int(token.balance_of(operator.address)) == 12_000
    out = cli("operator", "status", "--address", operator.address, "--records", str(tmp_path / "none.sqlite"))
    assert out.returncode == 0, out.stderr
    assert "reward tokens:      12000" in out.stdout and "ETH balance:" in out.stdout
    assert f"operator {operator.address}" in out.stdout

    # without any deployment record, the error names --deployment, not `devnet up`
    (tmp_path / "deployment.json").unlink()
    out = cli("operator", "status", "--address", operator.address)
    assert out.returncode != 0
    assert "--deployment PATH" in out.stderr and "$LORALEDGER_DEPLOYMENT" in out.stderr
