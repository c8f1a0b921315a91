"""The canonical epoch export without a chain: the same log gives the same bytes; the parser accepts it and names
the byte range, entry and field of a truncated, reordered, reformatted or forged export, and refuses an export
of another chain, ledger, operator or epoch by name."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loraledger.node.ledger.export import (
    RECORD_COLUMNS,
    ExportError,
    canonical_export,
    chunks,
    dump_export,
    export_document,
    export_sha256,
    parse_export,
)
from loraledger.node.ledger.merkle import RECORD_LEAF_ENCODING, REWARD_LEAF_ENCODING, verify
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


def _bad(data: bytes, change: Callable[[dict[str, Any]], object], pattern: str) -> None:
    """`change` applied to the parsed export, written canonically again: parse_export names it by `pattern`."""
    d = _doc(data)
    change(d)
    with pytest.raises(ExportError, match=pattern):
        parse_export(dump_export(d))


def _entry(d: dict[str, Any], i: int) -> list[Any]:
    row: list[Any] = d["records"]["entries"][i]
    return row


def _swap(rows: list[Any], i: int, j: int) -> None:
    rows[i], rows[j] = rows[j], rows[i]


def test_bad_exports_get_precise_errors(tmp_path: Path) -> None:
    log_ = _built_log(tmp_path / "a.sqlite")
    data = canonical_export(log_, 2)
    log_.close()
    fee = RECORD_COLUMNS.index("fee")

    with pytest.raises(ExportError, match=rf"truncated: its JSON ends at byte {len(data) - 7}"):
        parse_export(data[:-7])
    with pytest.raises(ExportError, match="empty"):
        parse_export(b"")

    _bad(data, lambda d: _swap(d["records"]["entries"], 4, 5),
         r"records\.entries\[5\] \(bytes \d+-\d+\): leaf 0x[0-9a-f]{64} is not above the previous .*reordered")
    _bad(data, lambda d: _entry(d, 3).__setitem__(fee, str(int(_entry(d, 3)[fee]) + 1)),
         r"records\.entries\[3\]\.leaf \(bytes \d+-\d+\): record 0x[0-9a-f]{64}: its fields hash to leaf")
    _bad(data, lambda d: _entry(d, 2).__setitem__(0, "0x" + "00" * 32),
         r"records\.entries\[2\]\.leaf .*its fields hash to leaf .* the export says 0x0{64} \(forged")
    # a forged contributor list: its attributionHash no longer commits to it
    _bad(data, lambda d: d["records"]["contributorLists"][0][1][0].__setitem__(1, "999"),
         r"records\.contributorLists\[0\]\.attributionHash \(bytes \d+-\d+\): the contributor list hashes to "
         r".*does not commit")
    _bad(data, lambda d: _swap(d["records"]["contributorLists"][0][1], 0, 1),
         r"records\.contributorLists\[0\]\.contributors .*sorted by address")
    _bad(data, lambda d: d["records"]["contributorLists"].append(d["records"]["contributorLists"][-1]),
         r"records\.contributorLists\[\d+\] .*reordered or repeated")
    # non-canonical values that decode to the same numbers or hashes: refused, so one epoch has one export
    _bad(data, lambda d: _entry(d, 1).__setitem__(fee, "0" + _entry(d, 1)[fee]),
         r"records\.entries\[1\]\.fee \(bytes \d+-\d+\): must be a decimal uint256 string, got '0")
    _bad(data, lambda d: _entry(d, 1).__setitem__(1, _entry(d, 1)[1].upper().replace("0X", "0x")),
         r"records\.entries\[1\]\.requestId .*must be 0x \+ 64 lowercase hex")
    _bad(data, lambda d: _entry(d, 6).__setitem__(RECORD_COLUMNS.index("promptTokens"), True),
         r"records\.entries\[6\]\.promptTokens .*must be int, got bool")
    _bad(data, lambda d: _entry(d, 6).__setitem__(RECORD_COLUMNS.index("weightsBps"), [5000]),
         r"records\.entries\[6\] .*adapter weights \(5000,\) sum to 5000, not 10000")
    _bad(data, lambda d: _entry(d, 7).pop(),
         r"records\.entries\[7\] .*a record row has 9 fields \(leaf, requestId, .*this one 8")
    _bad(data, lambda d: _entry(d, 0).__setitem__(8, "0x" + "ee" * 32),
         r"records\.entries\[0\]\.attributionHash .*names no list of records\.contributorLists")
    _bad(data, lambda d: d["records"]["contributorLists"].insert(0, [
        "0x" + "00" * 32, d["records"]["contributorLists"][0][1]]),
         r"records\.contributorLists\[0\]\.attributionHash .*hashes to 0x")
    _bad(data, lambda d: d["records"]["contributorLists"][1][1][0].__setitem__(0, "0x" + "g" * 40),
         r"records\.contributorLists\[1\]\.contributors\[0\]\[0\] .*not an address")
    _bad(data, lambda d: d["records"]["columns"].reverse(), r"records\.columns .*must be \['leaf', 'requestId'")
    _bad(data, lambda d: d["records"].__setitem__("proofs", []), r"records \(bytes .*unknown field\(s\) \['proofs'\]")
    _bad(data, lambda d: d["rewards"]["entries"][0].__setitem__(2, str(int(d["rewards"]["entries"][0][2]) + 5)),
         r"rewards\.entries\[0\]\.leaf .*hashes to leaf")
    mixed = next(i for i, row in enumerate(_doc(data)["rewards"]["entries"]) if row[0] != row[0].lower())
    _bad(data, lambda d: d["rewards"]["entries"][mixed].__setitem__(0, d["rewards"]["entries"][mixed][0].lower()),
         rf"rewards\.entries\[{mixed}\]\.account .*address must be written checksummed as 0x")
    _bad(data, lambda d: d["records"].__setitem__("count", d["records"]["count"] + 1),
         r"records\.count \(bytes \d+-\d+\): says 13 records, the export lists 12")
    _bad(data, lambda d: d["records"].__setitem__("root", "0x" + "00" * 32),
         r"records\.root .*the listed records give root 0x[0-9a-f]{64}, the export says 0x0{64}")

    spaced = data.replace(b'"epoch":2,', b'"epoch": 2,', 1)
    with pytest.raises(ExportError, match=r"byte \d+: the export is not in canonical form .* near epoch \(bytes"):
        parse_export(spaced)
    with pytest.raises(ExportError, match=r"byte \d+ \(0xff\) is not ASCII"):
        parse_export(data[:100] + b"\xff" + data[101:])
    with pytest.raises(ExportError, match=r"format 'loraledger-epoch-export-v1' is not"):
        parse_export(data.replace(b"export-v2", b"export-v1", 1))

    # another stream or epoch, refused by name
    for other, name in ((RecordDomain(1, DOMAIN.ledger, DOMAIN.operator), "chain 31337, not chain 1"),
                        (RecordDomain(31337, as_address("0x" + "22" * 20), DOMAIN.operator), f"ledger {DOMAIN.ledger}"),
                        (RecordDomain(31337, DOMAIN.ledger, OPERATOR), f"operator {DOMAIN.operator}, not operator")):
        with pytest.raises(ExportError, match=name):
            parse_export(data, domain=other)
    with pytest.raises(ExportError, match="this export is of epoch 2, not epoch 3"):
        parse_export(data, domain=DOMAIN, epoch=3)


def test_byte_ranges_name_the_bytes_and_proofs_follow_from_the_leaves(tmp_path: Path) -> None:
    """`where` gives the exact bytes of a field; the proofs read off the rebuilt trees verify against the roots
    (the export carries leaves, not proofs)."""
    log_ = _built_log(tmp_path / "a.sqlite")
    data = canonical_export(log_, 2)
    log_.close()
    ex = parse_export(data, domain=DOMAIN, epoch=2)
    for i in (0, 5, 11):
        where = ex.record_where(i, "fee")
        a, b = (int(x) for x in re.search(r"bytes (\d+)-(\d+)", where).groups())  # type: ignore[union-attr]
        assert data[a:b + 1].decode() == f'"{ex.records[i].fee}"'
        assert where.startswith(f"records.entries[{i}].fee ")
        r = ex.records[i]
        assert verify(ex.records_root, RECORD_LEAF_ENCODING, r.leaf_values(DOMAIN), ex.record_proof(i))
        assert not verify(ex.records_root, RECORD_LEAF_ENCODING, r.leaf_values(DOMAIN), ex.record_proof((i + 1) % 12))
    for i, e in enumerate(ex.rewards):
        assert verify(ex.rewards_root, REWARD_LEAF_ENCODING, [e.account, e.cumulative], ex.reward_proof(i))
    # each record's contributor list is the one its attributionHash names, listed once
    assert {r.attribution_hash for r in ex.records} == set(ex.contributor_lists)
    assert len(ex.contributor_lists) == 12  # random weights: every list distinct here


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

    from loraledger.node.ledger.watch import fetch_grpc
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
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.read_bytes() == data
