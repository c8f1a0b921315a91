"""Decode EVM revert data into the custom error that caused it, using the ABIs of all our contracts.

    revert data = selector(4 bytes) ++ abi.encode(args)
    selector    = keccak256("ErrorName(type1,type2,...)")[:4]

The decoder maps every selector found in the given ABIs (plus Solidity's built-in `Error(string)` and
`Panic(uint256)`) to its name and argument types, so a revert anywhere in a call chain (a ledger calling the
token, say) decodes by name even when the called contract's ABI is not the one that reverted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import abi_to_signature, get_abi_input_names, get_abi_input_types, keccak, to_checksum_address

ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
PANIC_SELECTOR = bytes.fromhex("4e487b71")  # Panic(uint256)


@dataclass(frozen=True)
class ErrorSpec:
    """One custom error: its name, canonical signature, argument names and ABI types."""

    name: str
    signature: str
    arg_names: tuple[str, ...]
    arg_types: tuple[str, ...]

    @property
    def selector(self) -> bytes:
        return keccak(text=self.signature)[:4]


@dataclass(frozen=True)
class DecodedRevert:
    """A decoded revert: `name` is None when the selector is unknown (then `raw` holds the data)."""

    name: str | None
    args: tuple[object, ...]
    arg_names: tuple[str, ...]
    raw: bytes

    def describe(self) -> str:
        """`Name(arg=value, ...)`, `Error("reason")`, or the raw hex when unknown."""
        if self.name is None:
            return f"unknown revert data 0x{self.raw.hex()}" if self.raw else "revert without data"
        parts = [f"{n}={_fmt(v)}" if n else _fmt(v) for n, v in zip(self.arg_names, self.args)]
        return f"{self.name}({', '.join(parts)})"


def _fmt(v: object) -> str:
    if isinstance(v, bytes):
        return "0x" + v.hex()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _checksum(abi_type: str, value: object) -> object:
    """Addresses come out of eth_abi lowercase; give them (and address arrays) EIP-55 checksums."""
    if abi_type == "address" and isinstance(value, str):
        return to_checksum_address(value)
    if abi_type.startswith("address[") and isinstance(value, (list, tuple)):
        inner = abi_type[abi_type.index("]") + 1:] or ""
        return type(value)(_checksum("address" + inner, v) for v in value)
    return value


def revert_data_bytes(data: object) -> bytes:
    """Normalise revert data as web3 and nodes report it (`0x..`, `Reverted 0x..`, `{"data": ..}`) to bytes."""
    if data is None:
        return b""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, Mapping):
        inner = data.get("data")
        return revert_data_bytes(inner) if inner is not None else b""
    if isinstance(data, str):
        text = data.strip()
        if text.startswith("Reverted "):
            text = text.split(" ", 1)[1]
        if text.startswith("0x"):
            try:
                return bytes.fromhex(text[2:])
            except ValueError:
                return b""
    return b""


class ErrorDecoder:
    """selector -> ErrorSpec over a set of ABIs; `decode(data)` -> DecodedRevert."""

    def __init__(self, abis: Iterable[Sequence[Mapping[str, Any]]] = ()) -> None:
        self._by_selector: dict[bytes, ErrorSpec] = {}
        for abi in abis:
            self.add_abi(abi)

    def add_abi(self, abi: Sequence[Mapping[str, Any]]) -> None:
        """Register every `type == "error"` entry of `abi` (duplicates across contracts are the same error)."""
        for entry in abi:
            if entry.get("type") != "error":
                continue
            spec = ErrorSpec(
                name=str(entry["name"]),
                signature=abi_to_signature(entry),  # type: ignore[arg-type]
                arg_names=tuple(get_abi_input_names(entry)),  # type: ignore[arg-type]
                arg_types=tuple(get_abi_input_types(entry)),  # type: ignore[arg-type]
            )
            self._by_selector.setdefault(spec.selector, spec)

    @classmethod
    def from_artifacts(cls, artifacts_dir: str | Path) -> ErrorDecoder:
        """A decoder over the `abi` of every `*.json` artifact in `artifacts_dir` (empty if the dir is missing)."""
        abis: list[Sequence[Mapping[str, Any]]] = []
        directory = Path(artifacts_dir)
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                doc = json.loads(path.read_text())
                if isinstance(doc, dict) and isinstance(doc.get("abi"), list):
                    abis.append(doc["abi"])
        return cls(abis)

    def __len__(self) -> int:
        return len(self._by_selector)

    def decode(self, data: object) -> DecodedRevert:
        """Split `data` into selector and args and decode with the matching spec.

        Error(string) -> name "Error", args (reason,); Panic(uint256) -> "Panic", (code,); unknown -> name None.
        """
        raw = revert_data_bytes(data)
        if len(raw) < 4:
            return DecodedRevert(None, (), (), raw)
        selector, body = raw[:4], raw[4:]
        if selector == ERROR_STRING_SELECTOR:
            spec = ErrorSpec("Error", "Error(string)", ("reason",), ("string",))
        elif selector == PANIC_SELECTOR:
            spec = ErrorSpec("Panic", "Panic(uint256)", ("code",), ("uint256",))
        else:
            found = self._by_selector.get(selector)
            if found is None:
                return DecodedRevert(None, (), (), raw)
            spec = found
        try:
            args = tuple(_checksum(t, v) for t, v in zip(spec.arg_types, abi_decode(list(spec.arg_types), body)))
        except (DecodingError, ValueError, OverflowError):
            return DecodedRevert(spec.name, (), (), raw)
        return DecodedRevert(spec.name, args, spec.arg_names, raw)
