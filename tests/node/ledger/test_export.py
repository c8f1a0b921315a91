"""The canonical epoch export without a chain: the same log gives the same bytes; the parser accepts it and names
the byte range, entry and field of a truncated, reordered, reformatted or forged export, and refuses an export
of another chain, ledger, operator or epoch by name."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from loraledger.node.ledger.export import (
    ExportError,
    canonical_export,
    chunks,
    dump_export,
    export_document,
    export_sha256,
    parse_export,
)
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.records import AttributionRecord, RecordDomain, records_tree
from loraledger.node.ledger.rewards import add_cumulative, epoch_amounts, rewards_tree
from loraledger.node.ledger.terms import AdapterTerms, ContributorStatus, EpochTerms, Shares, terms_to_json
from loraledger.node.types import AdapterId, Address, Bytes32, as_address

OPERATOR = as_address("0x" + "ab" * 20)
DOMAIN = RecordDomain(31337, as_address("0x" + "11" * 20), as_address("0x" + "cd" * 20))
CONTRIBUTORS = [as_address(f"0x{i:040x}") for i in (0x1111, 0x2222, 0x3333)]


def _records(n: int, epoch: int, seed: int = 0) -> list[AttributionRecord]:
    rng = random.Random(seed)
    return [AttributionRecord.create(
        request_id=rng.randbytes(32), adapter_ids=[1], weights_bps=[10_000], prompt_tokens=rng.randint(1, 50),
        completion_tokens=rng.randint(1, 50), fee=rng.randint(1, 10_000), output_hash=rng.randbytes(32),
        contributors=[(c, rng.randint(1, 100)) for c in CONTRIBUTORS], epoch=epoch) for _ in range(n)]


def _terms() -> EpochTerms:
    return EpochTerms(Shares(6000, 2500, 1500), DOMAIN.operator,
                      {AdapterId(1): AdapterTerms(as_address("0x" + "0a" * 20), 3)},
                      {c: ContributorStatus(c, True) for c in CONTRIBUTORS})


def _built_log(path: Path, n_records: int = 12) -> RecordLog:
    """A log holding built epochs 1 and 2, built the way the settler builds them (without a chain)."""
    log_ = RecordLog.open(path)
    terms = _terms()
    previous: dict[Address, int] = {}
    for e in (1, 2):
        log_.append_many(_records(n_records, 0, seed=e))
        n = log_.close_epoch()
        assert n == e
        recs = log_.records_of_epoch(n)
        amounts = epoch_amounts(recs, terms)
        cumulative = add_cumulative(previous, amounts)
        wtree = rewards_tree(cumulative, DOMAIN.operator)
        log_.mark_built(n, records_root=Bytes32(records_tree(recs, DOMAIN).root_hex),
                        rewards_root=Bytes32(wtree.root_hex), cumulative_total=sum(v for _, v in wtree.values),
                        terms=terms_to_json(terms, 100 + e, DOMAIN), amounts=amounts, cumulative=cumulative)
        log_.mark_confirmed(n, block_number=100 + e)
        previous = dict(cumulative)
    return log_


def test_export_is_reproducible_and_parses(tmp_path: Path) -> None:
    log_ = _built_log(tmp_path / "a.sqlite")
    data = canonical_export(log_, 2)
    assert canonical_export(log_, 2) == data
    assert export_sha256(log_, 2) == "0x" + hashlib.sha256(data).hexdigest()
    ex = parse_export(data, domain=DOMAIN, epoch=2)
    assert ex.previous_epoch == 1 and ex.record_count == 12
    assert ex.previous == {a: int(v) for a, v in log_.cumulative_balances(1).items() if v}
    assert ex.cumulative_total - ex.previous_total == ex.fees_total == sum(int(r.fee) for r in ex.records)
    assert ex.terms["block"] == 102
    # the same records appended in another order give the same bytes (the export lists them by leaf)
    other = RecordLog.open(tmp_path / "b.sqlite")
    terms = _terms()
    recs = list(reversed(_records(12, 0, seed=1)))
    other.append_many(recs)
    assert other.close_epoch() == 1
    rr = other.records_of_epoch(1)
    amounts = epoch_amounts(rr, terms)
    wtree = rewards_tree(amounts, DOMAIN.operator)
    other.mark_built(1, records_root=Bytes32(records_tree(rr, DOMAIN).root_hex), rewards_root=Bytes32(wtree.root_hex),
                     cumulative_total=sum(v for _, v in wtree.values), terms=terms_to_json(terms, 101, DOMAIN),
                     amounts=amounts, cumulative=dict(amounts))
    assert canonical_export(other, 1) == canonical_export(log_, 1)
    assert b"".join(chunks(data, 1000)) == data and len(chunks(data, 1000)) == -(-len(data) // 1000)
    log_.close()
    other.close()


def _doc(data: bytes) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(data)
    return d


def test_bad_exports_get_precise_errors(tmp_path: Path) -> None:
    log_ = _built_log(tmp_path / "a.sqlite")
    data = canonical_export(log_, 2)
    log_.close()

    with pytest.raises(ExportError, match=rf"truncated: its JSON ends at byte {len(data) - 7}"):
        parse_export(data[:-7])
    with pytest.raises(ExportError, match="empty"):
        parse_export(b"")

    d = _doc(data)
    d["records"]["entries"][4], d["records"]["entries"][5] = d["records"]["entries"][5], d["records"]["entries"][4]
    with pytest.raises(ExportError, match=r"records\.entries\[5\] \(bytes \d+-\d+\): leaf 0x[0-9a-f]{64} is not above "
                                          r"the previous .*reordered"):
        parse_export(dump_export(d))

    d = _doc(data)
    rec = d["records"]["entries"][3]["record"]
    rec["fee"] = str(int(rec["fee"]) + 1)
    with pytest.raises(ExportError, match=rf"records\.entries\[3\]\.leaf \(bytes \d+-\d+\): record {rec['requestId']}: "
                                          r"its fields hash to leaf"):
        parse_export(dump_export(d))

    d = _doc(data)
    d["records"]["entries"][1]["record"]["contributors"][0][1] = "999"
    with pytest.raises(ExportError, match=r"records\.entries\[1\]\.record \(bytes .*does not commit to its "
                                          r"contributor list"):
        parse_export(dump_export(d))

    d = _doc(data)
    d["records"]["entries"][0]["proof"][0] = "0x" + "00" * 32
    with pytest.raises(ExportError, match=r"records\.entries\[0\]\.proof .*does not lead to the records root"):
        parse_export(dump_export(d))

    d = _doc(data)
    d["rewards"]["entries"][0]["cumulative"] = str(int(d["rewards"]["entries"][0]["cumulative"]) + 5)
    with pytest.raises(ExportError, match=r"rewards\.entries\[0\]\.leaf .*hashes to leaf"):
        parse_export(dump_export(d))

    d = _doc(data)
    d["records"]["count"] += 1
    with pytest.raises(ExportError, match=r"records\.count \(bytes \d+-\d+\): says 13 records, the export lists 12"):
        parse_export(dump_export(d))

    spaced = data.replace(b'"epoch":2,', b'"epoch": 2,', 1)
    with pytest.raises(ExportError, match=r"byte \d+: the export is not in canonical form .* near epoch \(bytes"):
        parse_export(spaced)
    with pytest.raises(ExportError, match=r"byte \d+ \(0xff\) is not ASCII"):
        parse_export(data[:100] + b"\xff" + data[101:])

    # another stream or epoch, refused by name
    for other, name in ((RecordDomain(1, DOMAIN.ledger, DOMAIN.operator), "chain 31337, not chain 1"),
                        (RecordDomain(31337, as_address("0x" + "22" * 20), DOMAIN.operator), f"ledger {DOMAIN.ledger}"),
                        (RecordDomain(31337, DOMAIN.ledger, OPERATOR), f"operator {DOMAIN.operator}, not operator")):
        with pytest.raises(ExportError, match=name):
            parse_export(data, domain=other)
    with pytest.raises(ExportError, match="this export is of epoch 2, not epoch 3"):
        parse_export(data, domain=DOMAIN, epoch=3)


def test_export_document_of_forged_parts_is_self_consistent() -> None:
    recs = _records(5, 1, seed=9)
    terms = _terms()
    doc = export_document(domain=DOMAIN, epoch=1, previous_epoch=0, terms=terms_to_json(terms, 7, DOMAIN),
                          records=recs, previous={}, amounts=epoch_amounts(recs, terms))
    ex = parse_export(dump_export(doc), domain=DOMAIN, epoch=1)
    assert ex.records_root == records_tree(recs, DOMAIN).root_hex
    assert sum(ex.amounts.values()) == ex.fees_total


def test_grpc_stream_and_cli_write_the_same_bytes(tmp_path: Path) -> None:
    import asyncio
    import subprocess
    import sys

    import grpc

    from loraledger.node.ledger.audit import fetch_grpc
    from loraledger.node.serving.queries import LogQueries
    from loraledger.node.serving.servicers import AttributionServicer
    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    log_ = _built_log(tmp_path / "a.sqlite", n_records=40)
    data = canonical_export(log_, 2)

    async def serve_and_fetch() -> tuple[bytes, list[int], bytes | None, grpc.StatusCode]:
        server = grpc.aio.server()
        pb_grpc.add_AttributionServicer_to_server(AttributionServicer(LogQueries(log_, DOMAIN.operator)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.AttributionStub(ch)
                parts = [m async for m in stub.GetEpochExport(pb.GetEpochExportRequest(epoch=2, chunk_bytes=4096))]
                try:
                    [m async for m in stub.GetEpochExport(pb.GetEpochExportRequest(epoch=9))]
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
            sync = await asyncio.to_thread(fetch_grpc, f"127.0.0.1:{port}", 2)
        finally:
            await server.stop(None)
        assert parts[0].total_bytes == len(data) and parts[0].sha256 == "0x" + hashlib.sha256(data).hexdigest()
        return b"".join(p.data for p in parts), [p.offset for p in parts], sync, code

    streamed, offsets, sync, missing = asyncio.run(serve_and_fetch())
    assert streamed == data and sync == data
    assert offsets == list(range(0, len(data), 4096))
    assert missing == grpc.StatusCode.NOT_FOUND
    log_.close()

    out = tmp_path / "e2.json"
    res = subprocess.run([sys.executable, "-m", "loraledger.node.cli", "epoch", "export", "2", "--canonical", "--out",
                          str(out), "--records", str(tmp_path / "a.sqlite"), "--deployment", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.read_bytes() == data
