"""Domain types of the chain half: ids, hashes, amounts, and the receipts the chain client returns.

NewTypes cost nothing at run time and let mypy catch an adapter id passed where a datanet id belongs.
The `as_*` helpers validate and normalise untrusted input (CLI, JSON) into these types.
"""

from __future__ import annotations

import re
from typing import NewType, TypedDict

from eth_typing import ChecksumAddress
from eth_utils import is_address, to_checksum_address

from loraledger.node.errors import ConfigError

Address = NewType("Address", ChecksumAddress)
"""An EIP-55 checksummed 20-byte address, `0x` + 40 hex."""

Bytes32 = NewType("Bytes32", str)
"""A 32-byte value (sha256 content hash, Merkle root) written `0x` + 64 lowercase hex."""

Wei = NewType("Wei", int)
"""An amount in the smallest unit of a token or of ether."""

AdapterId = NewType("AdapterId", int)
"""The AdapterRegistry's uint256 counter id of an adapter."""

DatanetId = NewType("DatanetId", int)
"""The DatanetRegistry's uint256 counter id of a datanet."""

TxHash = NewType("TxHash", str)
"""A transaction hash, `0x` + 64 lowercase hex."""

ZERO_BYTES32 = Bytes32("0x" + "00" * 32)
_BYTES32_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")


def as_address(value: str) -> Address:
    """Validate a hex address (any case) and return it checksummed; ConfigError if malformed."""
    if not isinstance(value, str) or not is_address(value):
        raise ConfigError(f"not an Ethereum address: {value!r} (expected 0x + 40 hex digits)")
    return Address(ChecksumAddress(to_checksum_address(value)))


def as_bytes32(value: str | bytes) -> Bytes32:
    """Validate `0x` + 64 hex (or 32 raw bytes) and return lowercase `0x` + 64 hex; ConfigError otherwise."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise ConfigError(f"bytes32 needs exactly 32 bytes, got {len(value)}")
        return Bytes32("0x" + bytes(value).hex())
    if not isinstance(value, str) or not _BYTES32_RE.match(value):
        raise ConfigError(f"not a bytes32 value: {value!r} (expected 0x + 64 hex digits)")
    return Bytes32(value.lower())


def bytes32_to_bytes(value: Bytes32 | str) -> bytes:
    """The 32 raw bytes of a `0x` + 64 hex value."""
    return bytes.fromhex(as_bytes32(value)[2:])


def as_wei(value: int | str) -> Wei:
    """A non-negative integer amount (decimal string or int) below 2**256; ConfigError otherwise."""
    try:
        n = int(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"not an integer amount: {value!r}") from e
    if not 0 <= n < 2**256:
        raise ConfigError(f"amount {n} out of uint256 range")
    return Wei(n)


class LogEntry(TypedDict):
    """One decoded event: the emitting contract, the event name and its arguments."""

    address: Address
    event: str
    args: dict[str, object]


class TxResult(TypedDict):
    """What the typed contract wrappers return for a mined transaction."""

    tx_hash: TxHash
    block_number: int
    gas_used: int
    effective_gas_price: Wei
    events: list[LogEntry]
