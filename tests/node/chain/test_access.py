"""loraledger.node.chain.access against a real anvil with the real AdapterRegistry: adapters start public, the owner's
changes reach the cache through refresh() and the watcher thread, a first load replays the history, allowed()
does no RPC once an adapter is loaded, and a rewound chain is reloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3
from web3.providers.rpc import HTTPProvider

from loraledger.node.chain.access import AdapterAccess
from loraledger.node.chain.bindings import AccessChanged, AllowlistChanged, Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.devnet import Anvil, free_port
from loraledger.node.chain.keys import dev_account
from loraledger.node.errors import ChainError, ConfigError, ContractRevertError, NotFoundError
from loraledger.node.types import AdapterId

ALICE = dev_account(7).address
BOB = dev_account(8).address


class CountingProvider(HTTPProvider):
    """An HTTP provider that records the method of every JSON-RPC request it sends."""

    def __init__(self, url: str) -> None:
        super().__init__(url, request_kwargs={"timeout": 30})
        self.methods: list[str] = []

    def make_request(self, method: Any, params: Any) -> Any:
        self.methods.append(str(method))
        return super().make_request(method, params)


@pytest.fixture(scope="module")
def deployment(w3: Web3) -> Deployment:
    return deploy_all(w3, dev_account(0))


@pytest.fixture
def owner(w3: Web3, deployment: Deployment, chain_snapshot: str) -> Iterator[Contracts]:
    """Dev account 5's view of the contracts (it owns the adapters the tests register), inside a snapshot."""
    yield Contracts.at(ChainClient(w3, dev_account(5)), deployment.addresses)


@pytest.fixture
def reader(anvil: Anvil, deployment: Deployment) -> tuple[Contracts, CountingProvider]:
    """A read-only binding (throwaway account) over its own counting connection, as the node's reader."""
    provider = CountingProvider(anvil.rpc_url)
    return Contracts.at(ChainClient(Web3(provider), Account.create()), deployment.addresses), provider


@pytest.fixture
def make_access(reader: tuple[Contracts, CountingProvider], deployment: Deployment) -> Iterator[
        Callable[..., AdapterAccess]]:
    made: list[AdapterAccess] = []

    def make(**kwargs: Any) -> AdapterAccess:
        access = AdapterAccess(reader[0].adapters, deployment.block_number, **kwargs)
        made.append(access)
        return access

    yield make
    for a in made:
        a.stop()


def _adapter(c: Contracts, seed: int = 1) -> AdapterId:
    h = "0x" + f"{seed:064x}"
    datanet = c.datanets.register_datanet(h, 1, "ipfs://d")
    return c.adapters.register_adapter(h, h, h, [datanet], 1, "file://a")


def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for the watcher thread to make `cond` true."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the watcher did not apply the change"
        time.sleep(0.02)


def test_adapters_start_public(owner: Contracts, make_access: Callable[..., AdapterAccess]) -> None:
    a = _adapter(owner)
    access = make_access()
    assert access.allowed(a, "") and access.allowed(a, ALICE) and access.allowed(a, ALICE.lower())
    rule = access.rule(a)
    assert rule.public and rule.allowlist == frozenset() and rule.block == access.cursor
    assert owner.adapters.is_public(a) and owner.adapters.is_allowed(a, BOB)


def test_owner_changes_reach_the_cache_while_the_watcher_runs(
        owner: Contracts, make_access: Callable[..., AdapterAccess]) -> None:
    a, b = _adapter(owner, 1), _adapter(owner, 2)
    with make_access(interval=0.05) as access:
        assert access.allowed(a, "") and access.allowed(b, "")

        owner.adapters.set_public(a, False)
        _until(lambda: not access.allowed(a, ""))
        assert not access.allowed(a, ALICE) and access.allowed(b, ALICE)  # b untouched

        owner.adapters.set_allowed(a, [ALICE, BOB], True)
        _until(lambda: access.allowed(a, ALICE))
        assert access.allowed(a, BOB.lower()) and not access.allowed(a, "")
        assert not access.allowed(a, owner.adapters.client.address)  # owning it is not being on the allowlist

        owner.adapters.set_allowed(a, [BOB], False)
        _until(lambda: not access.allowed(a, BOB))
        assert access.allowed(a, ALICE)
        assert access.rule(a).allowlist == frozenset({ALICE})

        owner.adapters.set_public(a, True)  # public again: everyone, the allowlist kept
        _until(lambda: access.allowed(a, BOB))
        assert access.rule(a).allowlist == frozenset({ALICE})


def test_refresh_applies_events_in_order(owner: Contracts, make_access: Callable[..., AdapterAccess]) -> None:
    a = _adapter(owner)
    access = make_access()
    access.load(a)
    owner.adapters.set_public(a, False)
    owner.adapters.set_allowed(a, [ALICE], True)
    owner.adapters.set_allowed(a, [ALICE], False)
    owner.adapters.set_allowed(a, [BOB], True)
    assert access.allowed(a, "")  # nothing changes before a refresh
    assert access.refresh() == 4
    assert not access.allowed(a, ALICE) and access.allowed(a, BOB) and not access.allowed(a, "")
    assert access.refresh() == 0 and access.cursor == owner.adapters.client.w3.eth.block_number


def test_first_load_replays_the_history(owner: Contracts, make_access: Callable[..., AdapterAccess]) -> None:
    a, b = _adapter(owner, 1), _adapter(owner, 2)
    owner.adapters.set_public(a, False)
    owner.adapters.set_allowed(a, [ALICE, BOB], True)
    owner.adapters.set_allowed(a, [BOB], False)
    owner.adapters.set_allowed(b, [BOB], True)  # b stays public
    access = make_access(log_chunk=3)  # several getLogs calls for the history
    assert access.allowed(a, ALICE) and not access.allowed(a, BOB) and not access.allowed(a, "")
    assert access.rule(b).public and access.rule(b).allowlist == frozenset({BOB})
    head = owner.adapters.client.w3.eth.block_number
    events = owner.adapters.access_events(0, head, [a])
    assert [type(e) for e in events] == [AccessChanged, AllowlistChanged, AllowlistChanged, AllowlistChanged]
    assert [(e.block_number, e.log_index) for e in events] == sorted((e.block_number, e.log_index) for e in events)
    assert {e.adapter_id for e in owner.adapters.access_events(0, head)} == {a, b}
    assert owner.adapters.access_events(0, head, []) == []


def test_allowed_does_no_rpc_once_loaded(owner: Contracts, make_access: Callable[..., AdapterAccess],
                                         reader: tuple[Contracts, CountingProvider]) -> None:
    provider = reader[1]
    a, b = _adapter(owner, 1), _adapter(owner, 2)
    owner.adapters.set_public(a, False)
    owner.adapters.set_allowed(a, [ALICE], True)
    access = make_access()
    access.load(a, b)
    loaded = len(provider.methods)
    assert [m for m in provider.methods if m != "eth_chainId"] == ["eth_call", "eth_blockNumber", "eth_getLogs"]
    accounts = ["", ALICE, ALICE.lower(), BOB, "0x" + "ab" * 20]
    for i in range(20_000):
        access.allowed(a if i % 2 else b, accounts[i % len(accounts)])
    assert len(provider.methods) == loaded, provider.methods[loaded:]
    access.refresh()
    assert "eth_blockNumber" in provider.methods[loaded:]
    assert "eth_getLogs" not in provider.methods[loaded:]  # nothing new on chain: no scan either


def test_concurrent_first_use_loads_once(owner: Contracts, make_access: Callable[..., AdapterAccess],
                                         reader: tuple[Contracts, CountingProvider]) -> None:
    a = _adapter(owner)
    owner.adapters.set_public(a, False)
    owner.adapters.set_allowed(a, [ALICE], True)
    access = make_access()
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        ok = access.allowed(a, ALICE if k % 2 else BOB)
        with lock:
            results.append(ok == bool(k % 2))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert reader[1].methods.count("eth_getLogs") == 1


def test_a_non_owner_cannot_change_access(w3: Web3, owner: Contracts, deployment: Deployment,
                                          make_access: Callable[..., AdapterAccess]) -> None:
    a = _adapter(owner)
    other = Contracts.at(ChainClient(w3, dev_account(6)), deployment.addresses)
    with pytest.raises(ContractRevertError) as info:
        other.adapters.set_public(a, False)
    assert info.value.error_name == "AdapterNotOwner" and info.value.error_args == (a, other.adapters.client.address)
    with pytest.raises(ContractRevertError) as info:
        other.adapters.set_allowed(a, [ALICE], True)
    assert info.value.error_name == "AdapterNotOwner"
    access = make_access()
    access.load(a)
    access.refresh()
    assert access.allowed(a, "") and access.rule(a).allowlist == frozenset()


def test_unknown_adapters_and_bad_arguments(owner: Contracts, make_access: Callable[..., AdapterAccess]) -> None:
    a = _adapter(owner)
    access = make_access()
    for bad in (0, a + 1):
        with pytest.raises(NotFoundError, match=f"no adapter with id {bad}"):
            access.allowed(bad, "")
    with pytest.raises(NotFoundError):
        access.load(a, a + 5)
    assert access.allowed(a, "")  # a itself loads
    with pytest.raises(ContractRevertError) as info:
        owner.adapters.is_public(a + 1)
    assert info.value.error_name == "AdapterUnknown"
    with pytest.raises(ConfigError):
        make_access(log_chunk=0)


def test_a_rewound_chain_is_reloaded(w3: Web3, owner: Contracts, make_access: Callable[..., AdapterAccess]) -> None:
    a = _adapter(owner)
    access = make_access()
    access.load(a)
    snap = w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
    owner.adapters.set_public(a, False)
    access.refresh()
    assert not access.allowed(a, "")
    assert w3.provider.make_request("evm_revert", [snap])["result"] is True  # type: ignore[arg-type]
    access.refresh()  # head below the cursor: dropped, reloaded on next use
    assert access.allowed(a, "")


def test_the_watcher_survives_an_unreachable_chain(deployment: Deployment) -> None:
    dead = Web3(HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    reader = Contracts.at(ChainClient(dead, Account.create(), read_retries=1), deployment.addresses)
    access = AdapterAccess(reader.adapters, deployment.block_number, interval=0.01)
    with access:
        time.sleep(0.1)
        assert access._thread is not None and access._thread.is_alive()
        assert access.cursor is None and access.last_refresh is None
    with pytest.raises(ChainError):
        access.refresh()
    with pytest.raises(ChainError):
        access.allowed(1, "")
