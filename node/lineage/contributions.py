"""Contributions: one contributor's signed JSONL file, the unit a datanet is built from.

Contribution format
-------------------
A contribution is a UTF-8 JSONL file, one record per line, each exactly one of

    {"text": "..."}                              plain text
    {"prompt": "...", "completion": "..."}       an instruction pair (the loss goes on the completion)

Beside each file `x.jsonl` lies `x.jsonl.sig.json`, written by `sign_contribution`:

    {"version": 1, "file": "x.jsonl", "sha256": "0x<64 hex>", "contributor": "0x<checksummed>",
     "signature": "0x<65 bytes r||s||v>"}

The signature is EIP-191 `personal_sign` by the contributor's key over the text

    "loraledger contribution v1\\nsha256: 0x<64 lowercase hex of sha256(file bytes)>"

(a fixed prefix, so that it can never pass for any other signed message; readable text, so that any wallet's
personal_sign can make it). Verifying recovers the signer from the signature and the file's *actual* sha256: a
changed file or another key gives another address, and the file is refused.

A line parses into a `ContributionLine`; `parse_records` reads a whole file under `ContributionLimits`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address

from loraledger.node.errors import NodeError
from loraledger.node.types import Address, Bytes32

SIG_SUFFIX = ".sig.json"


CONTRIBUTION_SUFFIX = ".jsonl"


SIGNATURE_VERSION = 1


MESSAGE_PREFIX = "loraledger contribution v1\nsha256: "


class ContributionError(NodeError, ValueError):
    """A contribution file or its signature is invalid; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class ContributionLimits:
    """Size limits a datanet enforces on each contribution (defaults suit text corpora, not media)."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_record_bytes: int = 1024 * 1024
    max_records: int = 1_000_000

    def to_dict(self) -> dict[str, int]:
        return {
            "max_file_bytes": self.max_file_bytes,
            "max_record_bytes": self.max_record_bytes,
            "max_records": self.max_records,
        }


@dataclass(frozen=True)
class ContributionLine:
    """One training record: `prompt` is "" for a plain-text record, whose whole text is `completion`."""

    prompt: str
    completion: str

    def to_json(self) -> dict[str, str]:
        """The record as it appears in a contribution file."""
        if self.prompt == "":
            return {"text": self.completion}
        return {"prompt": self.prompt, "completion": self.completion}

    def key(self) -> str:
        """Duplicate key: `0x` sha256 of the canonical JSON of `to_json()` (sorted keys, no spaces)."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "0x" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ContributionSignature:
    """The parsed `.sig.json` of a contribution."""

    file: str
    sha256: Bytes32
    contributor: Address
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SIGNATURE_VERSION,
            "file": self.file,
            "sha256": self.sha256,
            "contributor": self.contributor,
            "signature": self.signature,
        }


def sha256_hex(data: bytes) -> Bytes32:
    """`0x` + 64 hex of sha256(data)."""
    return Bytes32("0x" + hashlib.sha256(data).hexdigest())


def signing_text(file_sha256: str) -> str:
    """The exact text a contributor personal_signs for a file whose sha256 is `file_sha256` (`0x` hex)."""
    return MESSAGE_PREFIX + file_sha256.lower()


def signature_path(path: str | os.PathLike[str]) -> Path:
    """`x.jsonl` -> `x.jsonl.sig.json`."""
    p = Path(path)
    return p.with_name(p.name + SIG_SUFFIX)


def sign_contribution(
    path: str | os.PathLike[str], account: LocalAccount, *, overwrite: bool = False
) -> Path:
    """Sign the file at `path` with `account` and write `path.sig.json`; returns the signature path.

    The file is parsed first (a contributor should not sign a file every datanet would refuse).
    """
    p = Path(path)
    if not p.is_file():
        raise ContributionError(f"{p}: no such file to sign")
    data = p.read_bytes()
    parse_records(data, p.name)
    digest = sha256_hex(data)
    signed = account.sign_message(encode_defunct(text=signing_text(digest)))
    sig = ContributionSignature(
        file=p.name,
        sha256=digest,
        contributor=Address(account.address),
        signature="0x" + bytes(signed.signature).hex(),
    )
    out = signature_path(p)
    if out.exists() and not overwrite:
        raise ContributionError(f"{out} already exists; remove it first to sign {p.name} again")
    out.write_text(json.dumps(sig.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out


def read_signature(sig_path: str | os.PathLike[str]) -> ContributionSignature:
    """Parse a `.sig.json`; ContributionError naming the missing or malformed field."""
    p = Path(sig_path)
    if not p.is_file():
        raise ContributionError(
            f"no signature file {p.name}; sign the contribution with "
            f"`loraledger contribution sign --key-file KEY {p.name[: -len(SIG_SUFFIX)]}`"
        )
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContributionError(f"{p.name}: signature file is not JSON ({e})") from e
    if not isinstance(d, dict) or d.get("version") != SIGNATURE_VERSION:
        raise ContributionError(f"{p.name}: not a version-{SIGNATURE_VERSION} contribution signature")
    for key in ("file", "sha256", "contributor", "signature"):
        if not isinstance(d.get(key), str):
            raise ContributionError(f"{p.name}: field {key!r} missing or not a string")
    if not is_address(d["contributor"]):
        raise ContributionError(f"{p.name}: contributor {d['contributor']!r} is not an address")
    digest = d["sha256"].lower()
    if len(digest) != 66 or not digest.startswith("0x"):
        raise ContributionError(f"{p.name}: sha256 {d['sha256']!r} is not 0x + 64 hex")
    return ContributionSignature(
        file=d["file"],
        sha256=Bytes32(digest),
        contributor=Address(to_checksum_address(d["contributor"])),
        signature=d["signature"],
    )


def recover_signer(file_sha256: str, signature: str) -> Address:
    """The address whose key produced `signature` over `signing_text(file_sha256)`; ContributionError if
    malformed."""
    try:
        addr = Account.recover_message(encode_defunct(text=signing_text(file_sha256)), signature=signature)
    except (ValueError, TypeError) as e:
        raise ContributionError(f"signature {signature[:18]}... is malformed ({e})") from e
    return Address(to_checksum_address(addr))


def verify_contribution(data: bytes, sig: ContributionSignature, name: str) -> Address:
    """Check that `sig` signs exactly `data` and was made by `sig.contributor`; returns that address.

    Refuses (ContributionError) when the file's sha256 is not the signed one (file changed after signing) or
    the signature recovers another address (signed with another key than the one claimed).
    """
    actual = sha256_hex(data)
    if sig.file != name:
        raise ContributionError(
            f"{name}: its signature file names {sig.file!r}; the signature belongs to another file"
        )
    if actual != sig.sha256:
        raise ContributionError(
            f"{name}: file sha256 {actual} differs from the signed {sig.sha256} "
            "(the file was changed after signing; sign it again)"
        )
    signer = recover_signer(actual, sig.signature)
    if signer != sig.contributor:
        raise ContributionError(
            f"{name}: signature was made by {signer}, not by the claimed contributor {sig.contributor}"
        )
    return signer


def parse_records(data: bytes, name: str, limits: ContributionLimits | None = None) -> list[ContributionLine]:
    """Parse JSONL bytes into records, enforcing UTF-8, the two schemas and `limits`.

    One JSON object per line; a final newline is optional; empty lines, unknown keys, non-string or empty
    values are refused with the 1-based line number. An empty file (no record) is refused.
    """
    lim = limits or ContributionLimits()
    if len(data) > lim.max_file_bytes:
        raise ContributionError(f"{name}: {len(data)} bytes exceeds the limit of {lim.max_file_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = data[: e.start].count(b"\n") + 1
        raise ContributionError(f"{name}: line {bad_line} is not valid UTF-8 (byte {e.start})") from e
    if text.startswith("\ufeff"):
        raise ContributionError(f"{name}: starts with a byte-order mark; save it as UTF-8 without BOM")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ContributionError(f"{name}: no records (an empty contribution credits nothing)")
    if len(lines) > lim.max_records:
        raise ContributionError(f"{name}: {len(lines)} records exceed the limit of {lim.max_records}")
    records = []
    for i, line in enumerate(lines, start=1):
        if len(line.encode("utf-8")) > lim.max_record_bytes:
            raise ContributionError(f"{name}: line {i} is longer than {lim.max_record_bytes} bytes")
        records.append(_parse_line(line.rstrip("\r"), name, i))
    return records


# Characters `str.splitlines` treats as line ends that JSON allows raw inside strings: refused, so that every
# reader numbers the lines of a contribution the same way.
_AMBIGUOUS_BREAKS = ("\x85", "\u2028", "\u2029")


def _parse_line(line: str, name: str, lineno: int) -> ContributionLine:
    where = f"{name}: line {lineno}"
    if not line.strip():
        raise ContributionError(f"{where} is empty; remove blank lines")
    if any(c in line for c in _AMBIGUOUS_BREAKS):
        raise ContributionError(
            f"{where} holds a raw U+0085/U+2028/U+2029 line separator; write it escaped "
            "(\\u2028) so that every reader sees the same lines"
        )
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ContributionError(f"{where} is not JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise ContributionError(f"{where} is not a JSON object")
    keys = set(obj)
    fields: tuple[str, ...]
    if keys == {"text"}:
        fields = ("text",)
    elif keys == {"prompt", "completion"}:
        fields = ("prompt", "completion")
    else:
        raise ContributionError(
            f'{where} has keys {sorted(keys)}; expected {{"text"}} or {{"prompt", "completion"}}'
        )
    for f in fields:
        if not isinstance(obj[f], str) or obj[f] == "":
            raise ContributionError(f"{where}: {f!r} must be a non-empty string")
    if fields == ("text",):
        return ContributionLine(prompt="", completion=obj["text"])
    return ContributionLine(prompt=obj["prompt"], completion=obj["completion"])
