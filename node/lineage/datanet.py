"""Datanets: signed contributions -> validated, deduplicated, weighted -> one Merkle root on chain.

Contributions (their format, signatures and line schema) are `contributions.py`'s; this module builds,
verifies and registers the datanet made of them.

Building (`build_datanet`)
--------------------------
    for f in sorted files of from_dir:              # bad ones -> rejected[] with the reason, build goes on
        check size, signature (recovers the claimed address), registry (registered, active), UTF-8, schema
    order accepted files by (source mtime_ns, relative path)      # "earlier" = older file; ties by name
    seen = {}
    for f in that order, for each record r (line order):
        if key(r) in seen: drop line from f's weight    # the earlier contribution keeps the credit
        else: seen[key(r)] = f; weight[f] += tokens(r)  # under the named tokenizer (UTF-8 bytes if none)
    files left with weight 0 -> rejected ("every record duplicates an earlier contribution")
    leaf(f) = (address contributor, bytes32 sha256(file), uint256 weight)  -> StandardMerkleTree root

`key(r)` is sha256 of the record's canonical JSON. The manifest records the order and the dropped lines, so
the root is recomputed from the manifest and the copied files alone (mtimes are not needed again). Output:

    out_dir/manifest.json                  everything to recompute the root (see `DatanetManifest`)
    out_dir/contributions/<rel path>       copies of the accepted files and their .sig.json

written to a temporary sibling directory and renamed at the end, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loraledger.node.errors import NodeError
from loraledger.node.lineage.contributions import (
    CONTRIBUTION_SUFFIX,
    MESSAGE_PREFIX,
    SIG_SUFFIX,
    ContributionError,
    ContributionLimits,
    ContributionLine,
    parse_records,
    read_signature,
    recover_signer,
    sha256_hex,
    signature_path,
    verify_contribution,
)
from loraledger.node.types import Address, Bytes32, DatanetId, TxHash, as_address, as_bytes32

if TYPE_CHECKING:
    from loraledger.node.chain.bindings import Contracts

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- contributions


# ----------------------------------------------------------------------------------------------- datanets

MANIFEST_FILE = "manifest.json"
FILES_DIR = "contributions"
MANIFEST_VERSION = 1
LEAF_ENCODING: tuple[str, str, str] = ("address", "bytes32", "uint256")
ORDER_RULE = "source file mtime_ns, then relative path"
MAX_NAME_CHARS = 128


class DatanetError(NodeError, ValueError):
    """A datanet cannot be built, read or registered; the message names what is wrong and what to do."""


class EmptyDatanetError(DatanetError):
    """No contribution survived validation: a datanet with nothing to credit is refused."""


class DatanetMismatchError(DatanetError):
    """A manifest disagrees with its files or with the chain (root, count, hash, signature); names what
    differs."""


class ContributorCheck(Protocol):
    """What `build_datanet` asks of the ContributorRegistry (`ContributorRegistryClient` fits)."""

    def is_registered(self, account: Address | str) -> bool: ...

    def is_active(self, account: Address | str) -> bool: ...


class TokenCounter:
    """Counts tokens of record text under one checkpoint's `tokenizer.json` (no special tokens added).

    `sha256` identifies the tokenizer (sha256 of the tokenizer.json bytes), recorded in the manifest.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise DatanetError(
                f"{model_dir}: no tokenizer.json; pass a checkpoint directory with a fast tokenizer "
                "(e.g. one written by `loraledger model init-tiny`)"
            )
        raw = path.read_bytes()
        self.sha256 = "0x" + hashlib.sha256(raw).hexdigest()
        self.source = str(model_dir)
        self._tok = Tokenizer.from_str(raw.decode("utf-8"))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def record_ids(self, record: ContributionLine) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids), each tokenized on its own; prompt ids are [] for a text record."""
        return (self.encode(record.prompt) if record.prompt else []), self.encode(record.completion)


def record_weight(record: ContributionLine, counter: TokenCounter | None) -> int:
    """Weight of one record: len(prompt ids) + len(completion ids), or UTF-8 bytes of both without a
    tokenizer."""
    if counter is None:
        return len(record.prompt.encode("utf-8")) + len(record.completion.encode("utf-8"))
    p, c = counter.record_ids(record)
    return len(p) + len(c)


@dataclass(frozen=True)
class Rejection:
    """A file the build refused, with the reason (relative to the source directory)."""

    file: str
    reason: str


@dataclass(frozen=True)
class ManifestEntry:
    """One accepted contribution: its leaf `(contributor, contribution_hash, weight)` and how it was derived.

    `duplicate_lines` are the 1-based lines whose record an earlier contribution already holds (no weight
    here).
    """

    file: str
    contributor: Address
    contribution_hash: Bytes32
    signature: str
    records: int
    duplicate_lines: tuple[int, ...]
    weight: int

    def leaf(self) -> list[Any]:
        """The tree leaf values, in LEAF_ENCODING order."""
        return [self.contributor, self.contribution_hash, self.weight]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "contributor": self.contributor,
            "contribution_hash": self.contribution_hash,
            "signature": self.signature,
            "records": self.records,
            "duplicate_lines": list(self.duplicate_lines),
            "weight": self.weight,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestEntry:
        return cls(
            file=str(d["file"]),
            contributor=as_address(d["contributor"]),
            contribution_hash=as_bytes32(d["contribution_hash"]),
            signature=str(d["signature"]),
            records=int(d["records"]),
            duplicate_lines=tuple(int(x) for x in d["duplicate_lines"]),
            weight=int(d["weight"]),
        )


@dataclass(frozen=True)
class DatanetRegistration:
    """Where and how a datanet was registered."""

    chain_id: int
    registry: Address
    datanet_id: DatanetId
    tx_hash: TxHash
    uri: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "registry": self.registry,
            "datanet_id": self.datanet_id,
            "tx_hash": self.tx_hash,
            "uri": self.uri,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatanetRegistration:
        return cls(
            chain_id=int(d["chain_id"]),
            registry=as_address(d["registry"]),
            datanet_id=DatanetId(int(d["datanet_id"])),
            tx_hash=TxHash(str(d["tx_hash"])),
            uri=str(d["uri"]),
        )


@dataclass
class DatanetManifest:
    """The `manifest.json` of a datanet: everything needed to recompute its root and to train on it.

    weight_unit: "tokens" (under the tokenizer whose tokenizer.json sha256 is `tokenizer_sha256`) or
    "utf8_bytes" (no tokenizer named). `entries` are in credit order (ORDER_RULE).
    """

    name: str
    root: Bytes32
    entries: list[ManifestEntry]
    rejected: list[Rejection]
    weight_unit: str
    tokenizer_sha256: str | None
    limits: ContributionLimits
    registration: DatanetRegistration | None = None
    order: str = ORDER_RULE
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def contribution_count(self) -> int:
        return len(self.entries)

    @property
    def total_weight(self) -> int:
        return sum(e.weight for e in self.entries)

    @property
    def datanet_id(self) -> DatanetId | None:
        return self.registration.datanet_id if self.registration else None

    def leaves(self) -> list[list[Any]]:
        return [e.leaf() for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "name": self.name,
            "root": self.root,
            "contribution_count": self.contribution_count,
            "total_weight": self.total_weight,
            "leaf_encoding": list(LEAF_ENCODING),
            "tree": "OpenZeppelin StandardMerkleTree",
            "weight_unit": self.weight_unit,
            "tokenizer_sha256": self.tokenizer_sha256,
            "order": self.order,
            "limits": self.limits.to_dict(),
            "signature_message": MESSAGE_PREFIX + "<0x sha256 of the file>",
            "entries": [e.to_dict() for e in self.entries],
            "rejected": [{"file": r.file, "reason": r.reason} for r in self.rejected],
            "registration": self.registration.to_dict() if self.registration else None,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatanetManifest:
        try:
            if d.get("version") != MANIFEST_VERSION:
                raise DatanetError(f"manifest version {d.get('version')!r} is not {MANIFEST_VERSION}")
            if list(d.get("leaf_encoding", [])) != list(LEAF_ENCODING):
                raise DatanetError(
                    f"manifest leaf encoding {d.get('leaf_encoding')} is not {list(LEAF_ENCODING)}"
                )
            reg = d.get("registration")
            return cls(
                name=str(d["name"]),
                root=as_bytes32(d["root"]),
                entries=[ManifestEntry.from_dict(e) for e in d["entries"]],
                rejected=[Rejection(str(r["file"]), str(r["reason"])) for r in d.get("rejected", [])],
                weight_unit=str(d["weight_unit"]),
                tokenizer_sha256=d.get("tokenizer_sha256"),
                limits=ContributionLimits(**{k: int(v) for k, v in dict(d["limits"]).items()}),
                registration=DatanetRegistration.from_dict(reg) if reg else None,
                order=str(d.get("order", ORDER_RULE)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DatanetError):
                raise
            raise DatanetError(f"malformed datanet manifest: {e!r}") from e


def contributions_root(leaves: Sequence[Sequence[Any]]) -> Bytes32:
    """StandardMerkleTree root over `(address, bytes32, uint256)` leaves (loraledger.node.ledger.merkle,
    OpenZeppelin-compatible)."""
    from loraledger.node.ledger.merkle import StandardMerkleTree

    if not leaves:
        raise EmptyDatanetError("a datanet needs at least one contribution")
    tree = StandardMerkleTree.of([list(v) for v in leaves], list(LEAF_ENCODING))
    return as_bytes32(tree.root)


def load_manifest(manifest_dir: str | os.PathLike[str]) -> DatanetManifest:
    """Read `manifest_dir/manifest.json`."""
    path = Path(manifest_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DatanetError(f"{manifest_dir}: no {MANIFEST_FILE}; build one with `loraledger datanet build`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatanetError(f"{path}: not JSON ({e})") from e
    if not isinstance(d, dict):
        raise DatanetError(f"{path}: not a JSON object")
    return DatanetManifest.from_dict(d)


def write_manifest(manifest_dir: str | os.PathLike[str], manifest: DatanetManifest) -> Path:
    """Write `manifest.json` atomically (temp file + rename)."""
    path = Path(manifest_dir) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass
class _Candidate:
    rel: str
    path: Path
    data: bytes
    contributor: Address
    signature: str
    records: list[ContributionLine]
    mtime_ns: int


def _discover(from_dir: Path) -> tuple[list[tuple[str, Path]], list[Rejection]]:
    """(contribution files, rejections of stray files), relative paths with '/' separators, sorted."""
    files = sorted((p.relative_to(from_dir).as_posix(), p) for p in from_dir.rglob("*") if p.is_file())
    names = {rel for rel, _ in files}
    contributions: list[tuple[str, Path]] = []
    rejected: list[Rejection] = []
    for rel, p in files:
        if rel.endswith(CONTRIBUTION_SUFFIX):
            contributions.append((rel, p))
        elif rel.endswith(CONTRIBUTION_SUFFIX + SIG_SUFFIX):
            if rel[: -len(SIG_SUFFIX)] not in names:
                rejected.append(Rejection(rel, "signature file without its contribution"))
        else:
            rejected.append(
                Rejection(
                    rel,
                    f"not a contribution (expected *{CONTRIBUTION_SUFFIX} with a "
                    f"*{CONTRIBUTION_SUFFIX}{SIG_SUFFIX} beside it)",
                )
            )
    return contributions, rejected


def _check_contributor(
    registry: ContributorCheck | None, address: Address, cache: dict[str, str | None]
) -> None:
    if registry is None:
        return
    if address not in cache:
        if not registry.is_registered(address):
            cache[address] = (
                f"contributor {address} is not registered in the ContributorRegistry "
                "(`loraledger contributor register`)"
            )
        elif not registry.is_active(address):
            cache[address] = f"contributor {address} is suspended in the ContributorRegistry"
        else:
            cache[address] = None
    reason = cache[address]
    if reason is not None:
        raise ContributionError(reason)


def _validate(
    rel: str,
    path: Path,
    limits: ContributionLimits,
    registry: ContributorCheck | None,
    cache: dict[str, str | None],
) -> _Candidate:
    """Read and check one contribution; ContributionError with the reason when it is refused."""
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise ContributionError(f"{size} bytes exceeds the limit of {limits.max_file_bytes}")
    sig = read_signature(signature_path(path))
    data = path.read_bytes()
    signer = verify_contribution(data, sig, path.name)
    _check_contributor(registry, signer, cache)
    records = parse_records(data, path.name, limits)
    return _Candidate(rel, path, data, signer, sig.signature, records, path.stat().st_mtime_ns)


def _credit(
    ordered: Sequence[tuple[str, Address, Bytes32, str, list[ContributionLine]]],
    counter: TokenCounter | None,
) -> tuple[list[ManifestEntry], list[Rejection]]:
    """Deduplicate across `ordered` contributions (earlier keeps the credit) and weigh what is left."""
    seen: dict[str, str] = {}
    entries: list[ManifestEntry] = []
    rejected: list[Rejection] = []
    for rel, contributor, digest, signature, records in ordered:
        dup: list[int] = []
        weight = 0
        first_holder: str | None = None
        for lineno, rec in enumerate(records, start=1):
            k = rec.key()
            if k in seen:
                dup.append(lineno)
                first_holder = first_holder or seen[k]
                continue
            seen[k] = rel
            weight += record_weight(rec, counter)
        if weight == 0:
            rejected.append(
                Rejection(
                    rel,
                    f"every record duplicates an earlier contribution (e.g. {first_holder})"
                    if first_holder
                    else "its records weigh 0 tokens",
                )
            )
            for rec in records:  # a refused file holds no credit
                if seen.get(rec.key()) == rel:
                    del seen[rec.key()]
            continue
        entries.append(ManifestEntry(rel, contributor, digest, signature, len(records), tuple(dup), weight))
    return entries, rejected


def build_datanet(
    name: str,
    from_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    registry: ContributorCheck | None = None,
    *,
    limits: ContributionLimits | None = None,
    overwrite: bool = False,
) -> DatanetManifest:
    """Validate, deduplicate and weigh every contribution under `from_dir`; write the datanet to `out_dir`.

    See the module docstring for the rules. Files that fail a check are listed in `manifest.rejected` with the
    reason and the build goes on; EmptyDatanetError when nothing is left. `registry` (a ContributorRegistry
    client) additionally refuses unregistered or suspended signers. Nothing is written unless the whole build
    succeeds; an existing `out_dir` is replaced only with `overwrite`.
    """
    if not name or len(name) > MAX_NAME_CHARS or any(c in name for c in "\n\r\0"):
        raise DatanetError(f"datanet name must be 1..{MAX_NAME_CHARS} characters on one line, got {name!r}")
    src = Path(from_dir)
    out = Path(out_dir)
    if not src.is_dir():
        raise DatanetError(f"{src} is not a directory of contributions")
    if out.exists() and not overwrite:
        raise DatanetError(f"{out} already exists; choose another --out or remove it")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DatanetError(f"--out {out} must lie outside the source directory {src}")
    lim = limits or ContributionLimits()
    counter = TokenCounter(tokenizer_dir) if tokenizer_dir is not None else None

    files, rejected = _discover(src)
    cache: dict[str, str | None] = {}
    candidates: list[_Candidate] = []
    for rel, path in files:
        try:
            candidates.append(_validate(rel, path, lim, registry, cache))
        except ContributionError as e:
            rejected.append(Rejection(rel, str(e)))
    candidates.sort(key=lambda c: (c.mtime_ns, c.rel))
    entries, dup_rejected = _credit(
        [(c.rel, c.contributor, sha256_hex(c.data), c.signature, c.records) for c in candidates], counter
    )
    rejected.extend(dup_rejected)
    rejected.sort(key=lambda r: r.file)
    if not entries:
        detail = "; ".join(f"{r.file}: {r.reason}" for r in rejected) or f"no files in {src}"
        raise EmptyDatanetError(f"datanet {name!r} would be empty: no contribution was accepted ({detail})")

    manifest = DatanetManifest(
        name=name,
        root=contributions_root([e.leaf() for e in entries]),
        entries=entries,
        rejected=rejected,
        weight_unit="tokens" if counter else "utf8_bytes",
        tokenizer_sha256=counter.sha256 if counter else None,
        limits=lim,
    )
    _write_datanet(out, manifest, {c.rel: c.path for c in candidates}, overwrite)
    for r in rejected:
        log.warning("datanet %s: rejected %s: %s", name, r.file, r.reason)
    return manifest


def _write_datanet(out: Path, manifest: DatanetManifest, sources: dict[str, Path], overwrite: bool) -> None:
    """Copy accepted files + signatures and write the manifest into a temp dir, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for e in manifest.entries:
            dst = tmp / FILES_DIR / e.file
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sources[e.file], dst)
            shutil.copy2(signature_path(sources[e.file]), signature_path(dst))
        write_manifest(tmp, manifest)
        if out.exists():
            if not overwrite:
                raise DatanetError(f"{out} appeared while building; not replacing it")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_entry_records(
    manifest_dir: str | os.PathLike[str], entry: ManifestEntry, limits: ContributionLimits | None = None
) -> list[ContributionLine]:
    """The records of one entry's copied file, after checking its sha256 and signature against the entry."""
    path = Path(manifest_dir) / FILES_DIR / entry.file
    if not path.is_file():
        raise DatanetMismatchError(f"{manifest_dir}: contribution file {entry.file} is missing")
    data = path.read_bytes()
    actual = sha256_hex(data)
    if actual != entry.contribution_hash:
        raise DatanetMismatchError(
            f"{manifest_dir}: {entry.file} has sha256 {actual}, the manifest says "
            f"{entry.contribution_hash} (the file was changed)"
        )
    try:
        signer = recover_signer(actual, entry.signature)
    except ContributionError as e:
        raise DatanetMismatchError(f"{manifest_dir}: {entry.file}: {e}") from e
    if signer != entry.contributor:
        raise DatanetMismatchError(
            f"{manifest_dir}: {entry.file} is signed by {signer}, the manifest credits {entry.contributor}"
        )
    return parse_records(data, entry.file, limits)


def credited_records(manifest_dir: str | os.PathLike[str]) -> Iterator[tuple[Address, ContributionLine]]:
    """(contributor, record) for every record a datanet credits, in credit order (duplicates skipped)."""
    manifest = load_manifest(manifest_dir)
    for entry in manifest.entries:
        dup = set(entry.duplicate_lines)
        for lineno, rec in enumerate(read_entry_records(manifest_dir, entry, manifest.limits), start=1):
            if lineno not in dup:
                yield entry.contributor, rec


def verify_manifest(
    manifest_dir: str | os.PathLike[str],
    contracts: Contracts | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> DatanetManifest:
    """Recompute a datanet's root from its files and compare with the manifest and, given `contracts`, the
    chain.

    Checks: every copied file's sha256 and signature; dedup and weights recomputed (tokens when
    `tokenizer_dir` is given and its sha256 matches, bytes for a "utf8_bytes" datanet; else the manifest's
    weights are taken); root of the leaves == manifest root; with `contracts`
    (loraledger.node.chain.bindings.Contracts) the registration's chain id and registry address match and the on-chain
    root and count equal the manifest's.
    Raises DatanetMismatchError naming the first difference; returns the manifest when all agree.
    """
    manifest = load_manifest(manifest_dir)
    if not manifest.entries:
        raise EmptyDatanetError(f"{manifest_dir}: manifest has no contributions")
    counter: TokenCounter | None = None
    recompute = manifest.weight_unit == "utf8_bytes"
    if tokenizer_dir is not None and manifest.weight_unit == "tokens":
        counter = TokenCounter(tokenizer_dir)
        if counter.sha256 != manifest.tokenizer_sha256:
            raise DatanetMismatchError(
                f"{manifest_dir}: tokenizer of {tokenizer_dir} ({counter.sha256}) is not the "
                f"one the weights were counted with ({manifest.tokenizer_sha256})"
            )
        recompute = True
    ordered = [
        (
            e.file,
            e.contributor,
            e.contribution_hash,
            e.signature,
            read_entry_records(manifest_dir, e, manifest.limits),
        )
        for e in manifest.entries
    ]
    if recompute:
        entries, rejected = _credit(ordered, counter)
        if rejected:
            raise DatanetMismatchError(
                f"{manifest_dir}: {rejected[0].file} would be rejected: {rejected[0].reason}"
            )
        for got, want in zip(entries, manifest.entries, strict=True):
            if (got.weight, got.duplicate_lines) != (want.weight, want.duplicate_lines):
                raise DatanetMismatchError(
                    f"{manifest_dir}: {want.file}: recomputed weight {got.weight} (duplicate lines "
                    f"{list(got.duplicate_lines)}) differs from the manifest's {want.weight} "
                    f"({list(want.duplicate_lines)})"
                )
    root = contributions_root(manifest.leaves())
    if root != manifest.root:
        raise DatanetMismatchError(
            f"{manifest_dir}: root of the manifest's leaves is {root}, the manifest says {manifest.root}"
        )
    if contracts is not None:
        _verify_on_chain(manifest_dir, manifest, contracts)
    return manifest


def _verify_on_chain(
    manifest_dir: str | os.PathLike[str], manifest: DatanetManifest, contracts: Contracts
) -> None:
    reg = manifest.registration
    if reg is None:
        raise DatanetMismatchError(
            f"{manifest_dir}: datanet is not registered; run `loraledger datanet register`"
        )
    chain_id = contracts.datanets.client.chain_id
    if reg.chain_id != chain_id:
        raise DatanetMismatchError(
            f"{manifest_dir}: registered on chain {reg.chain_id}, but connected to chain {chain_id}"
        )
    if reg.registry != contracts.datanets.address:
        raise DatanetMismatchError(
            f"{manifest_dir}: registered in DatanetRegistry {reg.registry}, but the "
            f"deployment's is {contracts.datanets.address}"
        )
    if not contracts.datanets.exists(reg.datanet_id):
        raise DatanetMismatchError(
            f"{manifest_dir}: datanet id {reg.datanet_id} does not exist on chain {chain_id}"
        )
    info = contracts.datanets.get_datanet(reg.datanet_id)
    if info.contributions_root != manifest.root:
        raise DatanetMismatchError(
            f"{manifest_dir}: datanet {reg.datanet_id} has root {info.contributions_root} on "
            f"chain, the manifest has {manifest.root}"
        )
    if info.contribution_count != manifest.contribution_count:
        raise DatanetMismatchError(
            f"{manifest_dir}: datanet {reg.datanet_id} has {info.contribution_count} "
            f"contributions on chain, the manifest has {manifest.contribution_count}"
        )


def register_datanet(
    manifest_dir: str | os.PathLike[str],
    contracts: Contracts,
    uri: str | None = None,
    *,
    check_contributors: bool = True,
) -> DatanetRegistration:
    """Verify the manifest locally, call `DatanetRegistry.registerDatanet(root, count, uri)`, store the
    result.

    `contracts` is a loraledger.node.chain.bindings.Contracts bound to the curator's client. With `check_contributors`
    every credited contributor must be registered and not suspended in the ContributorRegistry now (even when
    the datanet was built offline). The id, tx hash, chain id, registry address and URI are written into the
    manifest. Refuses a manifest already registered. `uri` defaults to `file://<abs
    manifest_dir>/manifest.json`.
    """
    manifest = verify_manifest(manifest_dir)
    if manifest.registration is not None:
        r = manifest.registration
        raise DatanetError(
            f"{manifest_dir}: already registered as datanet {r.datanet_id} on chain {r.chain_id} "
            f"(tx {r.tx_hash}); a datanet is registered once"
        )
    if check_contributors:
        inactive = sorted(
            {e.contributor for e in manifest.entries if not contracts.contributors.is_active(e.contributor)}
        )
        if inactive:
            raise DatanetError(
                f"{manifest_dir}: contributors {inactive} are not registered or are suspended in the "
                "ContributorRegistry; rebuild the datanet with --deployment to drop their files"
            )
    where = uri if uri is not None else (Path(manifest_dir).resolve() / MANIFEST_FILE).as_uri()
    datanets = contracts.datanets
    fn = datanets.contract.functions.registerDatanet(
        bytes.fromhex(manifest.root[2:]), manifest.contribution_count, where
    )
    result = datanets.result(datanets.client.transact(fn))
    ids = [e["args"]["id"] for e in result["events"] if e["event"] == "DatanetRegistered"]
    if len(ids) != 1:
        raise DatanetError(
            f"registerDatanet tx {result['tx_hash']} emitted {len(ids)} DatanetRegistered events"
        )
    registration = DatanetRegistration(
        chain_id=datanets.client.chain_id,
        registry=datanets.address,
        datanet_id=DatanetId(int(str(ids[0]))),
        tx_hash=result["tx_hash"],
        uri=where,
    )
    manifest.registration = registration
    write_manifest(manifest_dir, manifest)
    return registration
