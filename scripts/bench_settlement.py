"""Benchmark settlement on this machine: record-log appends, tree builds, gas per epoch and per claim.

    python scripts/bench_settlement.py                                   # 1M-record tree, 1k / 100k-record epochs
    python scripts/bench_settlement.py --tree-records 100000 --epoch-sizes 1000,10000   # quicker

1. appends/s to the SQLite record log in WAL mode, synchronous=FULL (fsync per group commit: survives power
   loss) and NORMAL (survives kill -9, fsync at checkpoints), from --writers threads each calling `append`
   (group commit), from one thread handing records over with `append_async` and awaiting each (the engine's
   completion loop), and from one thread calling `append_many` in batches of 1000;
2. time to build the records tree for --tree-records records and the rewards tree for as many accounts
   (--reward-accounts, default the same; one core): wall seconds, and this process's CPU seconds (closer to
   the one-core figure when other jobs share the machine);
3. gas of `submitEpoch` for each --epoch-sizes record count (on a fresh anvil + deployment; flat by design);
4. gas of `claim`: the operator's first claim ever (`claim_gas_first`), another account's first claim
   (`claim_gas`), and a repeat claim of the increase after one more epoch (`claim_gas_repeat`); each of these
   accounts holds no reward token before its first claim, so a first claim also pays for two fresh storage slots
   (its claimed-so-far in the ledger, its balance in the token); then `claimMany` per account.

Writes JSON to benchmarks/results/settlement_cpu.json (or --out), with the machine named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import threading
import time
from pathlib import Path

from benchlib import machine_info  # scripts/benchlib.py, beside this script
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from eth_utils import to_checksum_address
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import deploy_all
from loraledger.node.chain.devnet import Anvil
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.claims import claim, proofs_from_epoch_file, push_claims
from loraledger.node.ledger.epochs import export_epoch
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord, RecordDomain, records_tree
from loraledger.node.ledger.rewards import rewards_tree
from loraledger.node.ledger.settler import Settler
from loraledger.node.types import Address, Bytes32, Wei

CONTRIBUTORS = [dev_account(i) for i in (3, 4, 5, 6)]


def make_records(n: int, start: int = 0, adapters: tuple[int, ...] = (1, 2)) -> list[AttributionRecord]:
    """n records alternating over the adapters, 4 contributors each, fee = 5 per token (one validated template
    per adapter, then only request id, tokens, fee and output hash vary)."""
    rng = random.Random(start)
    contribs = {a.address: rng.randint(1, 10**18) for a in CONTRIBUTORS}
    templates = [AttributionRecord.create(request_id=b"\x00" * 32, adapter_ids=[a], weights_bps=[10_000],
                                          prompt_tokens=1, completion_tokens=1, fee=10, output_hash=b"\x00" * 32,
                                          contributors=contribs) for a in adapters]
    out = []
    for i in range(start, start + n):
        tokens = rng.randint(10, 500)
        out.append(dataclasses.replace(
            templates[i % len(adapters)], request_id=Bytes32("0x" + i.to_bytes(32, "big").hex()),
            prompt_tokens=tokens, completion_tokens=tokens, fee=Wei(5 * 2 * tokens),
            output_hash=Bytes32("0x" + rng.randbytes(32).hex())))
    return out


def bench_appends(writers: int, per_writer: int, synchronous: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        records = make_records(writers * per_writer + 30_000)
        with RecordLog.open(Path(d) / "log.sqlite", synchronous=synchronous) as log_:
            def worker(k: int) -> None:
                for r in records[k * per_writer:(k + 1) * per_writer]:
                    log_.append(r)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(writers)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            n = writers * per_writer
            commits = log_.commits
            rest = records[n:]
            # the engine's completion loop: hand each record over as it finishes, await durability per record
            t1 = time.perf_counter()
            futures = [log_.append_async(r) for r in rest[:10_000]]
            for f in futures:
                f.result()
            dt_async = time.perf_counter() - t1
            rest = rest[10_000:]
            t1 = time.perf_counter()
            for i in range(0, len(rest), 1000):
                log_.append_many(rest[i:i + 1000])
            dt_batch = time.perf_counter() - t1
            assert log_.record_count() == len(records)
    return {"synchronous": synchronous, "writers": writers, "records": n, "seconds": dt, "records_per_s": n / dt, "commits": commits,
            "mean_group_size": n / max(1, commits), "append_async_records_per_s": 10_000 / dt_async,
            "append_many_records": len(rest),
            "append_many_records_per_s": len(rest) / dt_batch}


def bench_trees(n: int, n_accounts: int) -> dict[str, float]:
    t0 = time.perf_counter()
    records = [r.with_epoch(1) for r in make_records(n)]
    gen = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    tree = records_tree(records, RecordDomain(31337, "0x" + "5f" * 20, "0x" + "6e" * 20))
    dt_records, cpu_records = time.perf_counter() - t1, time.process_time() - c1
    assert len(tree) == n
    del records, tree
    rng = random.Random(7)
    accounts = {Address(to_checksum_address(rng.randbytes(20))): rng.randint(1, 10**24) for _ in range(n_accounts)}
    t2, c2 = time.perf_counter(), time.process_time()
    rtree = rewards_tree(accounts, Address(CONTRIBUTORS[0].address))
    dt_rewards, cpu_rewards = time.perf_counter() - t2, time.process_time() - c2
    assert len(rtree) >= len(accounts)
    return {"records": n, "records_tree_s": dt_records, "records_tree_cpu_s": cpu_records,
            "record_generation_s": gen, "rewards_accounts": len(accounts), "rewards_tree_s": dt_rewards,
            "rewards_tree_cpu_s": cpu_rewards}


def bench_gas(epoch_sizes: list[int]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d, Anvil(Path(d) / "anvil") as node:
        w3 = Web3(Web3.HTTPProvider(node.rpc_url, request_kwargs={"timeout": 120}))
        dep = deploy_all(w3, dev_account(0))
        admin = Contracts.at(ChainClient(w3, dev_account(0)), dep.addresses)
        for acct in CONTRIBUTORS:
            Contracts.at(ChainClient(w3, acct), dep.addresses).contributors.register("bench")
        dn = Contracts.at(ChainClient(w3, dev_account(8)), dep.addresses).datanets.register_datanet(
            "0x" + "11" * 32, 4, "bench")
        for k in (1, 2):
            Contracts.at(ChainClient(w3, dev_account(k)), dep.addresses).adapters.register_adapter(
                "0x" + bytes([k]).hex() * 32, "0x" + "01" * 32, "0x" + "02" * 32, [dn], 5, "bench")
        epochs: list[dict[str, object]] = []
        op = dev_account(0)
        admin.token.mint(op.address, 10**30)
        with RecordLog.open(Path(d) / "log.sqlite", synchronous="NORMAL") as log_:
            settler = Settler(log_, admin)
            start = 0
            for size in [10, *epoch_sizes]:  # the first epoch of an operator writes fresh slots: a warm-up
                log_.append_many(make_records(size, start))
                start += size
                t0 = time.perf_counter()
                outcome = settler.settle()
                dt = time.perf_counter() - t0
                assert outcome is not None and outcome.tx_hash is not None
                gas = int(w3.eth.get_transaction_receipt(HexStr(outcome.tx_hash))["gasUsed"])
                epochs.append({"records": size, "submitEpoch_gas": gas, "settle_seconds": dt,
                               "first_epoch_warmup": len(epochs) == 0})
            def claim_gas(acct: LocalAccount, epoch: int) -> int:
                proofs = proofs_from_epoch_file(export_epoch(log_, epoch, Path(d) / f"epoch{epoch}.json"))
                one = claim(Contracts.at(ChainClient(w3, acct), dep.addresses).ledger,
                            next(p for p in proofs if p.account == acct.address))
                assert one.tx_hash is not None
                return int(w3.eth.get_transaction_receipt(HexStr(one.tx_hash))["gasUsed"])

            last = len(epochs)
            first = claim_gas(CONTRIBUTORS[0], last)  # the operator's first claim ever
            typical = claim_gas(CONTRIBUTORS[1], last)  # another account's first claim
            log_.append_many(make_records(10, start))  # one more epoch: every cumulative amount grows
            assert settler.settle() is not None
            repeat = claim_gas(CONTRIBUTORS[0], last + 1)  # the first account claims its increase
            pushed = push_claims(admin.ledger, proofs_from_epoch_file(Path(d) / f"epoch{last + 1}.json"))
            many_gas = sum(pushed.gas_used)
    return {"epochs": epochs, "claim_gas_first": first, "claim_gas": typical, "claim_gas_repeat": repeat,
            "claimMany_accounts": len(pushed.paid), "claimMany_gas_total": many_gas,
            "claimMany_gas_per_account": many_gas / max(1, len(pushed.paid))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writers", type=int, default=128, help="concurrent appending threads (default 128)")
    p.add_argument("--per-writer", type=int, default=250, help="records each writer appends (default 250)")
    p.add_argument("--tree-records", type=int, default=1_000_000, help="records in the tree benchmark (default 1M)")
    p.add_argument("--reward-accounts", type=int, default=None,
                   help="accounts in the rewards-tree benchmark (default: as many as --tree-records)")
    p.add_argument("--epoch-sizes", default="1000,100000", help="records per settled epoch (default 1000,100000)")
    p.add_argument("--out", default="benchmarks/results/settlement_cpu.json")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. what changed)")
    args = p.parse_args()
    result: dict[str, object] = {"machine": machine_info(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result["append"] = [bench_appends(args.writers, args.per_writer, sync) for sync in ("FULL", "NORMAL")]
    print(json.dumps(result["append"]), flush=True)
    accounts = args.tree_records if args.reward_accounts is None else args.reward_accounts
    result["trees"] = bench_trees(args.tree_records, accounts)
    print(json.dumps(result["trees"]), flush=True)
    result["gas"] = bench_gas([int(x) for x in args.epoch_sizes.split(",") if x])
    print(json.dumps(result["gas"]), flush=True)
    result["targets"] = {"append_records_per_s": 50_000, "tree_1m_seconds": 10, "claim_gas": 90_000}
    if args.note:
        result["note"] = args.note
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
