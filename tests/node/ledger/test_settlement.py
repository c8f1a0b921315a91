"""Settlement end to end on the real anvil with the real contracts: records for a registered datanet and two
adapters (one merged request kind), two epochs, payout rotation and suspension between them, every account
paid (by its own claim or by push), balances checked against sums computed independently here; kill -9 of a
settling process before and after its transaction is sent; a transaction that reverts; a dropped transaction;
a fee-bump replacement; a record tampered in the log; a claim with nothing new to pay."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import TransactionNotFound

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.claims import (
    ClaimError,
    claim,
    proof_from_epoch_file,
    proofs_from_epoch_file,
    push_claims,
)
from loraledger.node.ledger.epochs import (
    BUILT,
    CONFIRMED,
    SUBMITTED,
    SettlementError,
    TamperError,
    export_epoch,
)
from loraledger.node.ledger.merkle import REWARD_LEAF_ENCODING, verify
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.ledger.rewards import contributor_weights, record_fee
from loraledger.node.ledger.settler import SettlementOptions, Settler
from loraledger.node.types import Address

REPO = Path(__file__).resolve().parents[3]
FEES = {1: 7, 2: 13}  # fee per token of adapters 1 and 2 (their on-chain ids in the fresh deployment)
SHARES = (7000, 2000, 1000)


@dataclass
class World:
    w3: Web3
    deployment: Deployment
    admin: Contracts
    owners: dict[int, Address]  # adapter id -> owner
    contributors: list[LocalAccount]
    lineage: dict[int, dict[str, int]]
    payout: Address  # contributors[0] rotates its payout here before epoch 2

    def bind(self, account: LocalAccount) -> Contracts:
        return Contracts.at(ChainClient(self.w3, account), self.deployment.addresses)

    def new_operator(self) -> LocalAccount:
        """A fresh account with ETH for gas, reward tokens, and OPERATOR_ROLE: its own epoch stream from 1."""
        acct: LocalAccount = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**21)])  # type: ignore[arg-type]
        self.admin.token.mint(acct.address, 10**30)
        self.admin.ledger.grant_operator(acct.address)
        return acct


@pytest.fixture(scope="module")
def world(w3: Web3) -> World:
    return build_world(w3)


def build_world(w3: Web3, challenge_delay: int | None = None) -> World:
    """A fresh deployment with registered contributors, one datanet and adapters 1 and 2 (owners 1 and 2)."""
    deployment = deploy_all(w3, dev_account(0), shares=SHARES, challenge_delay=challenge_delay)
    admin = Contracts.at(ChainClient(w3, dev_account(0)), deployment.addresses)
    contributors = [dev_account(i) for i in (3, 4, 5, 6)]
    for acct in contributors:
        c = Contracts.at(ChainClient(w3, acct), deployment.addresses)
        if not c.contributors.is_registered(acct.address):
            c.contributors.register(f"ipfs://{acct.address}")
    curator = Contracts.at(ChainClient(w3, dev_account(8)), deployment.addresses)
    dn = curator.datanets.register_datanet("0x" + "5d" * 32, 4, "file://datanet.jsonl")
    owners: dict[int, Address] = {}
    for k, owner_index in ((1, 1), (2, 2)):
        c = Contracts.at(ChainClient(w3, dev_account(owner_index)), deployment.addresses)
        rnd = random.Random(k).randbytes(32)
        aid = c.adapters.register_adapter(rnd, b"\x01" * 32, b"\x02" * 32, [dn], FEES[k], f"file://adapter{k}")
        assert aid == k
        owners[aid] = Address(dev_account(owner_index).address)
    c0, c1, c2, c3 = (a.address for a in contributors)
    lineage = {1: {c0: 100, c1: 300, c2: 50}, 2: {c1: 200, c3: 100}}
    return World(w3, deployment, admin, owners, contributors, lineage, Address(dev_account(7).address))


def make_records(world: World, rng: random.Random, n: int, start: int) -> list[AttributionRecord]:
    """n records over adapter 1, adapter 2 and merged (1, 2) requests, contributors from lineage."""
    out = []
    kinds = [([1], [10_000]), ([2], [10_000]), ([1, 2], [6000, 4000])]
    for i in range(start, start + n):
        ids, weights = kinds[i % 3]
        prompt, completion = rng.randint(1, 200), rng.randint(1, 300)
        fees = [FEES[a] for a in ids]
        out.append(AttributionRecord.create(
            request_id=i.to_bytes(32, "big"), adapter_ids=ids, weights_bps=weights, prompt_tokens=prompt,
            completion_tokens=completion, fee=record_fee(weights, fees, prompt, completion),
            output_hash=rng.randbytes(32),
            contributors=contributor_weights(ids, weights, fees, world.lineage)))
    return out


def expected_exact(world: World, records: list[AttributionRecord], operator: Address,
                   suspended: set[str], payout: dict[str, str]) -> dict[str, Fraction]:
    """Exact rational amounts straight from the registry data and usage (independent of loraledger.node.ledger.rewards)."""
    out: dict[str, Fraction] = {}

    def add(a: str, v: Fraction) -> None:
        out[a] = out.get(a, Fraction(0)) + v

    for r in records:
        fee = Fraction(int(r.fee))
        add(operator, fee * SHARES[2] / 10_000)
        nums = {a: w * FEES[a] for a, w in zip(r.adapter_ids, r.weights_bps, strict=True)}
        for a, n in nums.items():
            add(world.owners[a], fee * SHARES[1] / 10_000 * n / sum(nums.values()))
        # data share: adapter a's part goes over its lineage (token counts), then re-pooled without the suspended
        shares: dict[str, Fraction] = {}
        for a, n in nums.items():
            lin = world.lineage[a]
            for c, t in lin.items():
                shares[c] = shares.get(c, Fraction(0)) + Fraction(n, sum(nums.values())) * Fraction(t, sum(lin.values()))
        active = {c: s for c, s in shares.items() if c not in suspended}
        total = sum(active.values())
        for c, s in active.items():
            add(payout.get(c, c), fee * SHARES[0] / 10_000 * s / total)
    return out


def _balances(world: World, accounts: list[str]) -> dict[str, int]:
    return {a: int(world.admin.token.balance_of(a)) for a in accounts}


def tamper(db: Path, sql: str, params: tuple[str, ...]) -> int:
    """Run one raw statement on the log's SQLite file from a connection of its own (as an attacker with write
    access to the file would); returns the rows changed."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        return int(conn.execute(sql, params).rowcount)


def test_two_epochs_claims_and_exports(world: World, tmp_path: Path) -> None:
    w3, admin = world.w3, world.admin
    operator = world.new_operator()
    op_contracts = world.bind(operator)
    rng = random.Random(7)
    c0, c1, c2, c3 = (a.address for a in world.contributors)
    accounts = [operator.address, *world.owners.values(), c0, c1, c2, c3, world.payout]
    start_bal = _balances(world, accounts)
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        settler = Settler(log_, op_contracts)
        # ---- epoch 1
        e1 = make_records(world, rng, 30, 0)
        log_.append_many(e1)
        assert settler.settle() is not None
        assert settler.settle() is None  # nothing pending: no epoch, no transaction
        assert op_contracts.ledger.last_epoch(operator.address) == 1
        out1 = export_epoch(log_, 1, tmp_path / "epoch1.json")
        # half the accounts claim for themselves after epoch 1
        for acct in world.contributors[:2]:
            res = claim(world.bind(acct).ledger, proof_from_epoch_file(out1, acct.address))
            assert res.paid > 0 and res.tx_hash is not None
        # ---- between epochs: c0 rotates its payout, c3 is suspended
        world.bind(world.contributors[0]).contributors.set_payout_address(world.payout)
        admin.contributors.suspend(c3)  # the deployer holds SUSPENDER_ROLE
        e2 = make_records(world, rng, 25, 1000)
        log_.append_many(e2)
        outcome = settler.tick(now=time.time() + 10**6)  # due by age
        assert [o.epoch for o in outcome] == [2]
        assert op_contracts.ledger.last_epoch(operator.address) == 2
        out2 = export_epoch(log_, 2, tmp_path / "epoch2.json")

        # ledger balance == unclaimed cumulative totals, before the rest is claimed
        ledger_addr = admin.ledger.address
        total2 = int(json.loads(out2.read_text())["cumulativeTotal"])
        claimed_so_far = int(admin.ledger.claimed_total(operator.address))
        assert int(admin.token.balance_of(ledger_addr)) == total2 - claimed_so_far

        # c1 claims again and gets only what epoch 2 added; a second try has nothing new and sends nothing
        c1_ledger = world.bind(world.contributors[1]).ledger
        c1_epoch1 = int(admin.ledger.claimed(operator.address, c1))
        mine = claim(c1_ledger, proof_from_epoch_file(out2, c1))
        assert mine.tx_hash is not None and mine.already_claimed == c1_epoch1
        assert mine.paid == int(mine.cumulative_amount) - c1_epoch1 > 0
        nonce_before = w3.eth.get_transaction_count(c1)
        again = claim(c1_ledger, proof_from_epoch_file(out2, c1))
        assert again.tx_hash is None and again.paid == 0 and "nothing new" in again.message
        assert w3.eth.get_transaction_count(c1) == nonce_before  # nothing was sent
        # c0 rotated its payout before epoch 2: it has nothing new, its payout address earned instead
        assert claim(world.bind(world.contributors[0]).ledger, proof_from_epoch_file(out2, c0)).tx_hash is None
        # everyone else is pushed by the node, in batches; those already paid are skipped
        pushed = push_claims(op_contracts.ledger, proofs_from_epoch_file(out2), max_batch=3)
        assert {c0, c1} <= set(pushed.skipped) and world.payout in pushed.paid and len(pushed.tx_hashes) >= 2
        assert push_claims(op_contracts.ledger, proofs_from_epoch_file(out2)).tx_hashes == []  # all paid

        # ---- independent expectation
        exp = expected_exact(world, e1, operator.address, set(), {})
        for a, v in expected_exact(world, e2, operator.address, {c3}, {c0: world.payout}).items():
            exp[a] = exp.get(a, Fraction(0)) + v
        end_bal = _balances(world, accounts)
        fees = sum(int(r.fee) for r in e1 + e2)
        gained = {a: end_bal[a] - start_bal[a] for a in accounts}
        gained[operator.address] += fees  # the operator funded every fee and got its share back
        assert sum(gained.values()) == fees  # nothing created or lost
        for a in accounts:
            assert abs(gained[a] - exp.get(a, Fraction(0))) <= 2, (a, gained[a], float(exp.get(a, 0)))
        assert int(admin.token.balance_of(ledger_addr)) == 0  # everything owed was paid out

        # ---- records verify on chain with the node's proofs; a wrong leaf does not
        for r in (e1[0], e2[-1]):
            rp = settler.proofs.record_proof(r.request_id)
            assert rp is not None
            assert admin.ledger.verify_record(operator.address, rp.epoch, rp.record, rp.proof)
            assert admin.ledger.record_leaf(operator.address, rp.epoch, rp.record) == rp.leaf
            # a record of this operator proves nothing under another operator, nor with a field changed
            assert not admin.ledger.verify_record(admin.ledger.client.address, rp.epoch, rp.record, rp.proof)
            forged = AttributionRecord(**{**rp.record.__dict__, "fee": rp.record.fee + 1})
            assert not admin.ledger.verify_record(operator.address, rp.epoch, forged, rp.proof)
        rw = settler.proofs.reward_proof(c1)
        assert rw is not None and rw.epoch == 2
        assert verify(bytes.fromhex(rw.rewards_root[2:]), REWARD_LEAF_ENCODING, [c1, int(rw.cumulative_amount)],
                      [bytes.fromhex(p[2:]) for p in rw.proof])

        # ---- tampering with a settled record is caught at export
        rid = e1[3].request_id
        assert tamper(tmp_path / "log.sqlite", "UPDATE records SET fee = ? WHERE request_id = ?", ("1", rid)) == 1
        with pytest.raises(TamperError, match="records rebuilt from the log"):
            export_epoch(log_, 1, tmp_path / "tampered.json")
        tamper(tmp_path / "log.sqlite", "UPDATE records SET fee = ? WHERE request_id = ?", (str(int(e1[3].fee)), rid))
        export_epoch(log_, 1, tmp_path / "restored.json")
        tamper(tmp_path / "log.sqlite", "UPDATE balances SET cumulative = ? WHERE epoch = 2 AND account = ?", ("5", c1))
        with pytest.raises(TamperError, match="balance was altered"):
            export_epoch(log_, 2, tmp_path / "tampered2.json")

    # a stale epoch file is refused before anything is sent
    with pytest.raises(ClaimError, match="is in effect now: fetch the proof of epoch 2"):
        claim(world.bind(world.contributors[1]).ledger, proof_from_epoch_file(out1, c1))


# ---------------------------------------------------------------------- crash safety (kill -9 of a real process)

_CHILD = r"""
import json, sys, time
from web3 import Web3
from web3.exceptions import TransactionNotFound
from eth_account import Account
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.bindings import Contracts
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.settler import Settler
cfg = json.loads(sys.argv[1])
w3 = Web3(Web3.HTTPProvider(cfg["rpc"]))
contracts = Contracts.at(ChainClient(w3, Account.from_key(cfg["key"])), cfg["addresses"])
def hook(step, n):
    if step == cfg["stop_at"]:
        print("AT", step, n, flush=True)
        time.sleep(600)
Settler(RecordLog.open(cfg["log"]), contracts, on_step=hook).settle()
print("DONE", flush=True)
"""


@pytest.mark.parametrize("stop_at", ["built", "signed", "sent"])
def test_kill_9_during_settlement(world: World, anvil: object, tmp_path: Path, stop_at: str) -> None:
    operator = world.new_operator()
    op = world.bind(operator)
    db = tmp_path / "log.sqlite"
    records = make_records(world, random.Random(stop_at), 12, 0)
    with RecordLog.open(db) as log_:
        log_.append_many(records)
    cfg = {"rpc": anvil.rpc_url, "key": operator.key.hex(), "addresses": world.deployment.addresses,  # type: ignore[attr-defined]
           "log": str(db), "stop_at": stop_at}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(f"AT {stop_at} 1"), f"child did not reach {stop_at}: {line!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    nonce_after_kill = world.w3.eth.get_transaction_count(operator.address)

    with RecordLog.open(db) as log_:
        row = log_.epoch(1)
        assert row is not None and row.state == {"built": BUILT, "signed": SUBMITTED, "sent": SUBMITTED}[stop_at]
        if stop_at == "sent":  # the transaction already landed: resuming must not send anything
            assert op.ledger.last_epoch(operator.address) == 1
        done = Settler(log_, op).resume()
        assert [o.epoch for o in done] == [1]
        row = log_.epoch(1)
        assert row is not None and row.state == CONFIRMED
        assert op.ledger.last_epoch(operator.address) == 1
        sent_after = world.w3.eth.get_transaction_count(operator.address) - nonce_after_kill
        # killed at built: approve + submit still to send; at signed: only the stored bytes; at sent: nothing
        assert sent_after == {"built": 2, "signed": 1, "sent": 0}[stop_at]
        fees = sum(int(r.fee) for r in records)
        assert int(op.ledger.funded_total(operator.address)) == fees  # pulled exactly once
        assert len(log_.records_of_epoch(1)) == 12
        out = export_epoch(log_, 1, tmp_path / "e1.json")
        for p in proofs_from_epoch_file(out):
            assert verify(bytes.fromhex(p.rewards_root[2:]), REWARD_LEAF_ENCODING, [p.account, int(p.cumulative_amount)],
                          [bytes.fromhex(x[2:]) for x in p.proof])
        assert Settler(log_, op).settle() is None  # nothing left, nothing sent


# ---------------------------------------------------------------------- transaction trouble, in process


def _rpc(w3: Web3, method: str, *params: object) -> object:
    res = w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    assert "error" not in res, res
    return res.get("result")


def _settler_with(world: World, tmp_path: Path, hook: Callable[[str, int], None],
                  options: SettlementOptions | None = None) -> tuple[Settler, RecordLog, LocalAccount]:
    operator = world.new_operator()
    log_ = RecordLog.open(tmp_path / "log.sqlite")
    log_.append_many(make_records(world, random.Random(3), 6, 0))
    return Settler(log_, world.bind(operator), options, on_step=hook), log_, operator


def test_reverted_submit_stops_and_keeps_records(world: World, tmp_path: Path) -> None:
    admin = world.admin

    def pause_before_broadcast(step: str, n: int) -> None:
        if step == "signed" and not admin.ledger.paused():
            admin.ledger.pause()  # lands before our signed transaction is broadcast

    settler, log_, operator = _settler_with(world, tmp_path, pause_before_broadcast)
    try:
        with pytest.raises(SettlementError, match="EnforcedPause"):
            settler.settle()
        row = log_.epoch(1)
        assert row is not None and row.state == BUILT and "EnforcedPause" in (row.last_error or "")
        assert len(log_.records_of_epoch(1)) == 6
        admin.ledger.unpause()
        settler.on_step = None
        outcome = settler.resume()
        assert [o.epoch for o in outcome] == [1]
        assert admin.ledger.last_epoch(operator.address) == 1
    finally:
        if admin.ledger.paused():
            admin.ledger.unpause()
        log_.close()


def test_dropped_transaction_is_rebroadcast_with_same_bytes(world: World, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="loraledger.node.ledger.settler")
    w3 = world.w3
    seen: dict[str, str] = {}

    def drop_after_send(step: str, n: int) -> None:
        if step == "signed" and not seen:
            _rpc(w3, "evm_setAutomine", False)
        if step == "sent" and not seen:
            row = log_.epoch(n)
            assert row is not None and row.tx_hash is not None
            seen["hash"] = row.tx_hash
            _rpc(w3, "anvil_dropTransaction", row.tx_hash)
            _rpc(w3, "evm_setAutomine", True)

    settler, log_, operator = _settler_with(world, tmp_path, drop_after_send,
                                            SettlementOptions(poll_interval=0.05, replace_after=600))
    try:
        outcome = settler.settle()
        assert outcome is not None and outcome.tx_hash == seen["hash"]  # same signed bytes, same hash
        assert "re-broadcast" in caplog.text
        assert w3.eth.get_transaction_receipt(seen["hash"])["status"] == 1
        assert world.admin.ledger.last_epoch(operator.address) == 1
    finally:
        _rpc(w3, "evm_setAutomine", True)
        log_.close()


def test_stuck_transaction_is_replaced_with_same_nonce_and_higher_fees(world: World, tmp_path: Path) -> None:
    w3 = world.w3
    sent: list[str] = []

    def hold_then_mine(step: str, n: int) -> None:
        if step == "signed" and not sent:
            _rpc(w3, "evm_setAutomine", False)
        if step == "sent":
            row = log_.epoch(n)
            assert row is not None and row.tx_hash is not None
            sent.append(row.tx_hash)
            if len(sent) == 2:  # the replacement is in the pool: mine it
                _rpc(w3, "evm_mine")
                _rpc(w3, "evm_setAutomine", True)

    settler, log_, operator = _settler_with(world, tmp_path, hold_then_mine,
                                            SettlementOptions(poll_interval=0.05, replace_after=0.2))
    try:
        outcome = settler.settle()
        assert outcome is not None and len(sent) == 2 and outcome.tx_hash == sent[1] != sent[0]
        assert w3.eth.get_transaction(sent[1])["nonce"] == log_.epoch(1).tx_nonce  # type: ignore[union-attr]
        with pytest.raises(TransactionNotFound):
            w3.eth.get_transaction_receipt(sent[0])  # the original never landed
        assert world.admin.ledger.last_epoch(operator.address) == 1
    finally:
        _rpc(w3, "evm_setAutomine", True)
        log_.close()


# ---------------------------------------------------------------------- the command line


def test_cli_settle_export_show_claim_push(world: World, anvil: object, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from loraledger.node.chain.keys import write_keystore
    from loraledger.node.cli import main

    operator = world.new_operator()
    dep = dataclasses.replace(world.deployment, extra={"rpcUrl": anvil.rpc_url})  # type: ignore[attr-defined]
    (tmp_path / "deployment.json").write_text(dep.to_json())
    db = tmp_path / "log.sqlite"
    with RecordLog.open(db) as log_:
        log_.append_many(make_records(world, random.Random(11), 9, 0))
    monkeypatch.setenv("LORALEDGER_OPERATOR_KEY", operator.key.hex())
    monkeypatch.setenv("LORALEDGER_KEY_PASSWORD", "pw")
    common = ["--records", str(db), "--deployment", str(tmp_path / "deployment.json")]

    assert main(["epoch", "settle", *common]) == 0
    assert "epoch 1: 9 records" in capsys.readouterr().out
    assert main(["epoch", "settle", *common]) == 0
    assert "nothing to settle" in capsys.readouterr().out
    assert main(["epoch", "export", "1", "--out", str(tmp_path / "e1.json"), *common]) == 0
    doc = json.loads((tmp_path / "e1.json").read_text())
    assert doc["ledger"] == world.deployment.addresses["AttributionLedger"] and len(doc["records"]) == 9

    contributor = world.contributors[1]
    key_file = write_keystore(tmp_path / "c1.json", contributor, "pw", kdf="pbkdf2", iterations=2)
    assert main(["rewards", "show", contributor.address, *common]) == 0
    shown = capsys.readouterr().out
    owed = int(next(e["cumulativeAmount"] for e in doc["rewards"] if e["account"] == contributor.address))
    assert f"cumulative under epoch 1 (in effect): {owed}" in shown and f"claimable now: {owed}" in shown
    before = int(world.admin.ledger.claimed(operator.address, contributor.address))
    assert main(["rewards", "claim", "--key-file", str(key_file), "--epoch-file", str(tmp_path / "e1.json"),
                 "--operator", operator.address, *common]) == 0
    assert f"paid {owed - before}" in capsys.readouterr().out
    assert main(["rewards", "claim", "--key-file", str(key_file), "--epoch-file", str(tmp_path / "e1.json"),
                 *common]) == 0
    assert "nothing new to pay" in capsys.readouterr().out
    assert main(["rewards", "push", *common]) == 0
    assert "skipped" in capsys.readouterr().out
    assert int(world.admin.ledger.claimed_total(operator.address)) == int(doc["cumulativeTotal"])
    assert main(["epoch", "export", "7", "--out", str(tmp_path / "x.json"), *common]) == 1  # clear error, exit 1
    assert "epoch 7 is not in the record log" in capsys.readouterr().err


def test_reorg_that_drops_the_submit_is_detected_and_resent(world: World, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="loraledger.node.ledger.settler")
    w3 = world.w3
    sent: list[str] = []
    first_block: list[bytes] = []

    def reorg_after_send(step: str, n: int) -> None:
        if step == "sent" and not sent:
            row = log_.epoch(n)
            assert row is not None and row.tx_hash is not None
            sent.append(row.tx_hash)
            first = w3.eth.wait_for_transaction_receipt(row.tx_hash, timeout=10)  # type: ignore[arg-type]
            assert first["status"] == 1  # mined...
            first_block.append(bytes(first["blockHash"]))
            _rpc(w3, "anvil_reorg", 1, [])  # ...and reorged out of the chain
            _rpc(w3, "evm_setIntervalMining", 1)  # blocks keep coming, so confirmations can accrue

    settler, log_, operator = _settler_with(world, tmp_path, reorg_after_send,
                                            SettlementOptions(confirmations=2, poll_interval=0.1))
    try:
        outcome = settler.settle()
        assert outcome is not None and outcome.tx_hash == sent[0]  # same signed bytes, landed again
        receipt = w3.eth.get_transaction_receipt(sent[0])
        row = log_.last_confirmed()
        # The settler marks the epoch confirmed only once its receipt is 2 blocks deep and canonical; the depth
        # is checked on the block the log recorded, since anvil may later return a reorged transaction to its
        # pool and include it again in a newer block, which moves what get_transaction_receipt reports.
        assert row is not None and row.confirmed_block is not None
        assert w3.eth.block_number - row.confirmed_block >= 2
        assert bytes(receipt["blockHash"]) != first_block[0]  # it landed again, in a block of the new chain
        # (anvil may or may not return a reorged transaction to its pool; when not, we re-broadcast it)
        assert "re-broadcast" in caplog.text or "confirmed" in caplog.text
        assert world.admin.ledger.last_epoch(operator.address) == 1
    finally:
        _rpc(w3, "evm_setIntervalMining", 0)  # on anvil this also leaves automine off: turn it back on for
        _rpc(w3, "evm_setAutomine", True)  # the tests after this one (the devnet is shared by the session)
        log_.close()
