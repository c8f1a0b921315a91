"""The canonical epoch export: one file per epoch, byte-for-byte reproducible from the record log once the epoch is
built, whose sha256 the operator submits on chain with the epoch (`exportHash`).

    data = canonical_export(log, n)           # bytes; sha256(data) == the chain's exportHash of epoch n
    export_sha256(log, n)                     # "0x" + sha256 hex
    ex = parse_export(data, domain=RecordDomain(chain_id, ledger, operator), epoch=n)   # validated, or ExportError
    ex.record_proof(i), ex.reward_proof(i)    # a record's / an account's proof, from the trees parse_export rebuilt

It holds everything needed to recompute the epoch's two roots and its amounts without the operator's database.
Written as JSON with sorted keys, no whitespace, ASCII only, so the same log always gives the same bytes. Bulk
data is in rows (one JSON array per record or account, its columns named once):

    {"format": "loraledger-epoch-export-v2",
     "domain": {"chainId", "ledger", "operator"},        # whose stream the record leaves belong to
     "epoch": n,
     "previousEpoch": p,                                 # the live epoch n builds on (0: none)
     "terms": {...},                                     # the terms snapshot as the settler stored it, with its
                                                         #   "block": shares, adapter owner + feePerToken,
                                                         #   contributor payout + active, and the domain
     "records": {"leafEncoding": [...], "root", "count", "feesTotal",
                 "columns": ["leaf", "requestId", "adapterIds", "weightsBps", "promptTokens",
                             "completionTokens", "fee", "outputHash", "attributionHash"],
                 "entries": [[leaf, requestId, [adapterId, ...], [weightBps, ...], promptTokens,
                              completionTokens, fee, outputHash, attributionHash], ...],   # ascending by leaf
                 "contributorLists": [[attributionHash, [[account, weight], ...]], ...]},  # ascending by hash
     "rewards": {"leafEncoding": [...], "root", "cumulativeTotal", "previousTotal",
                 "columns": ["account", "amount", "cumulative", "leaf"],
                 "previous": [[account, cumulative before], ...],                # ascending by address
                 "entries": [[account, amount, cumulative, leaf], ...]}}         # ascending by address

`records.entries` are the records tree's leaves in the tree's order (entry k is tree node 2n-2-k), each with the
record's fields; every record is of epoch n. A record's contributor list (the lineage weights the node used for
it) is the `contributorLists` row its attributionHash names: each distinct list once, every one used by some
record, its hash recomputed by the parser. `rewards.entries` are the leaves of the cumulative rewards tree: what
each account earned this epoch (`amount`) and its new cumulative amount; `rewards.previous` every account's
cumulative amount under the previous live epoch, so the rewards tree of `previousEpoch` can be rebuilt and
checked against the chain. Uint256 values are decimal strings, small integers JSON numbers, hashes 0x + 64
lowercase hex, addresses EIP-55 checksummed.

Both trees are given by their leaves and roots; a proof follows from the leaves (every inner node does), so the
export carries none: `parse_export` rebuilds both trees and `record_proof` / `reward_proof` read proofs off them
(what `AttributionLedger.verifyRecord` and `claim` take).

Lineage. Records carry their contributor weights; the per-adapter lineage weights they were computed from
(lineage.json's `lineage_weights`) are not in the record log, so the export holds them only when the terms
snapshot does (`terms["lineage"]`: {adapterId: {"trainingConfigHash", "weights": {contributor: tokens}}}); an
auditor otherwise takes the adapters' lineage.json files from their owners (`loraledger audit --lineage`).

`parse_export` validates an export on its own (no chain): canonical bytes, the domain and epoch asked for,
every record's fields, attributionHash, leaf and order, both roots, counts and totals. Its `ExportError` says
where: the byte range, the entry (leaf, record or account) and the field. Speed: the records are checked in bulk
(C-level maps over whole columns, one tree build); a row that fails a bulk check is re-read field by field to
name what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, NoReturn

from loraledger.node.errors import NodeError
from loraledger.node.ledger.epochs import CONFIRMED, SUBMITTED, rebuild_epoch
from loraledger.node.ledger.merkle import (
    RECORD_LEAF_ENCODING,
    REWARD_LEAF_ENCODING,
    StandardMerkleTree,
    gc_paused,
    is_checksummed,
    to_hex,
)
from loraledger.node.ledger.records import (
    AttributionRecord,
    Contributor,
    RecordDomain,
    RecordError,
    attribution_hash,
    records_tree,
)
from loraledger.node.ledger.rewards import rewards_tree
from loraledger.node.types import AdapterId, Address, Bytes32, Wei, as_address

if TYPE_CHECKING:
    from loraledger.node.ledger.record_log import RecordLog

EXPORT_FORMAT = "loraledger-epoch-export-v2"

RECORD_COLUMNS: tuple[str, ...] = ("leaf", "requestId", "adapterIds", "weightsBps", "promptTokens", "completionTokens",
                                   "fee", "outputHash", "attributionHash")
"""The fields of one `records.entries` row, in order."""
REWARD_COLUMNS: tuple[str, ...] = ("account", "amount", "cumulative", "leaf")
"""The fields of one `rewards.entries` row, in order."""

_LEAF, _REQUEST_ID, _ADAPTER_IDS, _WEIGHTS, _PROMPT, _COMPLETION, _FEE, _OUTPUT_HASH, _ATTRIBUTION_HASH = range(9)
_COLUMN_NAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("records", "entries"): RECORD_COLUMNS,
    ("records", "contributorLists"): ("attributionHash", "contributors"),
    ("rewards", "entries"): REWARD_COLUMNS,
    ("rewards", "previous"): ("account", "cumulative"),
}
_FIELDS: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset({"format", "domain", "epoch", "previousEpoch", "terms", "records", "rewards"}),
    ("records",): frozenset({"leafEncoding", "columns", "root", "count", "feesTotal", "entries", "contributorLists"}),
    ("rewards",): frozenset({"leafEncoding", "columns", "root", "cumulativeTotal", "previousTotal", "previous",
                             "entries"}),
}
_HEX32 = re.compile(r"0x[0-9a-f]{64}").fullmatch
_HEX32_RUN = re.compile(r"(?:0x[0-9a-f]{64})*").fullmatch
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}").fullmatch
_INT_ONLY = {int}


class ExportError(NodeError, ValueError):
    """An epoch export is malformed, truncated, reordered, forged or for another stream; the message says where."""


# ----------------------------------------------------------------------------------------------------- writing


def dump_export(doc: Mapping[str, Any]) -> bytes:
    """The canonical bytes of an export document: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _record_rows(records: Sequence[AttributionRecord], leaves: Sequence[bytes]
                 ) -> tuple[list[list[Any]], list[list[Any]]]:
    """`records.entries` (by leaf) and `records.contributorLists` (each distinct list once, by hash)."""
    lists: dict[str, tuple[Contributor, ...]] = {}
    rows: list[list[Any]] = []
    append = rows.append
    for i in sorted(range(len(records)), key=leaves.__getitem__):
        r = records[i]
        h = r.attribution_hash
        contributors = r.contributors
        known = lists.setdefault(h, contributors)
        if known is not contributors and known != contributors:
            raise ExportError(f"record {r.request_id}: its attributionHash {h} is another record's, with another "
                              "contributor list (the record does not commit to its list)")
        append(["0x" + leaves[i].hex(), r.request_id, list(map(str, r.adapter_ids)), list(r.weights_bps),
                r.prompt_tokens, r.completion_tokens, str(int(r.fee)), r.output_hash, h])
    table: list[list[Any]] = []
    for key in sorted(lists):
        listed = lists[key]
        if attribution_hash(listed) != key:
            raise ExportError(f"attributionHash {key} does not commit to the contributor list its records carry")
        table.append([key, [[a, str(int(w))] for a, w in listed]])
    return rows, table


def export_document(
    *,
    domain: RecordDomain,
    epoch: int,
    previous_epoch: int,
    terms: Mapping[str, Any],
    records: Sequence[AttributionRecord],
    previous: Mapping[Address, int],
    amounts: Mapping[Address, int],
    records_tree_: StandardMerkleTree | None = None,
    rewards_tree_: StandardMerkleTree | None = None,
) -> dict[str, Any]:
    """The export document of one epoch from its parts (what `canonical_export` reads from the log).

    The trees are built here unless given: records tree over `records` in `domain`, rewards tree over
    previous + amounts. Callers that forge exports for tests hand in whatever parts they want to publish.
    Every record must be of `epoch` (the rows leave the epoch out).
    """
    wrong = next((r for r in records if r.epoch != epoch), None)
    if wrong is not None:
        raise ExportError(f"record {wrong.request_id} is of epoch {wrong.epoch}, the export of epoch {epoch}")
    rtree = records_tree_ if records_tree_ is not None else records_tree(records, domain)
    amounts_ = {as_address(str(a)): int(v) for a, v in amounts.items()}
    cumulative: dict[Address, int] = {a: int(v) for a, v in previous.items()}
    for a, v in amounts_.items():
        cumulative[a] = cumulative.get(a, 0) + v
    wtree = rewards_tree_ if rewards_tree_ is not None else rewards_tree(cumulative, domain.operator)
    with gc_paused():
        entries, lists = _record_rows(records, [rtree.tree[ti] for ti in rtree.tree_indices])
        rewards = [[str(a), str(amounts_.get(a, 0)), str(int(v)), to_hex(wtree.tree[wtree.tree_indices[i]])]
                   for i, (a, v) in enumerate(wtree.values)]
    prev_items = sorted(((str(a), int(v)) for a, v in previous.items() if int(v) > 0), key=lambda av: int(av[0], 16))
    return {
        "format": EXPORT_FORMAT,
        "domain": domain.to_json(),
        "epoch": int(epoch),
        "previousEpoch": int(previous_epoch),
        "terms": dict(terms),
        "records": {
            "leafEncoding": list(RECORD_LEAF_ENCODING),
            "columns": list(RECORD_COLUMNS),
            "root": rtree.root_hex,
            "count": len(records),
            "feesTotal": str(sum(int(r.fee) for r in records)),
            "entries": entries,
            "contributorLists": lists,
        },
        "rewards": {
            "leafEncoding": list(REWARD_LEAF_ENCODING),
            "columns": list(REWARD_COLUMNS),
            "root": wtree.root_hex,
            "cumulativeTotal": str(sum(int(v) for _, v in wtree.values)),
            "previousTotal": str(sum(v for _, v in prev_items)),
            "previous": [[a, str(v)] for a, v in prev_items],
            "entries": rewards,
        },
    }


def previous_live_epoch(log_: RecordLog, n: int) -> int:
    """The epoch `n` was built on (its `parent` on chain): the latest epoch below `n` the log sent and does not hold
    as revoked (0: none)."""
    for row in reversed(log_.epochs()):
        if row.epoch < n and row.state in (SUBMITTED, CONFIRMED):
            return row.epoch
    return 0


def canonical_export(log_: RecordLog, n: int) -> bytes:
    """Epoch `n` as canonical JSON bytes (module docstring); TamperError when the log no longer matches the roots
    it stored."""
    t = rebuild_epoch(log_, n)
    row = t.row
    assert row.terms is not None
    previous = log_.cumulative_balances(n - 1) if n > 1 else {}
    doc = export_document(domain=t.domain, epoch=n, previous_epoch=previous_live_epoch(log_, n), terms=row.terms,
                          records=t.records, previous=previous, amounts=t.amounts, records_tree_=t.records_tree,
                          rewards_tree_=t.rewards_tree)
    if doc["rewards"]["root"] != row.rewards_root or doc["records"]["root"] != row.records_root:
        raise ExportError(f"epoch {n}: the export's roots differ from the roots the log stored")
    with gc_paused():
        return dump_export(doc)


def export_sha256(log_: RecordLog, n: int) -> Bytes32:
    """sha256 of `canonical_export(log_, n)`, as the chain stores it."""
    return Bytes32("0x" + hashlib.sha256(canonical_export(log_, n)).hexdigest())


def sha256_hex(data: bytes) -> Bytes32:
    """"0x" + sha256(data) hex."""
    return Bytes32("0x" + hashlib.sha256(data).hexdigest())


def chunks(data: bytes, size: int = 1 << 20) -> list[bytes]:
    """`data` cut into pieces of `size` bytes (the last may be shorter): how the node streams an export."""
    if size <= 0:
        raise ExportError(f"chunk size must be > 0, got {size}")
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


# ----------------------------------------------------------------------------------------------------- locating


class _Offsets:
    """Byte offsets of the values of a canonical export document (what `dump_export(doc)` would write), each
    container's child offsets computed once, on first use: naming the byte range of many rows of one large list
    costs one pass over it, not one per row."""

    def __init__(self, doc: Any) -> None:
        self.doc = doc
        self._starts: dict[tuple[str | int, ...], Any] = {}

    def _children(self, prefix: tuple[str | int, ...], node: Any) -> Any:
        """{key: offset} of a dict's values / [offset] of a list's items, relative to `node`'s first byte."""
        got = self._starts.get(prefix)
        if got is None:
            pos = 1  # "{" or "["
            if isinstance(node, dict):
                got = {}
                for k in sorted(node):
                    pos += len(json.dumps(k)) + 1
                    got[k] = pos
                    pos += len(dump_export(node[k])) + 1
            else:
                got = []
                for item in node:
                    got.append(pos)
                    pos += len(dump_export(item)) + 1
            self._starts[prefix] = got
        return got

    def span(self, path: Sequence[str | int]) -> tuple[int, int]:
        """[start, end) of the value at `path`; KeyError / IndexError / TypeError when there is none."""
        start = 0
        node = self.doc
        for depth, key in enumerate(path):
            if isinstance(node, dict) != isinstance(key, str) or not isinstance(node, (dict, list)):
                raise TypeError(f"no {key!r} in a {type(node).__name__}")
            start += self._children(tuple(path[:depth]), node)[key]
            node = node[key]  # type: ignore[index]  # a str key for a dict, an int for a list (checked above)
        return start, start + len(dump_export(node))


def _path_text(path: Sequence[str | int]) -> str:
    """`records.entries[3].fee`: the row fields of the bulk lists named by their column."""
    out = ""
    for depth, k in enumerate(path):
        names = _COLUMN_NAMES.get((str(path[0]), str(path[1]))) if depth == 3 and len(path) > 3 else None
        if isinstance(k, int) and names is not None and 0 <= k < len(names) and isinstance(path[2], int):
            out += f".{names[k]}"
        else:
            out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out or "(document)"


def _locate(offsets: _Offsets, path: Sequence[str | int]) -> str:
    try:
        a, b = offsets.span(path)
    except (KeyError, IndexError, TypeError):
        return _path_text(path)
    return f"{_path_text(path)} (bytes {a}-{b - 1})"


def locate(doc: Any, path: Sequence[str | int]) -> str:
    """ "<path> (bytes a-b)" for a value of a canonical export document."""
    return _locate(_Offsets(doc), path)


def _path_at(doc: Any, offset: int) -> list[str | int]:
    """The deepest path of `doc` whose canonical serialisation covers byte `offset`."""
    path: list[str | int] = []
    node = doc
    pos = 0
    while isinstance(node, (dict, list)) and node:
        pos += 1
        found = False
        items: list[tuple[str | int, Any, int]] = []
        if isinstance(node, dict):
            for k in sorted(node):
                items.append((k, node[k], len(json.dumps(k)) + 1))
        else:
            items = [(i, v, 0) for i, v in enumerate(node)]
        for key, value, head in items:
            size = head + len(dump_export(value))
            if offset < pos + size:
                path.append(key)
                pos += head
                node = value
                found = True
                break
            pos += size + 1
        if not found:
            break
    return path


# ----------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RewardEntry:
    account: Address
    amount: int
    cumulative: int
    leaf: str


@dataclass
class EpochExport:
    """A parsed export whose internal consistency `parse_export` checked (trees, leaves, order, totals)."""

    data: bytes
    sha256: Bytes32
    doc: dict[str, Any]
    domain: RecordDomain
    epoch: int
    previous_epoch: int
    terms: dict[str, Any]
    records: list[AttributionRecord]
    records_root: Bytes32
    record_count: int
    fees_total: int
    rewards: list[RewardEntry]
    rewards_root: Bytes32
    cumulative_total: int
    previous: dict[Address, int]
    previous_total: int
    records_tree: StandardMerkleTree
    rewards_tree: StandardMerkleTree
    contributor_lists: dict[str, tuple[Contributor, ...]]
    _offsets: _Offsets | None = field(default=None, repr=False, compare=False)

    def where(self, *path: str | int) -> str:
        """`path` with its byte range in the export, e.g. "records.entries[3].fee (bytes 812-819)"."""
        if self._offsets is None:
            self._offsets = _Offsets(self.doc)
        return _locate(self._offsets, path)

    def record_where(self, i: int, column: str | None = None) -> str:
        """`where` of record i (its row in `records.entries`, the order of `records`) or of one of its fields."""
        if column is None:
            return self.where("records", "entries", i)
        if column == "contributors":
            return self.where("records", "contributorLists", self._list_index(self.records[i].attribution_hash))
        return self.where("records", "entries", i, RECORD_COLUMNS.index(column))

    def _list_index(self, h: str) -> int:
        return next(j for j, row in enumerate(self.doc["records"]["contributorLists"]) if row[0] == h)

    def record_proof(self, i: int) -> list[str]:
        """The proof of record i under the records root (entry i of the export), as 0x hex."""
        return self.records_tree.get_proof_hex(i)

    def reward_proof(self, i: int) -> list[str]:
        """The proof of reward entry i (`rewards[i]`: account, cumulative) under the rewards root, as 0x hex."""
        return self.rewards_tree.get_proof_hex(i)

    @property
    def cumulative(self) -> dict[Address, int]:
        return {e.account: e.cumulative for e in self.rewards}

    @property
    def amounts(self) -> dict[Address, int]:
        return {e.account: e.amount for e in self.rewards if e.amount}


def _fail(doc: Any, path: Sequence[str | int], msg: str) -> ExportError:
    return ExportError(f"{locate(doc, path)}: {msg}")


def _get(doc: Any, path: Sequence[str | int], kind: type | tuple[type, ...]) -> Any:
    node = doc
    for i, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise _fail(doc, path[:i], f"missing field {_path_text(path)!r}") from None
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(doc, path, f"must be {names}, got {type(node).__name__} {json.dumps(node)[:80]}")
    return node


def _uint(doc: Any, path: Sequence[str | int]) -> int:
    s = _get(doc, path, str)
    if not s.isdigit() or (len(s) > 1 and s[0] == "0") or len(s) > 78:
        raise _fail(doc, path, f"must be a decimal uint256 string, got {s[:80]!r}")
    v = int(s)
    if v >= 2**256:
        raise _fail(doc, path, "exceeds uint256")
    return v


def _hash32(doc: Any, path: Sequence[str | int]) -> str:
    s = _get(doc, path, str)
    if not _HEX32(s):
        raise _fail(doc, path, f"must be 0x + 64 lowercase hex digits, got {s[:80]!r}")
    return s


def _all_hex32(values: list[Any]) -> bool:
    """Every value is 0x + 64 lowercase hex: each 66 characters long, and all of them joined one run of such
    (one regex pass over the joined column instead of one call per value)."""
    try:
        return set(map(len, values)) == {66} and _HEX32_RUN("".join(values)) is not None
    except TypeError:  # a value that is not a string
        return False


@lru_cache(maxsize=1 << 16)
def _is_checksummed_address(s: str) -> bool:
    """`s` is 0x + 40 hex digits in its EIP-55 form (contributor sets repeat across lists: memoised)."""
    return _ADDRESS(s) is not None and is_checksummed(s[2:])


def _addr(doc: Any, path: Sequence[str | int]) -> Address:
    s = _get(doc, path, str)
    if not _is_checksummed_address(s):
        try:
            a = as_address(s)
        except (ValueError, NodeError) as e:
            raise _fail(doc, path, f"not an address ({e})") from None
        raise _fail(doc, path, f"address must be written checksummed as {a}")
    return Address(s)  # type: ignore[arg-type]


def _fields(doc: Any, path: Sequence[str], node: Mapping[str, Any]) -> None:
    """The object at `path` has exactly the fields of its kind."""
    want = _FIELDS[tuple(path)]
    if node.keys() != want:
        extra, missing = sorted(set(node) - want), sorted(want - set(node))
        raise _fail(doc, path, "; ".join(([f"unknown field(s) {extra}"] if extra else [])
                                         + ([f"missing field(s) {missing}"] if missing else [])))


def parse_export(data: bytes, *, domain: RecordDomain | None = None, epoch: int | None = None) -> EpochExport:
    """Read and validate an export (module docstring); ExportError naming the byte range, entry and field.

    `domain` / `epoch`, when given, must be the export's: an export of another chain, ledger, operator or epoch
    is refused by name.
    """
    size = len(data)
    if size == 0:
        raise ExportError("the export is empty (0 bytes)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as bad:
        raise ExportError(f"byte {bad.start} (0x{data[bad.start]:02x}) is not ASCII: a canonical export is ASCII JSON "
                          "(forged or corrupted)") from None
    with gc_paused():  # millions of acyclic lists and strings: collector passes would free nothing
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as je:
            if je.pos >= size - 1 or "Unterminated" in je.msg or "Expecting" in je.msg and je.pos >= size - 2:
                raise ExportError(f"the export is truncated: its JSON ends at byte {size} of what should be more "
                                  f"({je.msg}); fetch it again") from None
            raise ExportError(f"not JSON at byte {je.pos} of {size}: {je.msg}") from None
        del text
        return _parse_document(data, doc, domain, epoch)


def _parse_document(data: bytes, doc: Any, domain: RecordDomain | None, epoch: int | None) -> EpochExport:
    size = len(data)
    if not isinstance(doc, dict):
        raise ExportError(f"bytes 0-{size - 1}: an export is a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != EXPORT_FORMAT:
        raise _fail(doc, ["format"], f"format {fmt!r} is not {EXPORT_FORMAT!r}")
    canonical = dump_export(doc)
    if canonical != data:
        at = next((i for i, (x, y) in enumerate(zip(canonical, data, strict=False)) if x != y),
                  min(len(canonical), size))
        path = _path_at(doc, at)
        raise ExportError(f"byte {at}: the export is not in canonical form (sorted keys, no whitespace) near "
                          f"{locate(doc, path)}; its sha256 would not be reproducible (reformatted or forged)")
    del canonical
    _fields(doc, [], doc)

    # ----- domain and epoch
    dom = _get(doc, ["domain"], dict)
    try:
        got = RecordDomain.from_json(dom)
    except RecordError as de:
        raise _fail(doc, ["domain"], str(de)) from None
    if domain is not None:
        for name, have, want in (("chain", got.chain_id, domain.chain_id), ("ledger", got.ledger, domain.ledger),
                                 ("operator", got.operator, domain.operator)):
            if have != want:
                raise ExportError(f"{locate(doc, ['domain'])}: this export is for {name} {have}, not {name} {want} "
                                  f"(an export of another stream is refused)")
    if dom != got.to_json():
        raise _fail(doc, ["domain"], f"must be written {json.dumps(got.to_json())}")
    n = _get(doc, ["epoch"], int)
    if epoch is not None and n != epoch:
        raise _fail(doc, ["epoch"], f"this export is of epoch {n}, not epoch {epoch}")
    if not 0 < n < 2**64:
        raise _fail(doc, ["epoch"], f"epoch {n} must be in 1..2**64-1")
    prev_epoch = _get(doc, ["previousEpoch"], int)
    if not 0 <= prev_epoch < n:
        raise _fail(doc, ["previousEpoch"], f"previous epoch {prev_epoch} must be in 0..{n - 1}")
    terms = _get(doc, ["terms"], dict)
    for key, want in (("chainId", got.chain_id), ("ledger", got.ledger), ("operator", got.operator)):
        if terms.get(key) != want:
            raise _fail(doc, ["terms", key], f"the terms name {key} {terms.get(key)!r}, the domain {want!r}")
    _get(doc, ["terms", "block"], int)

    records, tree, lists = _parse_records(doc, got, n)
    root = _hash32(doc, ["records", "root"])
    if root != tree.root_hex:
        raise _fail(doc, ["records", "root"], f"the listed records give root {tree.root_hex}, the export says {root}")
    fees = sum(map(attrgetter("fee"), records))
    fees_total = _uint(doc, ["records", "feesTotal"])
    if fees_total != fees:
        raise _fail(doc, ["records", "feesTotal"], f"says {fees_total}, the records' fees sum to {fees}")

    # ----- rewards
    rw = _get(doc, ["rewards"], dict)
    _fields(doc, ["rewards"], rw)
    if rw["leafEncoding"] != list(REWARD_LEAF_ENCODING):
        raise _fail(doc, ["rewards", "leafEncoding"], f"must be {list(REWARD_LEAF_ENCODING)}")
    if rw["columns"] != list(REWARD_COLUMNS):
        raise _fail(doc, ["rewards", "columns"], f"must be {list(REWARD_COLUMNS)}")
    previous: dict[Address, int] = {}
    last = -1
    for i, item in enumerate(_get(doc, ["rewards", "previous"], list)):
        if not isinstance(item, list) or len(item) != 2:
            raise _fail(doc, ["rewards", "previous", i], "each entry is [account, cumulative amount]")
        a = _addr(doc, ["rewards", "previous", i, 0])
        if int(a, 16) <= last:
            raise _fail(doc, ["rewards", "previous", i], f"account {a} is out of order or repeated (sorted by address)")
        last = int(a, 16)
        previous[a] = _uint(doc, ["rewards", "previous", i, 1])
        if not previous[a]:
            raise _fail(doc, ["rewards", "previous", i, 1], "zero amounts are left out of the previous amounts")
    prev_total = _uint(doc, ["rewards", "previousTotal"])
    if prev_total != sum(previous.values()):
        raise _fail(doc, ["rewards", "previousTotal"], f"says {prev_total}, the previous amounts sum to "
                                                       f"{sum(previous.values())}")
    rewards: list[RewardEntry] = []
    last = -1
    for i, item in enumerate(_get(doc, ["rewards", "entries"], list)):
        base: list[str | int] = ["rewards", "entries", i]
        if not isinstance(item, list) or len(item) != len(REWARD_COLUMNS):
            raise _fail(doc, base, f"each entry is [{', '.join(REWARD_COLUMNS)}]")
        a = _addr(doc, [*base, 0])
        if int(a, 16) <= last:
            raise _fail(doc, base, f"account {a} is out of order or repeated (the export lists accounts by address)")
        last = int(a, 16)
        rewards.append(RewardEntry(a, _uint(doc, [*base, 1]), _uint(doc, [*base, 2]), _hash32(doc, [*base, 3])))
    if not rewards:
        raise _fail(doc, ["rewards", "entries"], "the rewards tree has at least the operator's leaf")
    wtree = StandardMerkleTree.of([[r.account, r.cumulative] for r in rewards], REWARD_LEAF_ENCODING)
    for i, rw_entry in enumerate(rewards):
        leaf_hex = to_hex(wtree.tree[wtree.tree_indices[i]])
        if rw_entry.leaf != leaf_hex:
            raise _fail(doc, ["rewards", "entries", i, 3],
                        f"account {rw_entry.account} cumulative {rw_entry.cumulative} hashes to leaf {leaf_hex}, "
                        f"the export says {rw_entry.leaf}")
    wroot = _hash32(doc, ["rewards", "root"])
    if wroot != wtree.root_hex:
        raise _fail(doc, ["rewards", "root"], f"the listed cumulative amounts give root {wtree.root_hex}, the export "
                                              f"says {wroot}")
    cum_total = _uint(doc, ["rewards", "cumulativeTotal"])
    if cum_total != sum(x.cumulative for x in rewards):
        raise _fail(doc, ["rewards", "cumulativeTotal"],
                    f"says {cum_total}, the cumulative amounts sum to {sum(x.cumulative for x in rewards)}")
    return EpochExport(data=data, sha256=sha256_hex(data), doc=doc, domain=got, epoch=n, previous_epoch=prev_epoch,
                       terms=terms, records=records, records_root=Bytes32(root), record_count=len(records),
                       fees_total=fees_total, rewards=rewards, rewards_root=Bytes32(wroot),
                       cumulative_total=cum_total, previous=previous, previous_total=prev_total, records_tree=tree,
                       rewards_tree=wtree, contributor_lists=lists)


# ----------------------------------------------------------------------------------------------------- records


def _parse_records(doc: dict[str, Any], domain: RecordDomain, n: int
                   ) -> tuple[list[AttributionRecord], StandardMerkleTree, dict[str, tuple[Contributor, ...]]]:
    """`records`: the rows as records (in the export's order, the tree's), their tree, the contributor lists.

    Bulk first: each row unpacked and range-checked in one pass, the hex columns matched in C, the leaves
    computed by `records_tree` and compared as one list. A row that fails is re-read by `_raise_row`, which
    names the field.
    """
    rec = _get(doc, ["records"], dict)
    _fields(doc, ["records"], rec)
    if rec["leafEncoding"] != list(RECORD_LEAF_ENCODING):
        raise _fail(doc, ["records", "leafEncoding"], f"must be {list(RECORD_LEAF_ENCODING)}")
    if rec["columns"] != list(RECORD_COLUMNS):
        raise _fail(doc, ["records", "columns"], f"must be {list(RECORD_COLUMNS)}")
    entries = _get(doc, ["records", "entries"], list)
    count = _get(doc, ["records", "count"], int)
    if count != len(entries):
        raise _fail(doc, ["records", "count"], f"says {count} records, the export lists {len(entries)}")
    if not entries:
        raise _fail(doc, ["records", "entries"], "an epoch has at least one record")
    lists = _contributor_lists(doc)

    records: list[AttributionRecord] = []
    append = records.append
    make = AttributionRecord
    for i, row in enumerate(entries):
        try:
            _, request_id, ids, weights, prompt, completion, fee, output_hash, ahash = row
            fee_v = int(fee)
            ids_v: tuple[AdapterId, ...] = tuple(map(AdapterId, map(int, ids)))
            if (type(row) is not list or type(prompt) is not int or type(completion) is not int
                    or str(fee_v) != fee or list(map(str, ids_v)) != ids or set(map(type, weights)) != _INT_ONLY):
                raise ValueError(i)
            r = make(n, request_id, ids_v, tuple(weights), prompt, completion, Wei(fee_v), output_hash, ahash,
                     lists[ahash])
            r._validate_fields()
        except (ValueError, TypeError, KeyError, RecordError):
            _raise_row(doc, i, n, lists, domain)
        append(r)
    for column in (_LEAF, _REQUEST_ID, _OUTPUT_HASH):
        values = list(map(itemgetter(column), entries))
        if not _all_hex32(values):
            _raise_row(doc, next(i for i, v in enumerate(values) if not (isinstance(v, str) and _HEX32(v))), n,
                       lists, domain)
    try:
        tree = records_tree(records, domain)
    except RecordError:
        for i, r in enumerate(records):
            try:
                r.abi_encode(domain)
            except RecordError:
                _raise_row(doc, i, n, lists, domain)
        raise
    computed = list(map(to_hex, map(tree.tree.__getitem__, tree.tree_indices)))
    given = list(map(itemgetter(_LEAF), entries))
    if computed != given:
        i = next(i for i, (c, g) in enumerate(zip(computed, given, strict=True)) if c != g)
        raise _fail(doc, ["records", "entries", i, _LEAF],
                    f"record {records[i].request_id}: its fields hash to leaf {computed[i]} in this domain, the "
                    f"export says {given[i]} (forged record or leaf)")
    if not all(map(str.__lt__, given, islice(given, 1, None))):
        i = next(i for i in range(1, len(given)) if given[i] <= given[i - 1])
        raise _fail(doc, ["records", "entries", i],
                    f"leaf {given[i]} is not above the previous entry's leaf {given[i - 1]}: the records are "
                    "reordered or repeated (an export lists them by leaf, ascending)")
    used = set(map(attrgetter("attribution_hash"), records))
    if len(used) != len(lists):
        j = next(j for j, h in enumerate(lists) if h not in used)
        raise _fail(doc, ["records", "contributorLists", j],
                    "no record names this contributor list (an export lists only the lists its records use)")
    return records, tree, lists


def _contributor_lists(doc: dict[str, Any]) -> dict[str, tuple[Contributor, ...]]:
    """`records.contributorLists` as {attributionHash: contributors}, each hash recomputed (in the table's
    order: ascending by hash). A row that is not canonical goes to `_raise_list` for a precise error."""
    table = _get(doc, ["records", "contributorLists"], list)
    lists: dict[str, tuple[Contributor, ...]] = {}
    last = ""
    for j, item in enumerate(table):
        try:
            h, pairs = item
            contributors = tuple((a, int(w)) for a, w in pairs)
            if (type(item) is not list or type(h) is not str or h <= last or not _HEX32(h)
                    or [[a, str(w)] for a, w in contributors] != pairs
                    or not all(map(_is_checksummed_address, map(itemgetter(0), contributors)))
                    or attribution_hash(contributors) != h):
                raise ValueError(j)
        except (ValueError, TypeError, RecordError):
            _raise_list(doc, j, last)
        lists[h] = contributors
        last = h
    return lists


def _raise_list(doc: dict[str, Any], j: int, last: str) -> NoReturn:
    """The precise error of contributor list row j (it failed the bulk check)."""
    base: list[str | int] = ["records", "contributorLists", j]
    item = _get(doc, base, list)
    if len(item) != 2:
        raise _fail(doc, base, "each entry is [attributionHash, [[account, weight], ...]]")
    h = _hash32(doc, [*base, 0])
    if h <= last:
        raise _fail(doc, base, f"attributionHash {h} is not above the previous list's {last}: the lists are "
                               "reordered or repeated (an export lists them by attributionHash, ascending)")
    contributors: list[Contributor] = []
    for k, pair in enumerate(_get(doc, [*base, 1], list)):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(doc, [*base, 1, k], "each contributor is [account, weight]")
        contributors.append((_addr(doc, [*base, 1, k, 0]), _uint(doc, [*base, 1, k, 1])))
    try:
        want = attribution_hash(contributors)
    except RecordError as e:
        raise _fail(doc, [*base, 1], str(e)) from None
    raise _fail(doc, [*base, 0], f"the contributor list hashes to {want}, the export says {h}: the attributionHash "
                                 "does not commit to its contributor list (forged list or hash)")


def _raise_row(doc: dict[str, Any], i: int, n: int, lists: Mapping[str, tuple[Contributor, ...]],
               domain: RecordDomain) -> NoReturn:
    """The precise error of record row i (it failed a bulk check): which field, and what is wrong with it."""
    base: list[str | int] = ["records", "entries", i]
    row = _get(doc, base, list)
    if len(row) != len(RECORD_COLUMNS):
        raise _fail(doc, base, f"a record row has {len(RECORD_COLUMNS)} fields ({', '.join(RECORD_COLUMNS)}), "
                               f"this one {len(row)}")
    for k in (_LEAF, _REQUEST_ID, _OUTPUT_HASH, _ATTRIBUTION_HASH):
        _hash32(doc, [*base, k])
    ids = tuple(AdapterId(_uint(doc, [*base, _ADAPTER_IDS, k])) for k in range(len(_get(doc, [*base, _ADAPTER_IDS],
                                                                                       list))))
    weights = tuple(_get(doc, [*base, _WEIGHTS, k], int) for k in range(len(_get(doc, [*base, _WEIGHTS], list))))
    prompt, completion = _get(doc, [*base, _PROMPT], int), _get(doc, [*base, _COMPLETION], int)
    fee = _uint(doc, [*base, _FEE])
    ahash = row[_ATTRIBUTION_HASH]
    if ahash not in lists:
        raise _fail(doc, [*base, _ATTRIBUTION_HASH], f"attributionHash {ahash} names no list of "
                                                     "records.contributorLists")
    r = AttributionRecord(n, row[_REQUEST_ID], ids, weights, prompt, completion, Wei(fee), row[_OUTPUT_HASH], ahash,
                          lists[ahash])
    try:
        r._validate_fields()
        r.abi_encode(domain)
    except RecordError as e:
        raise _fail(doc, base, str(e)) from None
    raise _fail(doc, base, "malformed record row")
