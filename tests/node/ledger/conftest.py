"""Fixtures of the ledger tests: a deployment with a challenge delay on an anvil of its own (its clock is moved
with evm_increaseTime, which the session anvil's other users must not see)."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.devnet import Anvil
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.ledger.rewards import contributor_weights, record_fee

DELAY = 100  # seconds a root waits before it takes effect
FEE = 7


@dataclass
class DelayWorld:
    anvil: Anvil
    w3: Web3
    deployment: Deployment
    deployment_file: Path
    operator: LocalAccount
    contributors: list[LocalAccount]
    lineage: dict[int, dict[str, int]]

    def bind(self, account: LocalAccount) -> Contracts:
        return Contracts.at(ChainClient(self.w3, account), self.deployment.addresses)

    def advance(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def new_operator(self, tokens: int = 10**30, eth: int = 10**21) -> LocalAccount:
        """A fresh operator (its own epoch stream from 1) with `eth` wei and `tokens` reward tokens."""
        op: LocalAccount = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [op.address, hex(eth)])  # type: ignore[arg-type]
        admin = self.bind(dev_account(0))
        if tokens:
            admin.token.mint(op.address, tokens)
        admin.ledger.grant_operator(op.address)
        return op

    def records(self, rng: random.Random, n: int, start: int) -> list[AttributionRecord]:
        """n records over the world's adapter, request ids from `start` on."""
        (aid,) = self.lineage
        out = []
        for i in range(start, start + n):
            prompt, completion = rng.randint(1, 50), rng.randint(1, 80)
            out.append(AttributionRecord.create(
                request_id=i.to_bytes(32, "big"), adapter_ids=[aid], weights_bps=[10_000], prompt_tokens=prompt,
                completion_tokens=completion, fee=record_fee([10_000], [FEE], prompt, completion),
                output_hash=rng.randbytes(32),
                contributors=contributor_weights([aid], [10_000], [FEE], self.lineage)))
        return out


@pytest.fixture(scope="module")
def delay_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DelayWorld]:
    root = tmp_path_factory.mktemp("delay-world")
    with Anvil(root / "anvil") as anvil:
        w3 = Web3(Web3.HTTPProvider(anvil.rpc_url, request_kwargs={"timeout": 30}))
        dep = deploy_all(w3, dev_account(0), challenge_delay=DELAY)
        dep_file = root / "deployment.json"
        dep_file.write_text(dep.to_json())
        admin = Contracts.at(ChainClient(w3, dev_account(0)), dep.addresses)
        op: LocalAccount = Account.create()
        w3.provider.make_request("anvil_setBalance", [op.address, hex(10**21)])  # type: ignore[arg-type]
        admin.token.mint(op.address, 10**30)
        admin.ledger.grant_operator(op.address)
        contributors = [dev_account(i) for i in (3, 4, 5)]
        for acct in contributors:
            Contracts.at(ChainClient(w3, acct), dep.addresses).contributors.register("ipfs://c")
        curator = Contracts.at(ChainClient(w3, dev_account(8)), dep.addresses)
        dn = curator.datanets.register_datanet("0x" + "5d" * 32, 3, "file://datanet.jsonl")
        owner = Contracts.at(ChainClient(w3, dev_account(1)), dep.addresses)
        aid = owner.adapters.register_adapter(random.Random(1).randbytes(32), b"\x01" * 32, b"\x02" * 32, [dn],
                                              FEE, "file://adapter")
        c0, c1, c2 = (a.address for a in contributors)
        yield DelayWorld(anvil, w3, dep, dep_file, op, contributors, {int(aid): {c0: 100, c1: 300, c2: 50}})


class TcpProxy:
    """A loopback TCP proxy in front of an RPC endpoint that a test can cut (`down`) and restore (`up`)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def down(self) -> None:
        srv, self._server = self._server, None
        if srv is not None:
            try:
                srv.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone leaves it listening)
            except OSError:
                pass
            srv.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
