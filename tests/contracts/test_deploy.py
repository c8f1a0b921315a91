"""loraledger.node.chain.deploy: the full deployment from a signing key and from an unlocked devnet account, and its record."""

from __future__ import annotations

import json

import pytest
from eth_account import Account
from web3 import Web3

from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.keys import dev_account
from loraledger.node.errors import ConfigError
from tests.contracts.helpers import ChainEnv, contract, send

# anvil's well-known dev key #9 (public test mnemonic; never holds real value)
DEV_KEY_9 = "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6"


def test_session_deployment_is_wired(env: ChainEnv) -> None:
    d = env.deployment
    assert d.chain_id == 31337 and d.deployer == env.admin
    assert d.operator == env.operator and d.guardian == env.guardian and not d.external_token
    assert set(d.addresses) == {"RewardToken", "ContributorRegistry", "DatanetRegistry", "AdapterRegistry",
                                "AttributionLedger"}
    assert set(d.artifact_sha256) == set(d.addresses)
    for name, address in d.addresses.items():
        assert env.w3.eth.get_code(address), name
    assert env.adapters.functions.datanetRegistry().call() == d.address("DatanetRegistry")
    assert env.datanets.functions.contributorRegistry().call() == d.address("ContributorRegistry")
    assert env.ledger.functions.rewardToken().call() == d.address("RewardToken")
    assert Deployment.from_json(d.to_json()) == d
    with pytest.raises(ConfigError, match="no contract"):
        d.address("Nope")


def test_deploy_with_a_local_key_and_an_external_token(env: ChainEnv) -> None:
    w3: Web3 = env.w3
    acct = Account.from_key(DEV_KEY_9)
    d = deploy_all(w3, acct, challenge_delay=60, shares=(6000, 3000, 1000), token=env.token.address,
                   guardian=env.guardian)
    assert d.deployer == acct.address and d.external_token and d.address("RewardToken") == env.token.address
    assert "RewardToken" not in d.artifact_sha256
    ledger = contract(w3, "AttributionLedger", d.address("AttributionLedger"))
    assert ledger.functions.challengeDelay().call() == 60
    assert ledger.functions.shares().call() == [6000, 3000, 1000]
    assert ledger.functions.hasRole(ledger.functions.GUARDIAN_ROLE().call(), env.guardian).call()
    assert ledger.functions.hasRole(ledger.functions.OPERATOR_ROLE().call(), acct.address).call()
    assert not ledger.functions.hasRole(ledger.functions.OPERATOR_ROLE().call(), env.operator).call()
    # the external token works with the new ledger
    send(w3, env.token.functions.approve(ledger.address, 5), env.operator)
    assert env.token.functions.allowance(env.operator, ledger.address).call() == 5


def test_bad_arguments_fail_before_any_transaction(env: ChainEnv) -> None:
    w3 = env.w3
    nonce = w3.eth.get_transaction_count(env.admin)
    with pytest.raises(ConfigError, match="sum to 10000"):
        deploy_all(w3, dev_account(0), shares=(7000, 2000, 999))
    with pytest.raises(ConfigError, match="has no code"):
        deploy_all(w3, dev_account(0), token=env.users[0])
    with pytest.raises(ConfigError, match="not an address"):
        deploy_all(w3, dev_account(0), operator="0x1234")
    assert w3.eth.get_transaction_count(env.admin) == nonce


def test_deployment_record_rejects_malformed_json() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        Deployment.from_json("{")
    with pytest.raises(ConfigError, match="lacks addresses"):
        Deployment.from_json('{"chainId": 1, "blockNumber": 1, "deployer": "0x' + "11" * 20 + '", "addresses": {}}')
    full = {name: "0x" + "22" * 20 for name in ("RewardToken", "ContributorRegistry", "DatanetRegistry",
                                                 "AdapterRegistry", "AttributionLedger")}
    with pytest.raises(ConfigError, match="malformed"):
        Deployment.from_json(json.dumps({"addresses": full}))  # no chainId
    with pytest.raises(ConfigError, match="not an address"):
        Deployment.from_json(json.dumps({"addresses": {**full, "RewardToken": "0x12"}}))
