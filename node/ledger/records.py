"""Attribution records: one per finished request, the unit every reward is computed from and proven against.

    record = AttributionRecord.create(request_id=..., adapter_ids=[3, 7], weights_bps=[7000, 3000],
                                      prompt_tokens=12, completion_tokens=40, fee=fee,
                                      output_hash=sha256(output), contributors=[(addr, weight), ...])
    domain = RecordDomain(chain_id, ledger_address, operator)
    leaf = record.with_epoch(5).leaf_hash(domain)  # what the records tree and `AttributionLedger.recordLeaf` give

The on-chain record is the ABI tuple of docs/ARCHITECTURE.md ("Attribution record and reward math"), prefixed by
its domain (the chain, the ledger and the operator whose stream it belongs to):

    (uint256 chainId, address ledger, address operator,
     uint64 epoch, bytes32 requestId, uint256[] adapterIds, uint16[] weightsBps, uint32 promptTokens,
     uint32 completionTokens, uint256 fee, bytes32 outputHash, bytes32 attributionHash)

and its Merkle leaf is OpenZeppelin StandardMerkleTree's, hashed twice so a leaf can never pose as a node:

    leaf = keccak256(bytes.concat(keccak256(abi.encode(chainId, ledger, operator, epoch, ..., attributionHash))))

The ledger computes this leaf itself from the record's fields (`verifyRecord` takes the fields, never a leaf), so
a root or an inner node cannot pass as a record, and a record of one operator, ledger or chain proves nothing
under another. Before it is settled a record is named by `content_hash()`, the same hashing over the fields
without the domain (epoch 0).

`attributionHash` commits to the full contributor list the node serves beside the record:

    contributors sorted by address (as a 160-bit number), no duplicates, every weight > 0
    attributionHash = keccak256(abi.encode(address[] accounts, uint256[] weights))

A contributor's `weight` is its share of the record's data pool: the pool splits pro rata to the weights (see
`loraledger.node.ledger.rewards`). The accounts are contributor identities, not payout addresses: payout rotation and suspension
are applied when the epoch closes, from the ContributorRegistry as it is then.

A record is appended with `epoch = 0` (unassigned); settlement assigns the epoch with `with_epoch(n)`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any

from loraledger.node.errors import NodeError
from loraledger.node.ledger.merkle import (
    RECORD_LEAF_ENCODING,
    StandardMerkleTree,
    gc_paused,
    keccak256,
    leaf_hashes_of_encoded,
)
from loraledger.node.types import AdapterId, Address, Bytes32, Wei, as_address, as_bytes32

BPS = 10_000
"""Basis points in a whole: adapter weights of a record sum to this."""

RECORD_LEAF_TYPES: tuple[str, ...] = RECORD_LEAF_ENCODING
"""ABI types of one record leaf, in order (the StandardMerkleTree `leafEncoding` of the records tree)."""

UNASSIGNED_EPOCH = 0

_U64 = 2**64
_U32 = 2**32
_U16 = 2**16
_U256 = 2**256


class RecordError(NodeError, ValueError):
    """An attribution record is malformed (the message names the field and the rule it breaks)."""


Contributor = tuple[Address, int]
"""One `(contributor account, weight)` pair of a record's contributor list."""


def _word(n: int) -> bytes:
    return n.to_bytes(32, "big")


@dataclass(frozen=True)
class RecordDomain:
    """Whose stream a record's leaf belongs to: the chain, the AttributionLedger and the operator."""

    chain_id: int
    ledger: Address
    operator: Address

    def __post_init__(self) -> None:
        if not 0 < self.chain_id < _U256:
            raise RecordError(f"chain id {self.chain_id} must be in 1..2**256-1")
        object.__setattr__(self, "ledger", as_address(self.ledger))
        object.__setattr__(self, "operator", as_address(self.operator))

    @cached_property
    def prefix(self) -> bytes:
        """abi.encode(chainId, ledger, operator): the first three words of every leaf of this domain (computed
        once per domain: every record's leaf starts with it)."""
        return (_word(self.chain_id) + bytes(12) + bytes.fromhex(self.ledger[2:])
                + bytes(12) + bytes.fromhex(self.operator[2:]))

    def values(self) -> list[Any]:
        return [self.chain_id, self.ledger, self.operator]

    def to_json(self) -> dict[str, Any]:
        return {"chainId": self.chain_id, "ledger": self.ledger, "operator": self.operator}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RecordDomain:
        try:
            return cls(int(d["chainId"]), as_address(str(d["ledger"])), as_address(str(d["operator"])))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"malformed record domain ({e!r}): {json.dumps(dict(d))[:200]}") from e


_DOMAIN_SHIFT = 96  # the domain's three words ahead of the record's: every dynamic offset moves by this


@lru_cache(maxsize=64)
def _record_layout(n: int) -> struct.Struct:
    """The record's ABI encoding for n adapters as one big-endian struct (`Nx` = N zero bytes of padding):

    epoch u64 | requestId | off 288 | off 320+32n | prompt u32 | completion u32 | fee (32 bytes) |
    outputHash ++ attributionHash (64 bytes) | n | n adapter ids (32 bytes each) | n | n weights u16, every
    number right-aligned in its 32-byte word.
    """
    return struct.Struct(">24xQ32s24xQ24xQ28xI28xI32s64s24xQ" + "32s" * n + "24xQ" + "30xH" * n)


_ONE_ADAPTER_LAYOUT = _record_layout(1)  # the common case, without the cache lookup


@lru_cache(maxsize=1 << 16)
def _checksum(account: str) -> Address:
    """as_address, memoised: contributor sets repeat across records and EIP-55 costs a keccak each time."""
    return as_address(account)


def sort_contributors(contributors: Iterable[tuple[str, int]] | Mapping[Any, int]) -> tuple[Contributor, ...]:
    """Normalise a contributor list: checksummed addresses, duplicates summed, zero weights dropped, sorted.

    out = sorted({as_address(a): sum(w for a' == a)} items with w > 0, key = int(address, 16))
    """
    items = contributors.items() if isinstance(contributors, Mapping) else contributors
    merged: dict[Address, int] = {}
    for account, weight in items:
        w = int(weight)
        if w < 0:
            raise RecordError(f"contributor {account} has negative weight {w}")
        a = _checksum(account)
        merged[a] = merged.get(a, 0) + w
    return tuple(sorted(((a, w) for a, w in merged.items() if w > 0), key=lambda aw: int(aw[0], 16)))


def attribution_hash(contributors: Sequence[Contributor]) -> Bytes32:
    """keccak256(abi.encode(address[] accounts, uint256[] weights)) of an already sorted contributor list.

    The list must be as `sort_contributors` returns it (strictly increasing addresses, weights > 0);
    RecordError otherwise, so that one list has exactly one hash.
    """
    _check_sorted(contributors)
    return Bytes32("0x" + keccak256(_encode_contributors(contributors)).hex())


def _encode_contributors(contributors: Sequence[Contributor]) -> bytes:
    """abi.encode(address[] accounts, uint256[] weights), written directly:
    [off=64, off=96+32n, n, accounts (left-padded)..., n, weights...]."""
    n = len(contributors)
    parts = [_word(64), _word(96 + 32 * n), _word(n)]
    parts.extend(b"\x00" * 12 + bytes.fromhex(a[2:]) for a, _ in contributors)
    parts.append(_word(n))
    parts.extend(_word(int(w)) for _, w in contributors)
    return b"".join(parts)


def _check_sorted(contributors: Sequence[Contributor]) -> None:
    prev = -1
    for account, weight in contributors:
        n = int(account, 16)
        if n <= prev:
            raise RecordError("contributors must be sorted by address without duplicates (use sort_contributors)")
        if not 0 < int(weight) < _U256:
            raise RecordError(f"contributor {account} weight {weight} must be in 1..2**256-1")
        prev = n


@dataclass(frozen=True)
class AttributionRecord:
    """One finished request: what was served, by which adapters, at what fee, shaped by whom.

    Fields mirror the ABI tuple (module docstring); `contributors` is the sorted `(account, weight)` list that
    `attribution_hash` commits to. Hex values are `0x` + lowercase hex; addresses checksummed.
    """

    epoch: int
    request_id: Bytes32
    adapter_ids: tuple[AdapterId, ...]
    weights_bps: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    fee: Wei
    output_hash: Bytes32
    attribution_hash: Bytes32
    contributors: tuple[Contributor, ...]

    @classmethod
    def create(
        cls,
        *,
        request_id: str | bytes,
        adapter_ids: Sequence[AdapterId | int],
        weights_bps: Sequence[int],
        prompt_tokens: int,
        completion_tokens: int,
        fee: int,
        output_hash: str | bytes,
        contributors: Iterable[tuple[str, int]] | Mapping[Any, int],
        epoch: int = UNASSIGNED_EPOCH,
    ) -> AttributionRecord:
        """Build a validated record; the contributor list is normalised and its hash computed here."""
        contribs = sort_contributors(contributors)
        record = cls(
            epoch=int(epoch),
            request_id=as_bytes32(request_id),
            adapter_ids=tuple(AdapterId(int(i)) for i in adapter_ids),
            weights_bps=tuple(int(w) for w in weights_bps),
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            fee=Wei(int(fee)),
            output_hash=as_bytes32(output_hash),
            attribution_hash=attribution_hash(contribs),
            contributors=contribs,
        )
        record._validate_fields()
        return record

    def validate(self) -> None:
        """Check every field's range and rule; RecordError names the first that fails.

        Rules: uint widths; 1+ adapters, ids > 0 and distinct; weights_bps in 1..10000 summing to 10000;
        attribution_hash == attribution_hash(contributors).
        """
        self._validate_fields()
        expected = attribution_hash(self.contributors)
        if expected != self.attribution_hash:
            raise RecordError(f"record {self.request_id}: attribution_hash {self.attribution_hash} does not "
                              f"commit to its contributor list (expected {expected})")

    def _validate_fields(self) -> None:
        """Every rule of `validate` but the attribution hash."""
        if not 0 <= self.epoch < _U64:
            raise RecordError(f"epoch {self.epoch} out of uint64 range")
        if not self.adapter_ids:
            raise RecordError(f"record {self.request_id} names no adapter")
        if len(self.adapter_ids) != len(self.weights_bps):
            raise RecordError(
                f"record {self.request_id}: {len(self.adapter_ids)} adapter ids but {len(self.weights_bps)} weights")
        if len(set(self.adapter_ids)) != len(self.adapter_ids):
            raise RecordError(f"record {self.request_id}: an adapter id appears twice in {self.adapter_ids}")
        for i in self.adapter_ids:
            if not 0 < i < _U256:
                raise RecordError(f"record {self.request_id}: adapter id {i} must be in 1..2**256-1")
        for w in self.weights_bps:
            if not 0 < w <= BPS:
                raise RecordError(f"record {self.request_id}: adapter weight {w} bps must be in 1..{BPS}")
        if sum(self.weights_bps) != BPS:
            raise RecordError(f"record {self.request_id}: adapter weights {self.weights_bps} sum to "
                              f"{sum(self.weights_bps)}, not {BPS}")
        for name in ("prompt_tokens", "completion_tokens"):
            v = getattr(self, name)
            if not 0 <= v < _U32:
                raise RecordError(f"record {self.request_id}: {name} {v} out of uint32 range")
        if not 0 <= self.fee < _U256:
            raise RecordError(f"record {self.request_id}: fee {self.fee} out of uint256 range")

    def with_epoch(self, epoch: int) -> AttributionRecord:
        """The same record assigned to `epoch`."""
        if not 0 < epoch < _U64:
            raise RecordError(f"epoch {epoch} must be in 1..2**64-1")
        return replace(self, epoch=int(epoch))

    @property
    def tokens(self) -> int:
        """promptTokens + completionTokens."""
        return self.prompt_tokens + self.completion_tokens

    def leaf_values(self, domain: RecordDomain) -> list[Any]:
        """The leaf tuple as ABI values (bytes32 as hex strings), in `RECORD_LEAF_TYPES` order."""
        return [*domain.values(), self.epoch, self.request_id, list(self.adapter_ids), list(self.weights_bps),
                self.prompt_tokens, self.completion_tokens, int(self.fee), self.output_hash, self.attribution_hash]

    def ledger_tuple(self) -> tuple[Any, ...]:
        """The record as `AttributionLedger.Record` (requestId, adapterIds, weightsBps, promptTokens,
        completionTokens, fee, outputHash, attributionHash), for web3 calls."""
        return (bytes.fromhex(self.request_id[2:]), [int(i) for i in self.adapter_ids], list(self.weights_bps),
                self.prompt_tokens, self.completion_tokens, int(self.fee), bytes.fromhex(self.output_hash[2:]),
                bytes.fromhex(self.attribution_hash[2:]))

    def abi_encode(self, domain: RecordDomain | None = None) -> bytes:
        """abi.encode(chainId, ledger, operator, epoch, requestId, adapterIds, weightsBps, promptTokens,
        completionTokens, fee, outputHash, attributionHash) for `domain`; without a domain, the same encoding
        of the nine record fields alone (what `content_hash` hashes).

        Written directly because it runs per record: domain.prefix (3 words), then
        head = [epoch, requestId, off(adapterIds)=s+288, off(weightsBps)=s+288+32*(1+n), prompt, completion, fee,
                outputHash, attributionHash]; tail = [n, ids...] + [n, weights...]   (s = 96 with a domain, else 0)
        One `struct.pack` per record (`_record_layout(n)`); its range checks (uint64/uint32/uint16) and
        `int.to_bytes` (uint256) reject out-of-range fields, as RecordError.
        """
        if domain is None:
            return self._encode_fields(0)
        return domain.prefix + self._encode_fields(_DOMAIN_SHIFT)

    def _encode_fields(self, shift: int) -> bytes:
        """The nine record fields' ABI encoding with dynamic offsets counted from `shift` bytes before it."""
        ids = self.adapter_ids
        weights = self.weights_bps
        n = len(ids)
        try:
            request_id = bytes.fromhex(self.request_id[2:])
            hashes = bytes.fromhex(self.output_hash[2:] + self.attribution_hash[2:])  # outputHash | attributionHash
            if len(request_id) != 32 or len(hashes) != 64 or len(self.output_hash) != 66 or len(weights) != n:
                raise ValueError(f"requestId, outputHash and attributionHash must be 32 bytes each and there must "
                                 f"be one weight per adapter ({n} ids, {len(weights)} weights)")
            if n == 1:
                return _ONE_ADAPTER_LAYOUT.pack(
                    self.epoch, request_id, shift + 288, shift + 352, self.prompt_tokens, self.completion_tokens,
                    self.fee.to_bytes(32, "big"), hashes, 1, ids[0].to_bytes(32, "big"), 1, weights[0])
            return _record_layout(n).pack(
                self.epoch, request_id, shift + 288, shift + 320 + 32 * n, self.prompt_tokens, self.completion_tokens,
                self.fee.to_bytes(32, "big"), hashes, n, *[i.to_bytes(32, "big") for i in ids], n, *weights)
        except (struct.error, OverflowError, ValueError, TypeError, AttributeError) as e:
            raise RecordError(f"record {self.request_id} cannot be ABI-encoded: {e} (check its field ranges)") from e

    def leaf_hash(self, domain: RecordDomain) -> bytes:
        """keccak256(bytes.concat(keccak256(abi_encode(domain)))): the StandardMerkleTree leaf (32 bytes)."""
        return keccak256(keccak256(self.abi_encode(domain)))

    def content_hash(self) -> bytes:
        """keccak256(bytes.concat(keccak256(abi_encode()))) with epoch 0: the record's name, the same before and
        after it is assigned an epoch (what a response reports as its record hash)."""
        unassigned = self if self.epoch == UNASSIGNED_EPOCH else replace(self, epoch=UNASSIGNED_EPOCH)
        return keccak256(keccak256(unassigned.abi_encode()))

    # ----- serialisation (log rows, epoch files)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (uint256 values as decimal strings, so no JSON reader loses precision)."""
        return {
            "epoch": self.epoch,
            "requestId": self.request_id,
            "adapterIds": [str(i) for i in self.adapter_ids],
            "weightsBps": list(self.weights_bps),
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "fee": str(int(self.fee)),
            "outputHash": self.output_hash,
            "attributionHash": self.attribution_hash,
            "contributors": [[a, str(w)] for a, w in self.contributors],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AttributionRecord:
        """Inverse of `to_json`, without re-validating (callers verify leaves against roots instead)."""
        try:
            return cls(
                epoch=int(d["epoch"]),
                request_id=as_bytes32(d["requestId"]),
                adapter_ids=tuple(AdapterId(int(i)) for i in d["adapterIds"]),
                weights_bps=tuple(int(w) for w in d["weightsBps"]),
                prompt_tokens=int(d["promptTokens"]),
                completion_tokens=int(d["completionTokens"]),
                fee=Wei(int(d["fee"])),
                output_hash=as_bytes32(d["outputHash"]),
                attribution_hash=as_bytes32(d["attributionHash"]),
                contributors=tuple((_checksum(str(a)), int(w)) for a, w in d["contributors"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"malformed record JSON ({e!r}): {json.dumps(d)[:200]}") from e


def records_tree(records: Sequence[AttributionRecord], domain: RecordDomain) -> StandardMerkleTree:
    """The StandardMerkleTree over `records` in `domain` (leaf encoding `RECORD_LEAF_TYPES`), the same tree as
    `StandardMerkleTree.of([r.leaf_values(domain) for r in records], RECORD_LEAF_TYPES)`, with the leaves encoded
    by the fast `abi_encode` (the generic encoder goes through eth_abi for the dynamic arrays):

    leaves = [keccak256(keccak256(r.abi_encode(domain))) for r in records]  # hashed in bulk, C-level loop
    tree   = StandardMerkleTree.from_leaf_hashes(leaves, [r.leaf_values(domain) ...], RECORD_LEAF_TYPES)
    """
    if not records:
        raise RecordError("an epoch's records tree needs at least one record")
    with gc_paused():
        leaves = leaf_hashes_of_encoded(r.abi_encode(domain) for r in records)  # streamed: no list of encodings
        values = [r.leaf_values(domain) for r in records]
    return StandardMerkleTree.from_leaf_hashes(leaves, values, RECORD_LEAF_TYPES)
