"""`loraledger audit` and its watcher on the real anvil, with a ledger whose challenge delay is one hour: honest
epochs settled by the real settler pass; every tampering an operator key can publish is found with the right
message and revoked by the watcher before its root takes effect (anvil time travel); the honest node then
settles on top and every account is owed exactly what the honest computation gives."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.inference.identity import config_hash
from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.audit import (
    AdapterLineage,
    AuditChain,
    AuditReport,
    audit_epoch,
    lineage_from_document,
)
from loraledger.node.ledger.export import canonical_export, dump_export, export_document, sha256_hex
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord, RecordDomain
from loraledger.node.ledger.rewards import contributor_weights, epoch_amounts, record_fee
from loraledger.node.ledger.settler import Settler
from loraledger.node.ledger.terms import terms_to_json
from loraledger.node.ledger.watch import Watcher, WatchOptions
from loraledger.node.types import Address

REPO = Path(__file__).resolve().parents[3]
DELAY = 3600
GRACE = 600
FEES = {1: 7, 2: 13}
SHARES = (6000, 2500, 1500)
ROOT = "0x" + "5d" * 32


@dataclass
class World:
    w3: Web3
    deployment: Deployment
    deployment_file: Path
    admin: Contracts  # dev 0: admin and guardian
    contributors: list[LocalAccount]
    lineage: dict[int, dict[str, int]]
    lineage_docs: dict[int, dict[str, Any]]

    def bind(self, account: LocalAccount) -> Contracts:
        return Contracts.at(ChainClient(self.w3, account), self.deployment.addresses)

    def new_operator(self) -> LocalAccount:
        acct: LocalAccount = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**21)])  # type: ignore[arg-type]
        self.admin.token.mint(acct.address, 10**30)
        self.admin.ledger.grant_operator(acct.address)
        self.bind(acct).token.approve(self.admin.ledger.address, 10**30)
        return acct

    def audit_lineage(self) -> dict[int, AdapterLineage]:
        return {i: lineage_from_document(i, d, f"adapter {i} lineage.json") for i, d in self.lineage_docs.items()}


@pytest.fixture(scope="module")
def world(w3: Web3, tmp_path_factory: pytest.TempPathFactory) -> World:
    deployment = deploy_all(w3, dev_account(0), challenge_delay=DELAY, shares=SHARES)
    dep_file = tmp_path_factory.mktemp("audit") / "deployment.json"
    dep_file.write_text(dataclasses.replace(deployment, extra={"rpcUrl": w3.provider.endpoint_uri}).to_json())  # type: ignore[attr-defined]
    admin = Contracts.at(ChainClient(w3, dev_account(0)), deployment.addresses)
    contributors = [dev_account(i) for i in (3, 4, 5)]
    for acct in contributors:
        Contracts.at(ChainClient(w3, acct), deployment.addresses).contributors.register(f"ipfs://{acct.address}")
    curator = Contracts.at(ChainClient(w3, dev_account(8)), deployment.addresses)
    dn = curator.datanets.register_datanet(ROOT, 3, "file://datanet")
    c0, c1, c2 = (a.address for a in contributors)
    lineage = {1: {c0: 100, c1: 300, c2: 50}, 2: {c1: 200, c2: 100}}
    docs: dict[int, dict[str, Any]] = {}
    for k, owner in ((1, 1), (2, 2)):
        tc = {"method": "audit-test", "seed": k, "datanets": [{"name": "dn", "root": ROOT}]}
        docs[k] = {"version": 1, "training_config": tc, "training_config_hash": config_hash(tc),
                   "datanets": [{"name": "dn", "root": ROOT}],
                   "lineage_weights": [{"contributor": a, "tokens": t} for a, t in sorted(lineage[k].items())]}
        c = Contracts.at(ChainClient(w3, dev_account(owner)), deployment.addresses)
        aid = c.adapters.register_adapter(random.Random(k).randbytes(32), b"\x01" * 32, config_hash(tc), [dn],
                                          FEES[k], f"file://adapter{k}")
        assert aid == k
    return World(w3, deployment, dep_file, admin, contributors, lineage, docs)


def make_records(world: World, n: int, start: int, seed: int = 0) -> list[AttributionRecord]:
    rng = random.Random(seed * 1_000_003 + start)
    kinds = [([1], [10_000]), ([2], [10_000]), ([1, 2], [6000, 4000])]
    out = []
    for i in range(start, start + n):
        ids, weights = kinds[i % 3]
        prompt, completion = rng.randint(1, 200), rng.randint(1, 300)
        fees = [FEES[a] for a in ids]
        out.append(AttributionRecord.create(
            request_id=(seed * 10**9 + i).to_bytes(32, "big"), adapter_ids=ids, weights_bps=weights,
            prompt_tokens=prompt, completion_tokens=completion, fee=record_fee(weights, fees, prompt, completion),
            output_hash=rng.randbytes(32), contributors=contributor_weights(ids, weights, fees, world.lineage)))
    return out


def _time_travel(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def _chain(world: World) -> AuditChain:
    return AuditChain(world.bind(Account.create()))


def _honest_settle(world: World, log_: RecordLog, op: LocalAccount, records: list[AttributionRecord]) -> int:
    log_.append_many(records)
    outcome = Settler(log_, world.bind(op)).settle()
    assert outcome is not None
    return outcome.epoch


@dataclass
class Forged:
    operator: LocalAccount
    epoch: int
    data: bytes | None


def forge(world: World, op: LocalAccount, n: int, records: list[AttributionRecord], *,
          previous: dict[Address, int] | None = None, previous_epoch: int = 0,
          amounts: Callable[[dict[Address, int]], dict[Address, int]] | None = None,
          listed: Callable[[list[AttributionRecord]], list[AttributionRecord]] | None = None,
          published: Callable[[bytes], bytes | None] | None = None) -> Forged:
    """Submit epoch `n` of `op` straight through the ledger binding: roots and export hash of the document built
    from `records` (with `amounts` changed by `amounts`, the records listed by `listed`); the bytes published are
    `published(export)`."""
    c = world.bind(op)
    recs = [r.with_epoch(n) for r in records]
    domain = RecordDomain(int(world.w3.eth.chain_id), c.ledger.address, Address(op.address))
    dummy = Settler.__new__(Settler)
    dummy.contracts, dummy.client, dummy.w3, dummy.operator = c, c.ledger.client, world.w3, Address(op.address)
    terms, block = Settler.snapshot_terms(dummy, recs)
    honest = {a: int(v) for a, v in epoch_amounts(recs, terms).items()}
    am = amounts(dict(honest)) if amounts else honest
    prev = previous or {}
    doc = export_document(domain=domain, epoch=n, previous_epoch=previous_epoch,
                          terms=terms_to_json(terms, block, domain), records=recs, previous=prev, amounts=am)
    data = dump_export(doc)
    submitted = doc
    if listed is not None:  # the export lists other records than the roots on chain commit to
        doc2 = export_document(domain=domain, epoch=n, previous_epoch=previous_epoch,
                               terms=terms_to_json(terms, block, domain), records=listed(recs), previous=prev,
                               amounts=am)
        data = dump_export(doc2)
    c.ledger.submit_epoch(n, submitted["records"]["root"], submitted["records"]["count"], submitted["rewards"]["root"],
                          sha256_hex(data), int(submitted["rewards"]["cumulativeTotal"]))
    return Forged(op, n, published(data) if published else data)


def codes(report: AuditReport) -> set[str]:
    return {v.code for v in report.violations}


def test_honest_epochs_pass_and_tampering_is_found_and_revoked_in_time(world: World, tmp_path: Path) -> None:
    w3 = world.w3
    chain = _chain(world)
    lineage = world.audit_lineage()

    # ---- honest: two epochs by the real settler, audited from their canonical exports
    honest_op = world.new_operator()
    log_ = RecordLog.open(tmp_path / "honest.sqlite")
    e1 = _honest_settle(world, log_, honest_op, make_records(world, 40, 0, seed=1))
    e2 = _honest_settle(world, log_, honest_op, make_records(world, 30, 40, seed=1))
    exports = {(honest_op.address, e): canonical_export(log_, e) for e in (e1, e2)}
    for e in (e1, e2):
        info = chain.epoch(honest_op.address, e)
        assert sha256_hex(exports[(honest_op.address, e)]) == info.export_hash
        rep = audit_epoch(chain, honest_op.address, e, exports[(honest_op.address, e)], lineage=lineage,
                          previous_data=exports.get((honest_op.address, e - 1)))
        assert rep.ok, rep.lines()
        assert rep.records == (40 if e == 1 else 30)
        assert not rep.notes

    # ---- forged epochs, one tampering each, each from its own operator key
    recs = make_records(world, 24, 1000, seed=2)
    forged: dict[str, Forged] = {}

    def inflate_operator(am: dict[Address, int]) -> dict[Address, int]:
        victim = next(a for a in am if a != operator_of["inflated"].address and am[a] > 10)
        am[victim] -= 10
        am[Address(operator_of["inflated"].address)] = am.get(Address(operator_of["inflated"].address), 0) + 10
        return am

    operator_of = {k: world.new_operator() for k in ("inflated", "fee", "dropped", "added", "lineage", "hash",
                                                      "unpublished")}
    forged["inflated"] = forge(world, operator_of["inflated"], 1, recs, amounts=inflate_operator)
    bad_fee = [dataclasses.replace(recs[0], fee=recs[0].fee + 7), *recs[1:]]
    forged["fee"] = forge(world, operator_of["fee"], 1, bad_fee)
    forged["dropped"] = forge(world, operator_of["dropped"], 1, recs, listed=lambda rs: rs[:-1])
    extra = make_records(world, 1, 5000, seed=3)[0].with_epoch(1)
    forged["added"] = forge(world, operator_of["added"], 1, recs, listed=lambda rs: [*rs, extra])
    c0 = world.contributors[0].address
    skewed = [AttributionRecord.create(
        request_id=r.request_id, adapter_ids=r.adapter_ids, weights_bps=r.weights_bps, prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens, fee=r.fee, output_hash=r.output_hash,
        contributors=[(a, w * 3 if a == c0 else w) for a, w in r.contributors]) for r in recs]
    forged["lineage"] = forge(world, operator_of["lineage"], 1, skewed)
    forged["hash"] = forge(world, operator_of["hash"], 1, recs,
                           published=lambda b: b.replace(b'"epoch":1,', b'"epoch":1 ,', 1))
    forged["unpublished"] = forge(world, operator_of["unpublished"], 1, recs, published=lambda b: None)

    # one account lowered: a stolen key of the honest operator submits epoch 3 on top of the node's epoch 2,
    # listing the victim's previous amount lower and handing the difference to the operator
    prev2 = {Address(a): int(v) for a, v in json.loads(exports[(honest_op.address, e2)])["rewards"]["previous"]}
    cum2 = {Address(account): int(cumulative)
            for account, _, cumulative, _ in json.loads(exports[(honest_op.address, e2)])["rewards"]["entries"]}
    victim = Address(world.contributors[1].address)
    cut = cum2[victim] // 2
    assert cut > 1000 and prev2
    lowered = dict(cum2)
    lowered[victim] -= cut
    lowered[Address(honest_op.address)] = lowered.get(Address(honest_op.address), 0) + cut
    forged["lowered"] = forge(world, honest_op, 3, make_records(world, 6, 2000, seed=4), previous=lowered,
                              previous_epoch=e2)

    # ---- the audit names each tampering
    expect = {"inflated": {"amounts"}, "fee": {"fee"}, "dropped": {"records"}, "added": {"records"},
              "lineage": {"lineage"}, "hash": {"hash", "export"}, "unpublished": {"export"},
              "lowered": {"previous", "decrease"}}
    for name, f in forged.items():
        prev_data = exports.get((f.operator.address, f.epoch - 1))
        rep = audit_epoch(chain, f.operator.address, f.epoch, f.data, lineage=lineage, previous_data=prev_data)
        assert not rep.ok, name
        assert expect[name] <= codes(rep), (name, rep.lines())
    lines = {name: "\n".join(audit_epoch(chain, f.operator.address, f.epoch, f.data, lineage=lineage,
                                         previous_data=exports.get((f.operator.address, f.epoch - 1))).lines())
             for name, f in forged.items()}
    assert f"[decrease] account {victim}: cumulative amount falls from {cum2[victim]}" in lines["lowered"]
    assert f"record {bad_fee[0].request_id}" in lines["fee"] and "difference 7" in lines["fee"]
    assert "difference -10" in lines["inflated"] and "difference 10" in lines["inflated"]
    assert "records, the chain says 24" in lines["dropped"] and "25 records" in lines["added"]
    assert f"{c0} has weight" in lines["lineage"]
    assert "exportHash" in lines["hash"]
    assert "not published" in lines["unpublished"]

    # ---- the watcher, as a guardian: audits each as it lands, revokes the failing ones during the delay
    published = dict(exports)
    for f in forged.values():
        if f.data is not None:
            published[(f.operator.address, f.epoch)] = f.data
    ops = sorted({honest_op.address, *(f.operator.address for f in forged.values())})
    watched: list[str] = []
    state = tmp_path / "watch.json"
    watcher = Watcher(chain, world.admin, ops, lambda op, n: published.get((op, n)), state,
                      WatchOptions(grace=GRACE, lineage=lineage), emit=watched.append)
    watcher.step()
    for name, f in forged.items():
        revoked = world.admin.ledger.is_revoked(f.operator.address, f.epoch)
        assert revoked == (name != "unpublished"), (name, watched)
    assert not world.admin.ledger.is_revoked(honest_op.address, e2)
    assert world.admin.ledger.live_tip(honest_op.address) == e2

    # a restart keeps its verdicts (no double work); the unpublished export fails once the grace has passed,
    # still inside the delay
    watcher2 = Watcher(chain, world.admin, ops, lambda op, n: published.get((op, n)), state,
                       WatchOptions(grace=GRACE, lineage=lineage), emit=watched.append)
    assert watcher2.step() == []
    _time_travel(w3, GRACE + 5)
    done = watcher2.step()
    un = forged["unpublished"]
    assert done == [(Address(un.operator.address), 1, "revoked")]
    assert world.admin.ledger.is_revoked(un.operator.address, 1)
    assert chain.now() < chain.epoch(un.operator.address, 1).effective_at
    saved = json.loads(state.read_text())
    assert saved["operators"][honest_op.address]["verdicts"]["1"]["action"] == "passed"
    assert saved["operators"][honest_op.address]["verdicts"]["3"]["action"] == "revoked"

    # ---- the honest node goes on: the revoked foreign epoch 3 is skipped, its own next epoch lands as 4 on top
    # of epoch 2, passes the audit, and after the delay every account is owed exactly the honest sums
    e4 = _honest_settle(world, log_, honest_op, make_records(world, 12, 70, seed=1))
    assert e4 == 4
    ex4 = canonical_export(log_, e4)
    rep = audit_epoch(chain, honest_op.address, e4, ex4, lineage=lineage, previous_data=exports[(honest_op.address, e2)])
    assert rep.ok, rep.lines()
    _time_travel(w3, DELAY + 1)
    assert world.admin.ledger.root_in_effect(honest_op.address).epoch == e4
    c = world.bind(honest_op)
    owed: dict[str, int] = {}
    for e in (1, 2, 4):
        t, _ = Settler(log_, c).snapshot_terms(log_.records_of_epoch(e))
        for a, v in epoch_amounts(log_.records_of_epoch(e), t).items():
            owed[a] = owed.get(a, 0) + int(v)
    final = {account: int(cumulative) for account, _, cumulative, _ in json.loads(ex4)["rewards"]["entries"]}
    assert {a: v for a, v in final.items() if v} == {a: v for a, v in owed.items() if v}
    log_.close()


def test_cli_audit_pass_fail_json_and_refusals(world: World, tmp_path: Path) -> None:
    op = world.new_operator()
    log_ = RecordLog.open(tmp_path / "cli.sqlite")
    n = _honest_settle(world, log_, op, make_records(world, 9, 0, seed=7))
    good = tmp_path / "exports"
    good.mkdir()
    (good / f"epoch-{n}.json").write_bytes(canonical_export(log_, n))
    log_.close()
    lin = tmp_path / "lineage1.json"
    lin.write_text(json.dumps(world.lineage_docs[1]))
    base = [sys.executable, "-m", "loraledger.node.cli", "audit", "--deployment", str(world.deployment_file),
            "--operator", op.address]
    ok = subprocess.run([*base, "--epoch", str(n), "--export", str(good), "--lineage", f"1={lin}"],
                        check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"epoch {n}: PASS (9 records" in ok.stdout
    assert "no lineage document for adapters [2]" in ok.stdout

    bad = tmp_path / "bad.json"
    doc = json.loads((good / f"epoch-{n}.json").read_bytes())
    doc["records"]["entries"][2], doc["records"]["entries"][3] = doc["records"]["entries"][3], doc["records"]["entries"][2]
    bad.write_bytes(dump_export(doc))
    out = subprocess.run([*base, "--all", "--export", str(bad), "--json"], check=False, capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    verdict = json.loads(out.stdout)
    assert verdict["ok"] is False
    msgs = [v["message"] for v in verdict["epochs"][0]["violations"]]
    assert any("records.entries[3] (bytes" in m and "reordered" in m for m in msgs), msgs

    other = subprocess.run([sys.executable, "-m", "loraledger.node.cli", "audit", "--deployment",
                            str(world.deployment_file), "--operator", world.contributors[0].address],
                           check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert other.returncode == 2 and "has no epoch" in other.stderr


def test_grouped_amounts_equal_the_nodes_epoch_amounts() -> None:
    """The audit's `epoch_amounts_grouped` (each distinct record split once, times its count) gives exactly
    `rewards.epoch_amounts`, with repeated and distinct records, inactive contributors and rotated payouts."""
    from loraledger.node.ledger.audit import epoch_amounts_grouped
    from loraledger.node.ledger.rewards import epoch_amounts
    from loraledger.node.ledger.terms import AdapterTerms, ContributorStatus, EpochTerms, Shares
    from loraledger.node.types import AdapterId, as_address

    rng = random.Random(5)
    people = [as_address(f"0x{0x1000 + k:040x}") for k in range(9)]
    operator = as_address("0x" + "cd" * 20)
    terms = EpochTerms(Shares(*SHARES), operator,
                       {AdapterId(1): AdapterTerms(people[0], 7), AdapterId(2): AdapterTerms(people[1], 13)},
                       {p: ContributorStatus(people[(k + 3) % 9] if k % 4 == 0 else p, k % 3 != 1)
                        for k, p in enumerate(people)})
    lineage = {1: {p: rng.randint(1, 900) for p in people[:5]}, 2: {p: rng.randint(1, 900) for p in people[3:]}}
    kinds = [([1], [10_000]), ([2], [10_000]), ([1, 2], [3333, 6667])]
    records = []
    for i in range(600):
        ids, weights = kinds[i % 3]
        fees = [FEES[a] for a in ids]
        tokens = rng.choice([5, 17, 333]) if i % 2 else rng.randint(1, 10_000)  # half repeat, half mostly distinct
        contributors = (contributor_weights(ids, weights, fees, lineage) if i % 5 else
                        {p: rng.randint(1, 10**6) for p in rng.sample(people, 4)})
        records.append(AttributionRecord.create(
            request_id=rng.randbytes(32), adapter_ids=ids, weights_bps=weights, prompt_tokens=tokens,
            completion_tokens=0, fee=record_fee(weights, fees, tokens, 0), output_hash=rng.randbytes(32),
            contributors=contributors, epoch=1))
    want = {a: int(v) for a, v in epoch_amounts(records, terms).items()}
    assert epoch_amounts_grouped(records, terms) == want
    assert sum(want.values()) == sum(int(r.fee) for r in records)
    assert epoch_amounts_grouped(records[:1], terms) == {a: int(v) for a, v in epoch_amounts(records[:1],
                                                                                              terms).items()}
