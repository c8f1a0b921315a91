"""Fixtures of the contract suite: one deployment per session on the shared anvil, reverted after every test.

`env` (function scope) = the session deployment + the `chain_snapshot` of tests/conftest.py, so each test starts
from the same freshly deployed, funded state (roles in tests/contracts/helpers.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from web3 import Web3

from loraledger.node.chain.deploy import deploy_all
from loraledger.node.chain.keys import dev_account
from tests.contracts.helpers import DELAY, MAX_UINT, OPERATOR_FUNDS, ChainEnv, contract, deploy, send


@pytest.fixture(scope="session")
def chain_env(w3: Web3) -> ChainEnv:
    """Deploy everything once per session, plus a ledger with a challenge delay; fund and approve the operator."""
    accounts = list(w3.eth.accounts)
    admin, operator, guardian = accounts[0], accounts[1], accounts[2]
    assert dev_account(0).address == admin  # anvil's dev key 0 signs the deployment
    d = deploy_all(w3, dev_account(0), operator=operator, guardian=guardian)
    token = contract(w3, "RewardToken", d.address("RewardToken"))
    ledger = contract(w3, "AttributionLedger", d.address("AttributionLedger"))
    delayed = deploy(w3, "AttributionLedger", [admin, token.address, DELAY, 7000, 2000, 1000], admin)
    role = delayed.functions.OPERATOR_ROLE().call()
    send(w3, delayed.functions.grantRole(role, operator), admin)
    send(w3, delayed.functions.grantRole(delayed.functions.GUARDIAN_ROLE().call(), guardian), admin)
    send(w3, token.functions.mint(operator, OPERATOR_FUNDS), admin)
    send(w3, token.functions.approve(ledger.address, MAX_UINT), operator)
    send(w3, token.functions.approve(delayed.address, MAX_UINT), operator)
    return ChainEnv(
        w3=w3,
        deployment=d,
        token=token,
        contributors=contract(w3, "ContributorRegistry", d.address("ContributorRegistry")),
        datanets=contract(w3, "DatanetRegistry", d.address("DatanetRegistry")),
        adapters=contract(w3, "AdapterRegistry", d.address("AdapterRegistry")),
        ledger=ledger,
        delayed_ledger=delayed,
        admin=admin,
        operator=operator,
        guardian=guardian,
        users=accounts[3:],
    )


@pytest.fixture
def env(chain_env: ChainEnv, chain_snapshot: str) -> Iterator[ChainEnv]:
    """The session deployment, with every change this test makes reverted afterwards."""
    yield chain_env
