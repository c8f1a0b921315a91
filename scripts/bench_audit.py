"""Benchmark: `loraledger audit` of one large epoch on a real anvil.

An operator submits an honest epoch of N records (default 100,000; 200 contributors, 3 adapters, one- and
two-adapter records); the audit then parses and checks its canonical export against the chain
(`loraledger.node.ledger.audit.audit_epoch`, with every adapter's lineage, so each record's contributor split
is checked too). Reported: audit seconds (and the part of it `parse_export` takes, timed again on its own),
records/s, export bytes per record, and the ratio of the audit to the baseline measured in the same run: the
operator's own build of the same epoch (terms snapshot, amounts, records and rewards trees and the export's
serialisation), i.e. what the settler does once.

By default each adapter combination's records share one contributor list (lineage-derived weights, the
node's default), which the export lists once; `--token-level` gives every record a list of its own (random
weights over its adapters' lineage contributors, as token-level attribution would), the worst case for the
export's size and the audit's list checks, audited with `token_level=True`.

    .venv/bin/python scripts/bench_audit.py [--records 100000] [--token-level] [--out benchmarks/results/audit.json]

Targets: under 30 s on the 2-core CI machine, 10 s the goal.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from eth_account import Account
from web3 import Web3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import deploy_all
from loraledger.node.chain.devnet import Anvil
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.audit import AdapterLineage, AuditChain, audit_epoch
from loraledger.node.ledger.export import (
    EXPORT_FORMAT,
    dump_export,
    export_document,
    parse_export,
    sha256_hex,
)
from loraledger.node.ledger.records import AttributionRecord, RecordDomain
from loraledger.node.ledger.rewards import contributor_weights, epoch_amounts, record_fee
from loraledger.node.ledger.settler import Settler
from loraledger.node.ledger.terms import terms_to_json
from loraledger.node.types import Address, as_address

FEES = {1: 7, 2: 13, 3: 5}


def make_records(n: int, contributors: list[str], per_adapter: int, token_level: bool
                 ) -> tuple[list[AttributionRecord], dict[int, dict[str, int]]]:
    """n records of epoch 1 and the adapters' lineage ({adapter: {contributor: tokens}}) they follow."""
    rng = random.Random(7)
    lineage = {a: {c: rng.randint(1, 1000) for c in rng.sample(contributors, per_adapter)} for a in FEES}
    kinds = [([1], [10_000]), ([2], [10_000]), ([3], [10_000]), ([1, 2], [6000, 4000])]
    split: dict[int, dict[str, int]] = {}  # lineage weights depend on the adapter combination only
    out = []
    for i in range(n):
        k = i % len(kinds)
        ids, weights = kinds[k]
        prompt, completion = rng.randint(1, 500), rng.randint(1, 500)
        fees = [FEES[a] for a in ids]
        if token_level:
            contributors_of = {c: rng.randint(1, 10**6) for a in ids for c in lineage[a]}
        else:
            if k not in split:
                split[k] = contributor_weights(ids, weights, fees, lineage)
            contributors_of = split[k]
        out.append(AttributionRecord.create(
            request_id=i.to_bytes(32, "big"), adapter_ids=ids, weights_bps=weights, prompt_tokens=prompt,
            completion_tokens=completion, fee=record_fee(weights, fees, prompt, completion),
            output_hash=rng.randbytes(32), contributors=contributors_of, epoch=1))
    return out, lineage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--contributors", type=int, default=200)
    ap.add_argument("--per-adapter", type=int, default=5, help="contributors in each adapter's lineage")
    ap.add_argument("--token-level", action="store_true", help="a contributor list of its own for every record")
    ap.add_argument("--out", default="benchmarks/results/audit.json")
    ap.add_argument("--profile", action="store_true",
                    help="print the audit's top functions (cProfile, by own time) after the timed run")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the unregistered contributors' warnings, one per account
    with tempfile.TemporaryDirectory() as d, Anvil(Path(d) / "anvil") as node:
        w3 = Web3(Web3.HTTPProvider(node.rpc_url, request_kwargs={"timeout": 120}))
        dep = deploy_all(w3, dev_account(0), challenge_delay=3600)
        admin = Contracts.at(ChainClient(w3, dev_account(0)), dep.addresses)
        contributors = [Account.create() for _ in range(args.contributors)]
        for acct in contributors[:20]:  # some registered (paid), the rest not (their share goes to the others)
            w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**20)])  # type: ignore[arg-type]
            Contracts.at(ChainClient(w3, acct), dep.addresses).contributors.register("bench")
        dn = Contracts.at(ChainClient(w3, dev_account(8)), dep.addresses).datanets.register_datanet(
            "0x" + "11" * 32, 4, "bench")
        for k, fee in FEES.items():
            Contracts.at(ChainClient(w3, dev_account(k)), dep.addresses).adapters.register_adapter(
                "0x" + bytes([k]).hex() * 32, "0x" + "01" * 32, "0x" + "02" * 32, [dn], fee, "bench")
        op = dev_account(0)
        admin.token.mint(op.address, 10**30)
        admin.token.approve(admin.ledger.address, 10**30)
        t = time.perf_counter()
        records, lineage = make_records(args.records, [c.address for c in contributors], args.per_adapter,
                                        args.token_level)
        audit_lineage = {a: AdapterLineage(a, {as_address(c): t for c, t in w.items()}, None, (), f"adapter {a}")
                         for a, w in lineage.items()}
        gen_s = time.perf_counter() - t

        # baseline: the operator's own build of the epoch (terms snapshot, amounts, both trees, the export bytes)
        domain = RecordDomain(int(w3.eth.chain_id), admin.ledger.address, as_address(op.address))
        t = time.perf_counter()
        settler = Settler.__new__(Settler)
        settler.contracts, settler.client, settler.w3 = admin, admin.ledger.client, w3
        settler.operator = Address(op.address)
        terms, block = Settler.snapshot_terms(settler, records)
        amounts = epoch_amounts(records, terms)
        t_export = time.perf_counter()
        doc = export_document(domain=domain, epoch=1, previous_epoch=0, terms=terms_to_json(terms, block, domain),
                              records=records, previous={}, amounts=amounts)
        data = dump_export(doc)
        build_s = time.perf_counter() - t
        export_s = time.perf_counter() - t_export
        admin.ledger.submit_epoch(1, doc["records"]["root"], len(records), doc["rewards"]["root"], sha256_hex(data),
                                  int(doc["rewards"]["cumulativeTotal"]))
        del doc

        chain = AuditChain(Contracts.at(ChainClient(w3, Account.create()), dep.addresses))
        t = time.perf_counter()
        report = audit_epoch(chain, op.address, 1, data, lineage=audit_lineage, token_level=args.token_level)
        audit_s = time.perf_counter() - t
        assert report.ok, report.lines()[:5]
        assert not report.notes, report.notes  # every record's split was checked against its lineage
        t = time.perf_counter()
        parse_export(data, domain=domain, epoch=1)
        parse_s = time.perf_counter() - t
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(audit_epoch, chain, op.address, 1, data, lineage=audit_lineage,
                         token_level=args.token_level)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    result = {
        "benchmark": "audit",
        "machine": machine_info(),
        "records": args.records,
        "contributors": args.contributors,
        "contributors_per_adapter": args.per_adapter,
        "token_level": args.token_level,
        "export_format": EXPORT_FORMAT,
        "export_bytes": len(data),
        "export_bytes_per_record": round(len(data) / args.records, 1),
        "record_generation_s": round(gen_s, 3),
        "baseline_operator_build_s": round(build_s, 3),
        "operator_export_s": round(export_s, 3),
        "audit_s": round(audit_s, 3),
        "audit_records_per_s": round(args.records / audit_s),
        "parse_export_s": round(parse_s, 3),
        "audit_over_build": round(audit_s / build_s, 3),
        "target_s": 30.0,
        "goal_s": 10.0,
        "meets_target": audit_s < 30.0,
        "meets_goal": audit_s < 10.0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
