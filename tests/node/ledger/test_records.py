"""Attribution records: the leaf encoding (against eth_abi and OpenZeppelin's JS StandardMerkleTree), the
attribution hash, validation, and JSON round trips."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from eth_abi import encode
from eth_hash.auto import keccak

from loraledger.node.ledger.merkle import StandardMerkleTree
from loraledger.node.ledger.records import (
    RECORD_LEAF_TYPES,
    AttributionRecord,
    RecordDomain,
    RecordError,
    attribution_hash,
    records_tree,
    sort_contributors,
)

REPO = Path(__file__).resolve().parents[3]
A = "0x" + "11" * 20
B = "0x" + "0a" * 20
C = "0x" + "ff" * 20

DOMAIN = RecordDomain(31337, "0x" + "5f" * 20, "0x" + "6e" * 20)


def _record(**kw: object) -> AttributionRecord:
    args: dict[str, object] = {
        "request_id": b"\x01" * 32, "adapter_ids": [3, 7], "weights_bps": [7000, 3000], "prompt_tokens": 5,
        "completion_tokens": 9, "fee": 123, "output_hash": b"\x02" * 32, "contributors": {A: 5, B: 7},
    }
    args.update(kw)
    return AttributionRecord.create(**args)  # type: ignore[arg-type]


def _abi_values(r: AttributionRecord) -> list[object]:
    return [bytes.fromhex(v[2:]) if isinstance(v, str) else v for v in r.leaf_values(DOMAIN)]


@pytest.mark.parametrize("n_adapters", [1, 2, 5])
def test_abi_encoding_matches_eth_abi(n_adapters: int) -> None:
    weights = [10_000 // n_adapters] * n_adapters
    weights[0] += 10_000 - sum(weights)
    r = _record(adapter_ids=list(range(1, n_adapters + 1)), weights_bps=weights, fee=2**200 + 1).with_epoch(2**63)
    assert r.abi_encode(DOMAIN) == encode(list(RECORD_LEAF_TYPES), _abi_values(r))
    assert r.leaf_hash(DOMAIN) == keccak(keccak(encode(list(RECORD_LEAF_TYPES), _abi_values(r))))


def test_attribution_hash_is_sorted_abi_encoding() -> None:
    contribs = sort_contributors([(A, 5), (C, 1), (B, 7), (A, 2), (C, 0)])
    assert [a.lower() for a, _ in contribs] == [B, A, C]  # numeric address order, duplicates merged
    assert [w for _, w in contribs] == [7, 7, 1]
    expected = keccak(encode(["address[]", "uint256[]"], [[B, A, C], [7, 7, 1]]))
    assert attribution_hash(contribs) == "0x" + expected.hex()
    with pytest.raises(RecordError, match="sorted"):
        attribution_hash(tuple(reversed(contribs)))


def test_validation_names_the_field() -> None:
    with pytest.raises(RecordError, match="sum to 9000"):
        _record(weights_bps=[6000, 3000])
    with pytest.raises(RecordError, match="appears twice"):
        _record(adapter_ids=[3, 3])
    with pytest.raises(RecordError, match="uint32"):
        _record(prompt_tokens=2**32)
    with pytest.raises(RecordError, match="negative weight"):
        _record(contributors={A: -1})
    r = _record()
    forged = AttributionRecord(**{**r.__dict__, "contributors": ((r.contributors[0][0], 999),)})
    with pytest.raises(RecordError, match="does not commit"):
        forged.validate()


def test_json_round_trip_and_epoch() -> None:
    r = _record(fee=2**255).with_epoch(9)
    back = AttributionRecord.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r and back.leaf_hash(DOMAIN) == r.leaf_hash(DOMAIN)
    assert r.with_epoch(10).leaf_hash(DOMAIN) != r.leaf_hash(DOMAIN)
    with pytest.raises(RecordError):
        r.with_epoch(0)


@pytest.mark.skipif(shutil.which("node") is None or not (REPO / "node_modules/@openzeppelin/merkle-tree").is_dir(),
                    reason="needs Node.js and node_modules/@openzeppelin/merkle-tree")
def test_leaf_matches_openzeppelin_js() -> None:
    records = [_record(request_id=bytes([i]) * 32, fee=i * 1000).with_epoch(4) for i in range(1, 4)]
    values = [[str(v) if isinstance(v, int) else ([str(x) for x in v] if isinstance(v, list) else v)
               for v in r.leaf_values(DOMAIN)] for r in records]
    script = (
        "const {StandardMerkleTree}=require('@openzeppelin/merkle-tree');"
        "const [vals,types]=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "const t=StandardMerkleTree.of(vals,types);"
        "console.log(JSON.stringify([t.root, vals.map((v,i)=>t.leafHash(v))]));"
    )
    out = subprocess.run(["node", "-e", script], input=json.dumps([values, list(RECORD_LEAF_TYPES)]),
                         capture_output=True, text=True, cwd=REPO, check=True, timeout=60)
    root, leaves = json.loads(out.stdout)
    assert leaves == ["0x" + r.leaf_hash(DOMAIN).hex() for r in records]
    assert root == records_tree(records, DOMAIN).root_hex


@pytest.mark.parametrize("n", [1, 2, 7])
def test_records_tree_matches_generic_tree(n: int) -> None:
    records = [_record(request_id=bytes([i]) * 32, fee=i).with_epoch(3) for i in range(1, n + 1)]
    fast = records_tree(records, DOMAIN)
    generic = StandardMerkleTree.of([r.leaf_values(DOMAIN) for r in records], RECORD_LEAF_TYPES)
    assert fast.tree == generic.tree and fast.tree_indices == generic.tree_indices
    for i, r in enumerate(records):
        assert fast.verify(i, fast.get_proof(i)) and fast.index_of(r.leaf_values(DOMAIN)) == i
    with pytest.raises(RecordError, match="at least one"):
        records_tree([], DOMAIN)


def test_domain_separates_leaves_and_content_hash_ignores_it() -> None:
    r = _record().with_epoch(5)
    other_operator = RecordDomain(DOMAIN.chain_id, DOMAIN.ledger, "0x" + "77" * 20)
    other_chain = RecordDomain(1, DOMAIN.ledger, DOMAIN.operator)
    other_ledger = RecordDomain(DOMAIN.chain_id, "0x" + "78" * 20, DOMAIN.operator)
    leaves = {r.leaf_hash(d) for d in (DOMAIN, other_operator, other_chain, other_ledger)}
    assert len(leaves) == 4
    assert r.content_hash() == _record().content_hash() == keccak(keccak(_record().abi_encode()))  # epoch-free
    assert r.abi_encode(DOMAIN)[96:] != r.abi_encode()  # offsets move with the domain prefix
    assert RecordDomain.from_json(DOMAIN.to_json()) == DOMAIN
    with pytest.raises(RecordError, match="chain id"):
        RecordDomain(0, DOMAIN.ledger, DOMAIN.operator)
