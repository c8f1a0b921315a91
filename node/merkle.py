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

Speed: a 1M-leaf tree needs ~3M keccak calls; they go straight to pycryptodome's C keccak (one reusable state per
thread, no per-hash object), and leaves of static ABI types (address, uintN, intN, bytesN, bool) are encoded
without eth_abi. Dynamic types (arrays, string, bytes) fall back to `eth_abi.encode`.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak as _eth_keccak
from eth_utils import to_checksum_address

from node.errors import NodeError

DUMP_FORMAT = "standard-v1"

# Leaf encodings used by the contracts (kept here so every module builds the same leaves).
REWARD_LEAF_ENCODING: tuple[str, ...] = ("address", "uint256")
"""AttributionLedger rewards: (account, cumulativeAmount)."""
CONTRIBUTION_LEAF_ENCODING: tuple[str, ...] = ("address", "bytes32", "uint256")
"""DatanetRegistry contributions: (contributor, contributionHash, weight)."""
RECORD_LEAF_ENCODING: tuple[str, ...] = (
    "uint64", "bytes32", "uint256[]", "uint16[]", "uint32", "uint32", "uint256", "bytes32", "bytes32",
)
"""AttributionLedger records: (epoch, requestId, adapterIds, weightsBps, promptTokens, completionTokens, fee,
outputHash, attributionHash)."""


class MerkleError(NodeError, ValueError):
    """A Merkle tree could not be built, loaded or queried (bad value for its type, unknown leaf, bad dump)."""


# ----------------------------------------------------------------------------------------------------------- keccak

Hasher = Callable[[bytes], bytes]
_local = threading.local()


def _raw_keccak() -> Hasher | None:
    """A keccak256 over pycryptodome's C sponge with one reused state (None if that private API is absent).

    Per hash: reset(state); absorb(state, data); digest(state, out, 32, padding=0x01). Three C calls instead of
    building a hash object, about 2x faster than `Crypto.Hash.keccak.new`.
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

    # Self-check against eth_hash once, so a changed private API can never produce wrong hashes silently.
    if keccak(b"") != _eth_keccak(b"") or keccak(b"\x01" * 200) != _eth_keccak(b"\x01" * 200):
        return None
    return keccak


def _hasher() -> Hasher:
    """This thread's keccak256 function (fast C path when available, else eth_hash)."""
    h: Hasher | None = getattr(_local, "keccak", None)
    if h is None:
        h = _raw_keccak() or _eth_keccak
        _local.keccak = h
    return h


def keccak256(data: bytes) -> bytes:
    """keccak256(data) -> 32 bytes."""
    return _hasher()(data)


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
        n = len(values)
        if n == 0:
            raise MerkleError("cannot build a Merkle tree with no leaves")
        encode = make_leaf_encoder(types)
        h = _hasher()
        hashes = [h(h(encode(v))) for v in values]
        order = sorted(range(n), key=hashes.__getitem__) if sort_leaves else list(range(n))
        size = 2 * n - 1
        tree: list[bytes] = [b""] * size
        tree_indices = [0] * n
        for k, value_index in enumerate(order):
            tree[size - 1 - k] = hashes[value_index]
            tree_indices[value_index] = size - 1 - k
        for j in range(n - 2, -1, -1):
            a = tree[2 * j + 1]
            b = tree[2 * j + 2]
            tree[j] = h(a + b if a < b else b + a)
        return cls(tree=tree, values=[list(v) for v in values], tree_indices=tree_indices, leaf_encoding=types)

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
        encode = make_leaf_encoder(self.leaf_encoding)
        h = _hasher()
        for i, (v, ti) in enumerate(zip(self.values, self.tree_indices)):
            if not n - 1 <= ti < 2 * n - 1:
                raise MerkleError(f"value {i} has tree index {ti}, not a leaf position")
            if self.tree[ti] != h(h(encode(v))):
                raise MerkleError(f"value {i} does not hash to the leaf at tree index {ti}")
        for j in range(n - 2, -1, -1):
            a, b = self.tree[2 * j + 1], self.tree[2 * j + 2]
            if self.tree[j] != h(a + b if a < b else b + a):
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
