"""Merkle trees byte-identical to OpenZeppelin's `StandardMerkleTree` (`@openzeppelin/merkle-tree` 1.x).

    leaf(value)  = keccak256(keccak256(abi.encode(types, value)))      # hashed twice: a leaf never looks like
                                                                       # the 64-byte preimage of an inner node
    node(a, b)   = keccak256(min(a, b) ++ max(a, b))                   # sorted pairs: proofs carry no sides
    leaves       = sorted(leaf(v) for v in values)                     # by hash, stable (sortLeaves = true)
    tree         = array of 2n-1 nodes; tree[2n-2-i] = leaves[i]; tree[i] = node(tree[2i+1], tree[2i+2])
    root         = tree[0]
    proof(i)     = siblings of tree index i up to (excluding) the root; sibling(j) = j+1 if j odd else j-1

The same array layout as the JS library, so roots, proofs and `dump()` JSON match it exactly and verify in
Solidity with OpenZeppelin's `MerkleProof.verify(proof, root, leaf)`.

Speed: a tree of n leaves needs about 3n keccak calls. They go to safe-pysha3's C keccak (pycryptodome's raw
sponge, then eth_hash, when it is missing), in bulk: all leaves hashed in one C-level `map`, then the inner
nodes one tree level at a time (sorted pairs by bytes compare), so there is no Python frame per node. Leaves of
static ABI types (address, uintN, intN, bytesN, bool) are encoded without eth_abi; dynamic types (arrays, string,
bytes) fall back to `eth_abi.encode`, and callers with a fast encoder of their own (`loraledger.node.ledger.records`) hand in leaf
hashes through `StandardMerkleTree.from_leaf_hashes`. The garbage collector is paused during a bulk build.
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak as _eth_keccak
from eth_utils import to_checksum_address

from loraledger.node.errors import NodeError

DUMP_FORMAT = "standard-v1"

# Leaf encodings used by the contracts (kept here so every module builds the same leaves).
REWARD_LEAF_ENCODING: tuple[str, ...] = ("address", "uint256")
"""AttributionLedger rewards: (account, cumulativeAmount)."""
CONTRIBUTION_LEAF_ENCODING: tuple[str, ...] = ("address", "bytes32", "uint256")
"""DatanetRegistry contributions: (contributor, contributionHash, weight)."""
RECORD_LEAF_ENCODING: tuple[str, ...] = (
    "uint256", "address", "address", "uint64", "bytes32", "uint256[]", "uint16[]", "uint32", "uint32", "uint256", "bytes32", "bytes32",
)
"""AttributionLedger records: (chainId, ledger, operator, epoch, requestId, adapterIds, weightsBps, promptTokens, completionTokens, fee,
outputHash, attributionHash)."""


class MerkleError(NodeError, ValueError):
    """A Merkle tree could not be built, loaded or queried (bad value for its type, unknown leaf, bad dump)."""


# ----------------------------------------------------------------------------------------------------------- keccak

Hasher = Callable[[bytes], bytes]
BulkHasher = Callable[[Iterable[bytes]], list[bytes]]
_local = threading.local()


class _FastKeccak(NamedTuple):
    """keccak256 entry points over one C implementation."""

    one: Hasher  # one(data) = keccak256(data)
    many: BulkHasher  # many(datas) = [keccak256(d) for d in datas]
    leaves: BulkHasher  # leaves(datas) = [keccak256(keccak256(d)) for d in datas]


def _pysha3_keccak() -> _FastKeccak | None:
    """keccak256 from safe-pysha3's C module, or None when it is not installed.

    The bulk forms run their loop in C (`map` over the hash type and its unbound `digest`): no Python frame per
    item, and no intermediate list for the double hash of leaves.
    """
    try:
        from sha3 import keccak_256
    except ImportError:
        return None
    digest = keccak_256.digest

    def keccak(data: bytes) -> bytes:
        return keccak_256(data).digest()  # type: ignore[no-any-return]

    def keccak_many(datas: Iterable[bytes]) -> list[bytes]:
        return list(map(digest, map(keccak_256, datas)))

    def keccak_leaves(datas: Iterable[bytes]) -> list[bytes]:
        return list(map(digest, map(keccak_256, map(digest, map(keccak_256, datas)))))

    if not _self_check(keccak):
        return None
    return _FastKeccak(keccak, keccak_many, keccak_leaves)


def _raw_keccak() -> Hasher | None:
    """A keccak256 over pycryptodome's C sponge with one reused state (None if that private API is absent).

    Per hash: reset(state); absorb(state, data); digest(state, out, 32, padding=0x01). Three C calls instead of
    building a hash object, about 2x faster than `Crypto.Hash.keccak.new`. The fallback when safe-pysha3 is
    missing; the state is per thread (see `_hasher`).
    """
    try:
        from Crypto.Hash import keccak as _pc_keccak
        from Crypto.Util._raw_api import VoidPointer

        lib = ctypes.CDLL(_pc_keccak._raw_keccak_lib._name)  # type: ignore[attr-defined]
        state = VoidPointer()
        if lib.keccak_init(state.address_of(), ctypes.c_size_t(64), ctypes.c_ubyte(24)) != 0:
            return None
        st = ctypes.c_void_p(state.get().value)
    except (ImportError, AttributeError, OSError):
        return None
    reset, absorb, digest = lib.keccak_reset, lib.keccak_absorb, lib.keccak_digest
    out = ctypes.create_string_buffer(32)

    def keccak(data: bytes) -> bytes:
        reset(st)
        absorb(st, data, len(data))
        digest(st, out, 32, 1)
        return out.raw

    return keccak if _self_check(keccak) else None


def _self_check(keccak: Hasher) -> bool:
    """True when `keccak` agrees with eth_hash on fixed inputs (so a broken C path never yields wrong hashes)."""
    return all(keccak(d) == _eth_keccak(d) for d in (b"", b"\x01" * 200, bytes(range(64))))


@lru_cache(maxsize=1)
def _fast_keccak() -> _FastKeccak | None:
    """The process-wide safe-pysha3 keccak (stateless, so safe to share across threads), resolved once."""
    return _pysha3_keccak()


def _hasher() -> Hasher:
    """keccak256 for this thread: safe-pysha3, else pycryptodome's raw sponge (one state per thread), else
    eth_hash."""
    fast = _fast_keccak()
    if fast is not None:
        return fast.one
    h: Hasher | None = getattr(_local, "keccak", None)
    if h is None:
        h = _raw_keccak() or _eth_keccak
        _local.keccak = h
    return h


def keccak256(data: bytes) -> bytes:
    """keccak256(data) -> 32 bytes."""
    return _hasher()(data)


def keccak256_many(datas: Iterable[bytes]) -> list[bytes]:
    """[keccak256(d) for d in datas], with the loop in C when safe-pysha3 is installed."""
    fast = _fast_keccak()
    if fast is not None:
        return fast.many(datas)
    h = _hasher()
    return [h(d) for d in datas]


def leaf_hashes_of_encoded(encoded: Iterable[bytes]) -> list[bytes]:
    """[keccak256(keccak256(e)) for e in encoded]: StandardMerkleTree leaves from their ABI encodings."""
    fast = _fast_keccak()
    if fast is not None:
        return fast.leaves(encoded)
    h = _hasher()
    return [h(h(e)) for e in encoded]


# --------------------------------------------------------------------------------------------------- leaf encoding

_UINT_RE = re.compile(r"^uint(\d*)$")
_INT_RE = re.compile(r"^int(\d*)$")
_BYTES_N_RE = re.compile(r"^bytes(\d+)$")
Encoder = Callable[[Any], bytes]


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value.startswith(("0x", "0X")):
        try:
            return bytes.fromhex(value[2:])
        except ValueError as e:
            raise MerkleError(f"{what}: not hex: {value!r}") from e
    raise MerkleError(f"{what}: expected bytes or a 0x-hex string, got {value!r}")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise MerkleError(f"{what}: expected an integer, got a bool {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0) if value.startswith(("0x", "0X")) else int(value)
        except ValueError as e:
            raise MerkleError(f"{what}: not an integer: {value!r}") from e
    raise MerkleError(f"{what}: expected an integer (int or decimal string), got {value!r}")


_HI_NIBBLE_BIT3 = bytes(0x20 if b >> 7 else 0 for b in range(256))
_LO_NIBBLE_BIT3 = bytes(0x20 if b & 0x08 else 0 for b in range(256))
_LETTER_BIT = int.from_bytes(b"\x40" * 40, "big")
_LETTER_CASE_BIT = bytes(0x20 if b & 0x40 else 0 for b in range(256))  # 0x20 on ascii letters, 0 on digits
_FIRST_20 = itemgetter(slice(0, 20))
_ZERO_12 = b"\x00" * 12


def is_checksummed(body: str) -> bool:
    """True when the 40 hex digits `body` (no 0x) carry a valid EIP-55 checksum.

    EIP-55: letter i is upper case iff nibble i of keccak256(lowercase ascii) is >= 8. Computed with byte-wise
    big-int masks (no per-character Python loop): case bit 0x20 is cleared where the letter bit 0x40 is set and
    the hash nibble's top bit is set.
    """
    lower = body.lower().encode("ascii")
    digest = _hasher()(lower)[:20]
    nibble_bits = bytearray(40)
    nibble_bits[0::2] = digest.translate(_HI_NIBBLE_BIT3)
    nibble_bits[1::2] = digest.translate(_LO_NIBBLE_BIT3)
    lower_int = int.from_bytes(lower, "big")
    expected = lower_int ^ (int.from_bytes(nibble_bits, "big") & ((lower_int & _LETTER_BIT) >> 1))
    return expected == int.from_bytes(body.encode("ascii"), "big")


def _static_address(v: Any) -> bytes:
    """abi.encode(address v): v is `0x` + 40 hex (mixed case must be a valid EIP-55 checksum) or 20 bytes."""
    encoder = _static_encoder("address")
    assert encoder is not None
    return encoder(v)


def _static_encoder(typ: str) -> Encoder | None:
    """A 32-byte ABI encoder for one static elementary type, or None for anything else."""
    if typ == "address":
        def enc_address(v: Any) -> bytes:
            if type(v) is str and len(v) == 42 and v[1] in "xX":
                body = v[2:]
                # all-lower / all-upper hex carries no checksum; mixed case must be a valid EIP-55 checksum
                if body.islower() or body.isupper() or body.isdigit() or (body.isascii() and is_checksummed(body)):
                    try:
                        return b"\x00" * 12 + bytes.fromhex(body)
                    except ValueError:
                        pass
                raise MerkleError(f"address: not an address: {v!r}")
            b = _as_bytes(v, "address")
            if len(b) != 20:
                raise MerkleError(f"address: need 20 bytes, got {len(b)}")
            return b"\x00" * 12 + b
        return enc_address
    if typ == "bool":
        def enc_bool(v: Any) -> bytes:
            if not isinstance(v, bool):
                raise MerkleError(f"bool: expected True/False, got {v!r}")
            return b"\x00" * 31 + (b"\x01" if v else b"\x00")
        return enc_bool
    if m := _UINT_RE.match(typ):
        bits = int(m.group(1) or 256)
        if bits % 8 or not 8 <= bits <= 256:
            return None
        hi = 1 << bits

        def enc_uint(v: Any) -> bytes:
            n = v if type(v) is int else _as_int(v, typ)
            if not 0 <= n < hi:
                raise MerkleError(f"{typ}: {n} out of range")
            return n.to_bytes(32, "big")
        return enc_uint
    if m := _INT_RE.match(typ):
        bits = int(m.group(1) or 256)
        if bits % 8 or not 8 <= bits <= 256:
            return None
        lim = 1 << (bits - 1)

        def enc_int(v: Any) -> bytes:
            n = _as_int(v, typ)
            if not -lim <= n < lim:
                raise MerkleError(f"{typ}: {n} out of range")
            return n.to_bytes(32, "big", signed=True)
        return enc_int
    if m := _BYTES_N_RE.match(typ):
        size = int(m.group(1))
        if not 1 <= size <= 32:
            return None

        def enc_bytes_n(v: Any) -> bytes:
            b = _as_bytes(v, typ)
            if len(b) != size:
                raise MerkleError(f"{typ}: need {size} bytes, got {len(b)}")
            return b + b"\x00" * (32 - size)
        return enc_bytes_n
    return None


def _normalize_for_eth_abi(typ: str, value: Any) -> Any:
    """Turn JSON-ish values (hex strings for bytes, decimal strings for ints) into what eth_abi expects."""
    if typ.endswith("]"):
        inner = typ[: typ.rindex("[")]
        if not isinstance(value, (list, tuple)):
            raise MerkleError(f"{typ}: expected a list, got {value!r}")
        return [_normalize_for_eth_abi(inner, v) for v in value]
    if typ == "bytes" or _BYTES_N_RE.match(typ):
        return _as_bytes(value, typ)
    if _UINT_RE.match(typ) or _INT_RE.match(typ):
        return _as_int(value, typ)
    if typ == "address":
        if isinstance(value, str) and len(value) == 42:
            return to_checksum_address(_static_address(value)[12:])
        raise MerkleError(f"address: not an address: {value!r}")
    return value


def make_leaf_encoder(types: Sequence[str]) -> Callable[[Sequence[Any]], bytes]:
    """abi.encode(types, value) as a function of `value` (fast path when every type is static elementary)."""
    types = tuple(types)
    if not types:
        raise MerkleError("leaf encoding needs at least one ABI type")
    encoders = [_static_encoder(t) for t in types]
    n = len(types)
    if all(e is not None for e in encoders):
        encs: list[Encoder] = [e for e in encoders if e is not None]

        def encode_static(value: Sequence[Any]) -> bytes:
            if len(value) != n:
                raise MerkleError(f"leaf {value!r} has {len(value)} fields, encoding {types} needs {n}")
            return b"".join([enc(v) for enc, v in zip(encs, value)])
        return encode_static

    def encode_dynamic(value: Sequence[Any]) -> bytes:
        if len(value) != n:
            raise MerkleError(f"leaf {value!r} has {len(value)} fields, encoding {types} needs {n}")
        try:
            return abi_encode(list(types), [_normalize_for_eth_abi(t, v) for t, v in zip(types, value)])
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, MerkleError):
                raise
            raise MerkleError(f"cannot ABI-encode {value!r} as {types}: {e}") from e
    return encode_dynamic


def _chunks(data: bytes, size: int) -> list[bytes]:
    """[data[i:i + size] for i in range(0, len(data), size)], the loop in C."""
    return list(map(data.__getitem__, map(slice, range(0, len(data), size), range(size, len(data) + 1, size))))


def _eip55_many(lower: bytes) -> bytes:
    """The EIP-55 forms of many addresses from their lowercase hex bodies concatenated (40 ascii bytes each).

    Per address: letter i upper case iff nibble i of keccak256(lowercase ascii) >= 8. For all of them at once:
    digests in one bulk keccak, then the case bits of the whole column as one big-int mask (C-level, linear).
    """
    size = len(lower)
    first20 = b"".join(map(_FIRST_20, keccak256_many(_chunks(lower, 40))))  # [20m]
    nibble_bits = bytearray(size)  # 0x20 where the hash nibble is >= 8
    nibble_bits[0::2] = first20.translate(_HI_NIBBLE_BIT3)
    nibble_bits[1::2] = first20.translate(_LO_NIBBLE_BIT3)
    flip = int.from_bytes(nibble_bits, "big") & int.from_bytes(lower.translate(_LETTER_CASE_BIT), "big")
    return (int.from_bytes(lower, "big") ^ flip).to_bytes(size, "big")


def _address_column(column: Sequence[Any]) -> list[bytes] | None:
    """[abi.encode(address v) for v in column] in bulk, for a column of `0x` + 40-hex strings.

    bodies = "".join(column) without the "0x" prefixes (40 chars each, or the column is rejected); EIP-55 forms
    of all of them at once; one `bytes.fromhex`; words = 12 zero bytes + 20 address bytes.
    None when any item is not such a string, is not hex, or is mixed case without a valid EIP-55 checksum: the
    caller then encodes item by item, which names the bad item in its error.
    """
    m = len(column)
    try:
        if set(map(len, column)) != {42} or not all(map(str.startswith, column, repeat("0x"))):
            return None
    except TypeError:  # an item that is not a str
        return None
    given = "".join(column).replace("0x", "")
    if len(given) != 40 * m or not given.isascii():  # "0x" inside a body: not hex anyway
        return None
    expected = _eip55_many(given.lower().encode("ascii")).decode("ascii")
    if expected != given:  # some are not checksummed: each must then be all lower or all upper case
        for k in range(0, 40 * m, 40):
            body = given[k:k + 40]
            if body != expected[k:k + 40] and body != body.lower() and body != body.upper():
                return None
    try:
        raw = bytes.fromhex(given)
    except ValueError:
        return None
    if len(raw) != 20 * m:  # fromhex skips whitespace
        return None
    return list(map(_ZERO_12.__add__, _chunks(raw, 20)))


def _uint_column(column: Sequence[Any], bits: int) -> list[bytes] | None:
    """[abi.encode(uintN v) for v in column] in bulk for a column of Python ints in range; None otherwise."""
    if set(map(type, column)) != {int} or min(column) < 0 or max(column) >> bits:
        return None
    return [v.to_bytes(32, "big") for v in column]


def encode_leaves(types: Sequence[str], values: Sequence[Sequence[Any]]) -> list[bytes]:
    """[abi.encode(types, v) for v in values], column by column when every type is static elementary.

    Static columns: address and uintN columns are encoded in bulk (C-level loops, EIP-55 checks in one pass),
    others per item; rows are the concatenation of their 32-byte words. Dynamic encodings, and any column the
    bulk path rejects, go item by item through `make_leaf_encoder` (same bytes, and errors that name the item).
    """
    return list(_iter_encoded(types, values))


def _iter_encoded(types: Sequence[str], values: Sequence[Sequence[Any]]) -> Iterable[bytes]:
    """`encode_leaves` as an iterable, so the leaf hasher can consume rows without a list of them all."""
    types = tuple(types)
    encode = make_leaf_encoder(types)
    encoders = [_static_encoder(t) for t in types]
    n = len(types)
    if not values or any(e is None for e in encoders) or set(map(len, values)) != {n}:
        return map(encode, values)
    columns: list[list[bytes]] = []
    for k, (typ, enc) in enumerate(zip(types, encoders)):
        column = list(map(itemgetter(k), values))
        words: list[bytes] | None = None
        if typ == "address":
            words = _address_column(column)
        elif m := _UINT_RE.match(typ):
            words = _uint_column(column, int(m.group(1) or 256))
        if words is None:
            assert enc is not None
            try:
                words = list(map(enc, column))
            except MerkleError:
                return [encode(v) for v in values]  # re-raise, naming the whole value
        columns.append(words)
    if n == 1:
        return columns[0]
    return map(b"".join, zip(*columns))


def encode_leaf(types: Sequence[str], value: Sequence[Any]) -> bytes:
    """abi.encode(value) for the ABI `types` (the preimage of the inner hash)."""
    return make_leaf_encoder(types)(value)


def leaf_hash(types: Sequence[str], value: Sequence[Any]) -> bytes:
    """keccak256(keccak256(abi.encode(types, value))): the StandardMerkleTree leaf (= Solidity's
    `keccak256(bytes.concat(keccak256(abi.encode(...))))`)."""
    h = _hasher()
    return h(h(encode_leaf(types, value)))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """keccak256(sorted(a, b) concatenated): an inner node (OpenZeppelin `Hashes.commutativeKeccak256`)."""
    return keccak256(a + b if a < b else b + a)


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """Fold the proof into the leaf: node = hash_pair(node, sibling) for each sibling; returns the implied root."""
    h = _hasher()
    node = leaf
    for sibling in proof:
        node = h(node + sibling if node < sibling else sibling + node)
    return node


def verify(root: bytes | str, types: Sequence[str], value: Sequence[Any], proof: Sequence[bytes | str]) -> bool:
    """True when `value` (encoded as `types`) is a leaf under `root` with this `proof`."""
    r = _as_bytes(root, "root")
    return process_proof(leaf_hash(types, value), [_as_bytes(p, "proof node") for p in proof]) == r


def to_hex(b: bytes) -> str:
    """`0x` + lowercase hex (the JS library's node format)."""
    return "0x" + b.hex()


# ------------------------------------------------------------------------------------------------------ json values

def _to_json_value(typ: str, value: Any) -> Any:
    """A leaf field as the JS library's dump would hold it: ints as decimal strings, bytes as 0x hex."""
    if typ.endswith("]"):
        inner = typ[: typ.rindex("[")]
        return [_to_json_value(inner, v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return to_hex(bytes(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _from_json_value(typ: str, value: Any) -> Any:
    """Inverse of `_to_json_value`: ints back to int, bytes types to bytes, the rest unchanged."""
    if typ.endswith("]"):
        inner = typ[: typ.rindex("[")]
        if not isinstance(value, list):
            raise MerkleError(f"{typ}: expected a list in the dump, got {value!r}")
        return [_from_json_value(inner, v) for v in value]
    if _UINT_RE.match(typ) or _INT_RE.match(typ):
        return _as_int(value, typ)
    if typ == "bytes" or _BYTES_N_RE.match(typ):
        return _as_bytes(value, typ)
    return value


# ------------------------------------------------------------------------------------------------- tree building

@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a bulk build allocates millions of acyclic objects.

    Each new list or tuple counts towards the collector's thresholds, and its full passes walk every live object:
    building a 1M-leaf tree under it costs seconds of collection that can free nothing (leaves, nodes and
    values hold no reference cycles). Re-enabled on exit only if it was enabled on entry.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _inner_levels(n: int) -> Iterator[tuple[int, int]]:
    """Blocks [lo, hi) of inner node indices of a 2n-1 node tree, deepest first, whose children all lie at >= hi.

    Starts at hi = n-1 (inner nodes are 0..n-2) and halves: lo = hi // 2 makes 2*lo+1 >= hi, so every child
    (2j+1, 2j+2 for j in [lo, hi)) is a leaf or in an earlier block. About log2(n) blocks.
    """
    hi = n - 1
    while hi > 0:
        lo = hi // 2
        yield lo, hi
        hi = lo


def _hash_pairs(lefts: list[bytes], rights: list[bytes]) -> list[bytes]:
    """[hash_pair(a, b) for a, b in zip(lefts, rights)] (sorted-pair keccak; bytes compare is lexicographic)."""
    return keccak256_many([a + b if a < b else b + a for a, b in zip(lefts, rights)])


def _build_tree(hashes: list[bytes], sort_leaves: bool) -> tuple[list[bytes], list[int]]:
    """The node array and each value's tree index, from the values' leaf hashes (n >= 1).

    order = stable argsort(hashes) if sort_leaves else range(n)
    tree[2n-2-k] = hashes[order[k]];  tree_indices[order[k]] = 2n-2-k      # leaves, reversed, at the end
    tree[lo:hi] = hash_pairs(tree[2lo+1:2hi+1:2], tree[2lo+2:2hi+2:2])     # per block of `_inner_levels`

    Distinct hashes (the usual case) are sorted as plain bytes and placed through a hash -> tree index dict, all
    in C; with equal hashes (a value given twice) it takes the stable argsort and a Python loop, as the JS
    library orders ties.
    """
    n = len(hashes)
    last = 2 * n - 2
    tree: list[bytes] = [b""] * (n - 1)
    placed: dict[bytes, int] | None = None
    if sort_leaves:
        ascending = sorted(hashes)
        placed = dict(zip(ascending, range(last, n - 2, -1)))
        if len(placed) == n:
            tree.extend(reversed(ascending))
            tree_indices = list(map(placed.__getitem__, hashes))
        else:
            placed = None
    if placed is None:
        order = sorted(range(n), key=hashes.__getitem__) if sort_leaves else range(n)
        tree.extend(map(hashes.__getitem__, reversed(order)))
        tree_indices = [0] * n
        for k, value_index in enumerate(order):
            tree_indices[value_index] = last - k
    for lo, hi in _inner_levels(n):
        tree[lo:hi] = _hash_pairs(tree[2 * lo + 1:2 * hi + 1:2], tree[2 * lo + 2:2 * hi + 2:2])
    return tree, tree_indices


# ------------------------------------------------------------------------------------------------------- the tree

@dataclass
class StandardMerkleTree:
    """An OpenZeppelin-compatible Merkle tree over ABI-encoded values.

    `tree`: 2n-1 nodes (32 bytes each), `tree[0]` the root, leaves at the end in sorted-hash order reversed.
    `values[i]`: the i-th value as given to `of`; `tree_indices[i]`: where its leaf sits in `tree`.
    """

    tree: list[bytes]
    values: list[list[Any]]
    tree_indices: list[int]
    leaf_encoding: tuple[str, ...]
    _lookup: dict[bytes, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(
        cls, values: Sequence[Sequence[Any]], leaf_encoding: Sequence[str], *, sort_leaves: bool = True
    ) -> StandardMerkleTree:
        """Build the tree over `values` (each a sequence matching `leaf_encoding`), as the JS `StandardMerkleTree.of`.

        hashes[i] = leaf(values[i]); order = stable sort of i by hashes[i] (if sort_leaves);
        tree[2n-2-k] = hashes[order[k]]; tree[j] = hash_pair(tree[2j+1], tree[2j+2]) for j = n-2 .. 0.
        """
        types = tuple(leaf_encoding)
        if not values:
            raise MerkleError("cannot build a Merkle tree with no leaves")
        with gc_paused():
            hashes = leaf_hashes_of_encoded(_iter_encoded(types, values))
            tree, tree_indices = _build_tree(hashes, sort_leaves)
            copied = [list(v) for v in values]
        return cls(tree=tree, values=copied, tree_indices=tree_indices, leaf_encoding=types)

    @classmethod
    def from_leaf_hashes(
        cls,
        leaf_hashes: Sequence[bytes],
        values: Sequence[list[Any]],
        leaf_encoding: Sequence[str],
        *,
        sort_leaves: bool = True,
    ) -> StandardMerkleTree:
        """The tree `of(values, leaf_encoding)` would build, from leaf hashes the caller already computed.

        leaf_hashes[i] must be keccak256(keccak256(abi.encode(leaf_encoding, values[i]))) (32 bytes each): a
        caller with a faster encoder of its own (e.g. `loraledger.node.ledger.records`) skips the generic one. The leaves are not
        recomputed here (`validate()` does that); the tree keeps `values`' items as given (no copies), so callers
        must not mutate them afterwards.
        """
        types = tuple(leaf_encoding)
        n = len(leaf_hashes)
        if n == 0:
            raise MerkleError("cannot build a Merkle tree with no leaves")
        if len(values) != n:
            raise MerkleError(f"{n} leaf hashes but {len(values)} values: need one value per leaf")
        if set(map(len, leaf_hashes)) != {32}:
            raise MerkleError("every leaf hash must be 32 bytes (keccak256 of keccak256 of the ABI encoding)")
        with gc_paused():
            tree, tree_indices = _build_tree(list(map(bytes, leaf_hashes)), sort_leaves)
            kept = list(values)
        return cls(tree=tree, values=kept, tree_indices=tree_indices, leaf_encoding=types)

    # -------------------------------------------------------------- queries

    @property
    def root(self) -> bytes:
        """The 32-byte root."""
        return self.tree[0]

    @property
    def root_hex(self) -> str:
        """The root as `0x` + 64 hex."""
        return to_hex(self.tree[0])

    def __len__(self) -> int:
        return len(self.values)

    def entries(self) -> Iterator[tuple[int, list[Any]]]:
        """(value index, value) in the order given to `of`."""
        return iter(enumerate(self.values))

    def leaf_hash_of(self, value: Sequence[Any]) -> bytes:
        """The leaf hash `value` would have in this tree."""
        return leaf_hash(self.leaf_encoding, value)

    def index_of(self, value: Sequence[Any]) -> int:
        """Value index of `value`; MerkleError if it is not a leaf of this tree."""
        if self._lookup is None:
            self._lookup = {}
            for i, ti in enumerate(self.tree_indices):
                self._lookup.setdefault(self.tree[ti], i)
        try:
            return self._lookup[self.leaf_hash_of(value)]
        except KeyError:
            raise MerkleError(f"value {value!r} is not a leaf of this tree") from None

    def _value_index(self, leaf: int | Sequence[Any]) -> int:
        if isinstance(leaf, int):
            if isinstance(leaf, bool) or not 0 <= leaf < len(self.values):
                raise MerkleError(f"leaf index {leaf} out of range (tree has {len(self.values)} values)")
            return leaf
        return self.index_of(leaf)

    def get_proof(self, leaf: int | Sequence[Any]) -> list[bytes]:
        """Proof for the value at index `leaf` (or equal to `leaf`): sibling nodes from the leaf to the root."""
        j = self.tree_indices[self._value_index(leaf)]
        proof = []
        while j > 0:
            proof.append(self.tree[j + 1 if j % 2 else j - 1])
            j = (j - 1) // 2
        return proof

    def get_proof_hex(self, leaf: int | Sequence[Any]) -> list[str]:
        """`get_proof` as `0x` hex strings (the JS library's format)."""
        return [to_hex(p) for p in self.get_proof(leaf)]

    def verify(self, leaf: int | Sequence[Any], proof: Sequence[bytes | str]) -> bool:
        """True when `proof` leads from the leaf of `leaf` (index or value) to this tree's root."""
        value = self.values[self._value_index(leaf)] if isinstance(leaf, int) else leaf
        return verify(self.root, self.leaf_encoding, value, proof)

    def validate(self) -> None:
        """Recompute every leaf and inner node; MerkleError on the first mismatch."""
        n = len(self.values)
        if len(self.tree) != 2 * n - 1 or n == 0:
            raise MerkleError(f"tree has {len(self.tree)} nodes but {n} values (expected {2 * n - 1})")
        if len(self.tree_indices) != n:
            raise MerkleError(f"tree has {len(self.tree_indices)} tree indices but {n} values")
        with gc_paused():
            hashes = leaf_hashes_of_encoded(_iter_encoded(self.leaf_encoding, self.values))
        for i, (h, ti) in enumerate(zip(hashes, self.tree_indices)):
            if not n - 1 <= ti < 2 * n - 1:
                raise MerkleError(f"value {i} has tree index {ti}, not a leaf position")
            if self.tree[ti] != h:
                raise MerkleError(f"value {i} does not hash to the leaf at tree index {ti}")
        for lo, hi in _inner_levels(n):
            expected = _hash_pairs(self.tree[2 * lo + 1:2 * hi + 1:2], self.tree[2 * lo + 2:2 * hi + 2:2])
            if expected != self.tree[lo:hi]:
                j = next(lo + k for k, (x, y) in enumerate(zip(expected, self.tree[lo:hi])) if x != y)
                raise MerkleError(f"inner node {j} is not the hash of its children")

    # -------------------------------------------------------------- JSON

    def dump(self) -> dict[str, Any]:
        """The JS library's `dump()` format: {format, leafEncoding, tree: [hex], values: [{value, treeIndex}]}."""
        types = self.leaf_encoding
        return {
            "format": DUMP_FORMAT,
            "leafEncoding": list(types),
            "tree": [to_hex(node) for node in self.tree],
            "values": [
                {"value": [_to_json_value(t, f) for t, f in zip(types, v)], "treeIndex": ti}
                for v, ti in zip(self.values, self.tree_indices)
            ],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> StandardMerkleTree:
        """Read a `dump()` (ours or the JS library's) and validate it; MerkleError when malformed."""
        if data.get("format") != DUMP_FORMAT:
            raise MerkleError(f"unknown Merkle dump format {data.get('format')!r} (expected {DUMP_FORMAT!r})")
        try:
            types = tuple(str(t) for t in data["leafEncoding"])
            tree = [_as_bytes(node, "tree node") for node in data["tree"]]
            values = [[_from_json_value(t, f) for t, f in zip(types, entry["value"])] for entry in data["values"]]
            indices = [int(entry["treeIndex"]) for entry in data["values"]]
        except (KeyError, TypeError) as e:
            raise MerkleError(f"malformed Merkle dump: {e!r}") from e
        if any(len(node) != 32 for node in tree):
            raise MerkleError("malformed Merkle dump: every tree node must be 32 bytes")
        t = cls(tree=tree, values=values, tree_indices=indices, leaf_encoding=types)
        t.validate()
        return t
