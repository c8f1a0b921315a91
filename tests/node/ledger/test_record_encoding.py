"""The hand-written record encoder (one struct.pack per record) against eth_abi over random records, its range
errors, and `records_tree` against the generic StandardMerkleTree over records with mixed adapter counts."""

from __future__ import annotations

import random

import pytest
from eth_abi import encode

from loraledger.node.ledger.merkle import StandardMerkleTree
from loraledger.node.ledger.records import (
    RECORD_LEAF_TYPES,
    AttributionRecord,
    RecordDomain,
    RecordError,
    records_tree,
)
from loraledger.node.types import Bytes32, Wei

_EXTREMES = {"uint64": 2**64 - 1, "uint32": 2**32 - 1, "uint16": 2**16 - 1, "uint256": 2**256 - 1}

DOMAIN = RecordDomain(31337, "0x" + "5f" * 20, "0x" + "6e" * 20)


def _h(rng: random.Random) -> Bytes32:
    return Bytes32("0x" + rng.randbytes(32).hex())


def _uint(rng: random.Random, typ: str) -> int:
    """Random, zero or the type's maximum: the edges are where a hand-written encoder goes wrong."""
    return rng.choice([0, _EXTREMES[typ], rng.randrange(_EXTREMES[typ] + 1), rng.randrange(256)])


def _random_record(rng: random.Random, n: int) -> AttributionRecord:
    """Field values over their whole ABI ranges (not the business rules: the encoder must not care)."""
    return AttributionRecord(
        epoch=_uint(rng, "uint64"), request_id=_h(rng),
        adapter_ids=tuple(_uint(rng, "uint256") for _ in range(n)),
        weights_bps=tuple(_uint(rng, "uint16") for _ in range(n)),
        prompt_tokens=_uint(rng, "uint32"), completion_tokens=_uint(rng, "uint32"), fee=Wei(_uint(rng, "uint256")),
        output_hash=_h(rng), attribution_hash=_h(rng), contributors=())


def _eth_abi(r: AttributionRecord) -> bytes:
    values = [bytes.fromhex(v[2:]) if isinstance(v, str) else v for v in r.leaf_values(DOMAIN)]
    return encode(list(RECORD_LEAF_TYPES), values)


def test_encoder_equals_eth_abi_over_random_records() -> None:
    rng = random.Random(11)
    for i in range(400):
        r = _random_record(rng, n=1 + i % 6)
        assert r.abi_encode(DOMAIN) == _eth_abi(r), r


def test_out_of_range_fields_raise_record_errors() -> None:
    base = _random_record(random.Random(2), n=2)
    bad = {
        "epoch": 2**64, "prompt_tokens": 2**32, "completion_tokens": -1, "fee": 2**256,
        "adapter_ids": (1, 2**256), "weights_bps": (1, 2**16), "request_id": "0x" + "ab" * 31,
        "output_hash": "0x" + "ab" * 33, "attribution_hash": "0x" + "zz" * 32,
    }
    for field, value in bad.items():
        r = AttributionRecord(**{**base.__dict__, field: value})
        with pytest.raises(RecordError, match="cannot be ABI-encoded"):
            r.abi_encode()
    with pytest.raises(RecordError, match="one weight per adapter"):
        AttributionRecord(**{**base.__dict__, "weights_bps": (5000,)}).abi_encode()


def test_records_tree_equals_the_generic_tree_with_mixed_adapter_counts() -> None:
    rng = random.Random(3)
    records = [_random_record(rng, n=1 + (i * 7) % 3) for i in range(40)]
    records.append(records[4])  # the same record twice: equal leaves keep their stable order
    fast = records_tree(records, DOMAIN)
    generic = StandardMerkleTree.of([r.leaf_values(DOMAIN) for r in records], RECORD_LEAF_TYPES)
    assert fast.root == generic.root and fast.tree == generic.tree and fast.tree_indices == generic.tree_indices
    assert fast.values == [r.leaf_values(DOMAIN) for r in records]
    fast.validate()
    for i in (0, 17, len(records) - 1):
        assert fast.verify(i, fast.get_proof(i))
