"""loraledger.node.ledger.merkle's bulk paths against the plain definitions: C keccak vs eth_hash, column-wise leaf encoding vs
eth_abi (checksummed, lower- and upper-case addresses, bytes, bad checksums), `from_leaf_hashes` vs `of`
(sorted, unsorted, duplicate leaves), and the garbage collector left as it was found."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak as ref_keccak
from eth_utils import to_checksum_address

from loraledger.node.ledger.merkle import (
    REWARD_LEAF_ENCODING,
    MerkleError,
    StandardMerkleTree,
    _raw_keccak,
    encode_leaf,
    encode_leaves,
    hash_pair,
    keccak256,
    keccak256_many,
    leaf_hash,
    leaf_hashes_of_encoded,
)


def _address(rng: random.Random, style: str) -> str:
    raw = rng.randbytes(20)
    if style == "checksum":
        return to_checksum_address(raw)
    body = raw.hex()
    return "0x" + (body.upper() if style == "upper" else body)


def test_keccak_matches_eth_hash_one_and_many() -> None:
    rng = random.Random(1)
    datas = [rng.randbytes(rng.randrange(0, 400)) for _ in range(200)]
    assert [keccak256(d) for d in datas] == [ref_keccak(d) for d in datas]
    assert keccak256_many(datas) == [ref_keccak(d) for d in datas]
    assert leaf_hashes_of_encoded(datas) == [ref_keccak(ref_keccak(d)) for d in datas]
    assert keccak256_many([]) == [] and leaf_hashes_of_encoded(iter([])) == []


def test_pycryptodome_fallback_matches_eth_hash() -> None:
    """The fallback used when safe-pysha3 is missing (None only where pycryptodome's raw API is absent)."""
    raw = _raw_keccak()
    if raw is None:
        pytest.skip("pycryptodome's raw keccak API is not available here")
    rng = random.Random(2)
    for d in (rng.randbytes(k) for k in (0, 1, 31, 32, 64, 135, 136, 137, 352, 1000)):
        assert raw(d) == ref_keccak(d)


@pytest.mark.parametrize("style", ["checksum", "lower", "upper", "mixed"])
def test_bulk_encoding_equals_eth_abi(style: str) -> None:
    rng = random.Random(style)
    styles = ["checksum", "lower", "upper"]
    pairs = [(_address(rng, style if style != "mixed" else rng.choice(styles)), rng.randrange(2**256))
             for _ in range(300)]
    values = [list(p) for p in pairs]
    expected = [abi_encode(["address", "uint256"], [bytes.fromhex(a[2:]), v]) for a, v in pairs]
    assert encode_leaves(REWARD_LEAF_ENCODING, values) == expected
    assert [encode_leaf(REWARD_LEAF_ENCODING, v) for v in values] == expected


def test_bulk_encoding_other_static_types_and_item_fallback() -> None:
    rng = random.Random(3)
    types = ("address", "bytes32", "uint64", "int8", "bool")
    values: list[list[Any]] = [
        [rng.randbytes(20) if i % 2 else _address(rng, "checksum"), rng.randbytes(32), rng.randrange(2**64),
         rng.randrange(-128, 128), bool(i % 3)] for i in range(50)]
    values[7][2] = str(values[7][2])  # a decimal string in an int column: bulk path declines, items encode it
    expected = [abi_encode(list(types), [bytes(v[0]) if isinstance(v[0], bytes) else v[0], v[1], int(v[2]), v[3],
                                         v[4]]) for v in values]
    assert encode_leaves(types, values) == expected
    single = [[rng.randrange(2**16)] for _ in range(5)]
    assert encode_leaves(("uint16",), single) == [abi_encode(["uint16"], v) for v in single]


def test_bulk_encoding_rejects_what_the_item_encoder_rejects() -> None:
    rng = random.Random(4)
    addresses = [_address(rng, "checksum") for _ in range(20)]
    good: list[list[Any]] = [[a, i] for i, a in enumerate(addresses)]
    body = addresses[5][2:]
    flipped = next(i for i, ch in enumerate(body) if ch.isalpha())
    bad_case = "0x" + body[:flipped] + body[flipped].swapcase() + body[flipped + 1:]  # breaks the EIP-55 checksum
    assert bad_case[2:] not in (body.lower(), body.upper())
    for bad_row in ([bad_case, 1], ["0x" + "zz" * 20, 1], [good[0][0], -1], [good[0][0], 2**256], [good[0][0]],
                    [good[0][0], True]):
        with pytest.raises(MerkleError):
            encode_leaves(REWARD_LEAF_ENCODING, [*good[:5], bad_row, *good[5:]])
        with pytest.raises(MerkleError):
            StandardMerkleTree.of([*good, bad_row], REWARD_LEAF_ENCODING)


@pytest.mark.parametrize("sort_leaves", [True, False])
def test_from_leaf_hashes_equals_of(sort_leaves: bool) -> None:
    rng = random.Random(5)
    for n in (1, 2, 3, 5, 8, 13, 64, 65):
        values = [[_address(rng, "checksum"), rng.randrange(2**128)] for _ in range(n)]
        if n > 3:
            values[2] = list(values[0])  # a value given twice: equal leaves keep their stable order
        built = StandardMerkleTree.of(values, REWARD_LEAF_ENCODING, sort_leaves=sort_leaves)
        hashes = [leaf_hash(REWARD_LEAF_ENCODING, v) for v in values]
        fast = StandardMerkleTree.from_leaf_hashes(hashes, values, REWARD_LEAF_ENCODING, sort_leaves=sort_leaves)
        assert fast.tree == built.tree and fast.tree_indices == built.tree_indices, n
        # the layout, recomputed by hand: leaves at the end, every inner node the sorted-pair hash of its children
        order = sorted(range(n), key=hashes.__getitem__) if sort_leaves else list(range(n))
        assert [fast.tree[2 * n - 2 - k] for k in range(n)] == [hashes[i] for i in order]
        assert all(fast.tree[j] == hash_pair(fast.tree[2 * j + 1], fast.tree[2 * j + 2]) for j in range(n - 1))
        fast.validate()
        assert all(fast.verify(i, fast.get_proof(i)) for i in range(n))


def test_from_leaf_hashes_rejects_bad_input() -> None:
    values = [["0x" + "11" * 20, 1], ["0x" + "22" * 20, 2]]
    hashes = [leaf_hash(REWARD_LEAF_ENCODING, v) for v in values]
    with pytest.raises(MerkleError, match="no leaves"):
        StandardMerkleTree.from_leaf_hashes([], [], REWARD_LEAF_ENCODING)
    with pytest.raises(MerkleError, match="one value per leaf"):
        StandardMerkleTree.from_leaf_hashes(hashes, values[:1], REWARD_LEAF_ENCODING)
    with pytest.raises(MerkleError, match="32 bytes"):
        StandardMerkleTree.from_leaf_hashes([hashes[0], hashes[1][:31]], values, REWARD_LEAF_ENCODING)
    wrong = StandardMerkleTree.from_leaf_hashes([hashes[1], hashes[0]], values, REWARD_LEAF_ENCODING)
    with pytest.raises(MerkleError, match="does not hash"):
        wrong.validate()  # hashes that do not belong to their values are caught by validate()


def test_bulk_builds_leave_the_garbage_collector_as_found() -> None:
    values = [["0x" + f"{i:040x}", i] for i in range(1, 50)]
    assert gc.isenabled()
    StandardMerkleTree.of(values, REWARD_LEAF_ENCODING)
    assert gc.isenabled()
    gc.disable()
    try:
        StandardMerkleTree.of(values, REWARD_LEAF_ENCODING).validate()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(MerkleError):
        StandardMerkleTree.of([*values, ["0x1234", 1]], REWARD_LEAF_ENCODING)
    assert gc.isenabled()  # re-enabled on the error path too
