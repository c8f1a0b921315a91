"""The canonical epoch export: one file per epoch, byte-for-byte reproducible from the record log once the epoch is
built, whose sha256 the operator submits on chain with the epoch (`exportHash`).

    data = canonical_export(log, n)           # bytes; sha256(data) == the chain's exportHash of epoch n
    export_sha256(log, n)                     # "0x" + sha256 hex
    ex = parse_export(data, domain=RecordDomain(chain_id, ledger, operator), epoch=n)   # validated, or ExportError

It holds everything needed to recompute the epoch's two roots and its amounts without the operator's database.
Written as JSON with sorted keys, no whitespace, ASCII only, so the same log always gives the same bytes:

    {"format": "loraledger-epoch-export-v1",
     "domain": {"chainId", "ledger", "operator"},        # whose stream the record leaves belong to
     "epoch": n,
     "previousEpoch": p,                                 # the live epoch n builds on (0: none)
     "terms": {...},                                     # the terms snapshot as the settler stored it, with its
                                                         #   "block": shares, adapter owner + feePerToken,
                                                         #   contributor payout + active, and the domain
     "records": {"leafEncoding": [...], "root", "count", "feesTotal",
                 "entries": [{"leaf", "proof", "record": {...}}, ...]},      # sorted by leaf (the tree's order)
     "rewards": {"leafEncoding": [...], "root", "cumulativeTotal", "previousTotal",
                 "previous": [[account, cumulative before], ...],            # sorted by address
                 "entries": [{"account", "amount", "cumulative", "leaf", "proof"}, ...]}}   # sorted by address

`records.entries` are the records tree's leaves with each record's fields (its contributor list included: the
lineage weights the node used for it, committed by its attributionHash) and its proof; `rewards.entries` the
leaves of the cumulative rewards tree (what each account earned this epoch, `amount`, and its new cumulative
amount) with proofs; `rewards.previous` every account's cumulative amount under the previous live epoch, so
the rewards tree of `previousEpoch` can be rebuilt and checked against the chain. Uint256 values are decimal
strings. Both trees are given by their leaves, proofs and roots (the inner nodes follow from the leaves).

Lineage. Records carry their contributor weights; the per-adapter lineage weights they were computed from
(lineage.json's `lineage_weights`) are not in the record log, so the export holds them only when the terms
snapshot does (`terms["lineage"]`: {adapterId: {"trainingConfigHash", "weights": {contributor: tokens}}}); an
auditor otherwise takes the adapters' lineage.json files from their owners (`loraledger audit --lineage`).

`parse_export` validates an export on its own (no chain): canonical bytes, the domain and epoch asked for,
every record's fields, attributionHash, leaf, order and proof, both roots, counts and totals. Its `ExportError`
says where: the byte range, the entry (leaf, record or account) and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraledger.node.errors import NodeError
from loraledger.node.ledger.epochs import CONFIRMED, SUBMITTED, rebuild_epoch
from loraledger.node.ledger.merkle import (
    RECORD_LEAF_ENCODING,
    REWARD_LEAF_ENCODING,
    StandardMerkleTree,
    gc_paused,
    to_hex,
)
from loraledger.node.ledger.records import AttributionRecord, RecordDomain, RecordError, records_tree
from loraledger.node.ledger.rewards import rewards_tree
from loraledger.node.types import Address, Bytes32, as_address

if TYPE_CHECKING:
    from loraledger.node.ledger.record_log import RecordLog

EXPORT_FORMAT = "loraledger-epoch-export-v1"


class ExportError(NodeError, ValueError):
    """An epoch export is malformed, truncated, reordered, forged or for another stream; the message says where."""


# ----------------------------------------------------------------------------------------------------- writing


def dump_export(doc: Mapping[str, Any]) -> bytes:
    """The canonical bytes of an export document: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


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
    """
    rtree = records_tree_ if records_tree_ is not None else records_tree(records, domain)
    cumulative: dict[Address, int] = {a: int(v) for a, v in previous.items()}
    for a, v in amounts.items():
        cumulative[a] = cumulative.get(a, 0) + int(v)
    wtree = rewards_tree_ if rewards_tree_ is not None else rewards_tree(cumulative, domain.operator)
    with gc_paused():
        leaves = [rtree.tree[ti] for ti in rtree.tree_indices]
        order = sorted(range(len(records)), key=leaves.__getitem__)
        entries = [{"leaf": to_hex(leaves[i]), "proof": rtree.get_proof_hex(i), "record": records[i].to_json()}
                   for i in order]
        rewards = [{"account": str(a), "amount": str(int(amounts.get(as_address(str(a)), 0))), "cumulative": str(int(v)),
                    "leaf": to_hex(wtree.tree[wtree.tree_indices[i]]), "proof": wtree.get_proof_hex(i)}
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
            "root": rtree.root_hex,
            "count": len(records),
            "feesTotal": str(sum(int(r.fee) for r in records)),
            "entries": entries,
        },
        "rewards": {
            "leafEncoding": list(REWARD_LEAF_ENCODING),
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


# ----------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RewardEntry:
    account: Address
    amount: int
    cumulative: int
    leaf: str
    proof: list[str]


@dataclass
class EpochExport:
    """A parsed export whose internal consistency `parse_export` checked (trees, leaves, proofs, totals)."""

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

    def where(self, *path: str | int) -> str:
        """`path` with its byte range in the export, e.g. "records.entries[3] (bytes 812-1544)"."""
        return locate(self.doc, path)

    @property
    def cumulative(self) -> dict[Address, int]:
        return {e.account: e.cumulative for e in self.rewards}

    @property
    def amounts(self) -> dict[Address, int]:
        return {e.account: e.amount for e in self.rewards if e.amount}


def _span(doc: Any, path: Sequence[str | int]) -> tuple[int, int]:
    """Byte offsets [start, end) of the value at `path` inside `dump_export(doc)` (computed by re-serialising the
    siblings before it; used on error paths only)."""
    start = 0
    node = doc
    for key in path:
        if isinstance(node, dict):
            start += 1  # "{"
            for k in sorted(node):
                head = json.dumps(k) + ":"
                if k == key:
                    start += len(head)
                    break
                start += len(head) + len(dump_export(node[k])) + 1
            else:
                raise KeyError(key)
            node = node[key]
        else:
            assert isinstance(key, int)
            start += 1  # "["
            for item in node[:key]:
                start += len(dump_export(item)) + 1
            node = node[key]
    return start, start + len(dump_export(node))


def _path_text(path: Sequence[str | int]) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out or "(document)"


def locate(doc: Any, path: Sequence[str | int]) -> str:
    """ "<path> (bytes a-b)" for a value of a canonical export document."""
    try:
        a, b = _span(doc, path)
    except (KeyError, IndexError, TypeError):
        return _path_text(path)
    return f"{_path_text(path)} (bytes {a}-{b - 1})"


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
    if len(s) != 66 or not s.startswith("0x") or s[2:] != s[2:].lower() or any(c not in "0123456789abcdef"
                                                                                  for c in s[2:]):
        raise _fail(doc, path, f"must be 0x + 64 lowercase hex digits, got {s[:80]!r}")
    return s


def _addr(doc: Any, path: Sequence[str | int]) -> Address:
    s = _get(doc, path, str)
    try:
        a = as_address(s)
    except (ValueError, NodeError) as e:
        raise _fail(doc, path, f"not an address ({e})") from None
    if a != s:
        raise _fail(doc, path, f"address must be written checksummed as {a}")
    return a


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
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as je:
        if je.pos >= size - 1 or "Unterminated" in je.msg or "Expecting" in je.msg and je.pos >= size - 2:
            raise ExportError(f"the export is truncated: its JSON ends at byte {size} of what should be more "
                              f"({je.msg}); fetch it again") from None
        raise ExportError(f"not JSON at byte {je.pos} of {size}: {je.msg}") from None
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
    n = _get(doc, ["epoch"], int)
    if epoch is not None and n != epoch:
        raise _fail(doc, ["epoch"], f"this export is of epoch {n}, not epoch {epoch}")
    prev_epoch = _get(doc, ["previousEpoch"], int)
    if not 0 <= prev_epoch < n:
        raise _fail(doc, ["previousEpoch"], f"previous epoch {prev_epoch} must be in 0..{n - 1}")
    terms = _get(doc, ["terms"], dict)
    for key, want in (("chainId", got.chain_id), ("ledger", got.ledger), ("operator", got.operator)):
        if terms.get(key) != want:
            raise _fail(doc, ["terms", key], f"the terms name {key} {terms.get(key)!r}, the domain {want!r}")
    _get(doc, ["terms", "block"], int)

    # ----- records
    rec = _get(doc, ["records"], dict)
    if rec.get("leafEncoding") != list(RECORD_LEAF_ENCODING):
        raise _fail(doc, ["records", "leafEncoding"], f"must be {list(RECORD_LEAF_ENCODING)}")
    entries = _get(doc, ["records", "entries"], list)
    count = _get(doc, ["records", "count"], int)
    if count != len(entries):
        raise _fail(doc, ["records", "count"], f"says {count} records, the export lists {len(entries)}")
    if not entries:
        raise _fail(doc, ["records", "entries"], "an epoch has at least one record")
    records: list[AttributionRecord] = []
    fees = 0
    with gc_paused():
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("record"), dict):
                raise _fail(doc, ["records", "entries", i], "each entry is {leaf, proof, record}")
            try:
                r = AttributionRecord.from_json(e["record"])
                r.validate()
            except RecordError as err:
                raise _fail(doc, ["records", "entries", i, "record"], str(err)) from None
            if r.epoch != n:
                raise _fail(doc, ["records", "entries", i, "record", "epoch"],
                            f"record {r.request_id} names epoch {r.epoch}, the export is of epoch {n}")
            records.append(r)
            fees += int(r.fee)
        tree = records_tree(records, got)
        leaves = [tree.tree[ti] for ti in tree.tree_indices]
        prev_leaf = b""
        for i, (e, leaf) in enumerate(zip(entries, leaves, strict=True)):
            given = e.get("leaf")
            if given != to_hex(leaf):
                raise _fail(doc, ["records", "entries", i, "leaf"],
                            f"record {records[i].request_id}: its fields hash to leaf {to_hex(leaf)} in this domain, "
                            f"the export says {str(given)[:80]} (forged record or leaf)")
            if leaf <= prev_leaf:
                raise _fail(doc, ["records", "entries", i],
                            f"leaf {to_hex(leaf)} is not above the previous entry's leaf {to_hex(prev_leaf)}: the "
                            "records are reordered or repeated (an export lists them by leaf, ascending)")
            prev_leaf = leaf
        # the entries are in leaf order, so entry i sits at tree index 2n-2-i: its proof is read off the tree
        for i, e in enumerate(entries):
            proof = e.get("proof")
            if proof != tree.get_proof_hex(i):
                raise _fail(doc, ["records", "entries", i, "proof"],
                            f"record {records[i].request_id}: the proof does not lead to the records root")
    root = _hash32(doc, ["records", "root"])
    if root != tree.root_hex:
        raise _fail(doc, ["records", "root"], f"the listed records give root {tree.root_hex}, the export says {root}")
    fees_total = _uint(doc, ["records", "feesTotal"])
    if fees_total != fees:
        raise _fail(doc, ["records", "feesTotal"], f"says {fees_total}, the records' fees sum to {fees}")

    # ----- rewards
    rw = _get(doc, ["rewards"], dict)
    if rw.get("leafEncoding") != list(REWARD_LEAF_ENCODING):
        raise _fail(doc, ["rewards", "leafEncoding"], f"must be {list(REWARD_LEAF_ENCODING)}")
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
    prev_total = _uint(doc, ["rewards", "previousTotal"])
    if prev_total != sum(previous.values()):
        raise _fail(doc, ["rewards", "previousTotal"], f"says {prev_total}, the previous amounts sum to "
                                                       f"{sum(previous.values())}")
    rewards: list[RewardEntry] = []
    last = -1
    for i, item in enumerate(_get(doc, ["rewards", "entries"], list)):
        base: list[str | int] = ["rewards", "entries", i]
        if not isinstance(item, dict):
            raise _fail(doc, base, "each entry is {account, amount, cumulative, leaf, proof}")
        a = _addr(doc, [*base, "account"])
        if int(a, 16) <= last:
            raise _fail(doc, base, f"account {a} is out of order or repeated (the export lists accounts by address)")
        last = int(a, 16)
        proof = _get(doc, [*base, "proof"], list)
        rewards.append(RewardEntry(a, _uint(doc, [*base, "amount"]), _uint(doc, [*base, "cumulative"]),
                                   _hash32(doc, [*base, "leaf"]), [str(p) for p in proof]))
    if not rewards:
        raise _fail(doc, ["rewards", "entries"], "the rewards tree has at least the operator's leaf")
    wtree = StandardMerkleTree.of([[r.account, r.cumulative] for r in rewards], REWARD_LEAF_ENCODING)
    for i, rw_entry in enumerate(rewards):
        leaf_hex = to_hex(wtree.tree[wtree.tree_indices[i]])
        if rw_entry.leaf != leaf_hex:
            raise _fail(doc, ["rewards", "entries", i, "leaf"],
                        f"account {rw_entry.account} cumulative {rw_entry.cumulative} hashes to leaf {leaf_hex}, "
                        f"the export says {rw_entry.leaf}")
        if rw_entry.proof != wtree.get_proof_hex(i):
            raise _fail(doc, ["rewards", "entries", i, "proof"],
                        f"account {rw_entry.account}: the proof does not lead to the rewards root")
    wroot = _hash32(doc, ["rewards", "root"])
    if wroot != wtree.root_hex:
        raise _fail(doc, ["rewards", "root"], f"the listed cumulative amounts give root {wtree.root_hex}, the export "
                                              f"says {wroot}")
    cum_total = _uint(doc, ["rewards", "cumulativeTotal"])
    if cum_total != sum(x.cumulative for x in rewards):
        raise _fail(doc, ["rewards", "cumulativeTotal"],
                    f"says {cum_total}, the cumulative amounts sum to {sum(x.cumulative for x in rewards)}")
    return EpochExport(data=data, sha256=sha256_hex(data), doc=doc, domain=got, epoch=n, previous_epoch=prev_epoch,
                       terms=terms, records=records, records_root=Bytes32(root), record_count=count,
                       fees_total=fees_total, rewards=rewards, rewards_root=Bytes32(wroot),
                       cumulative_total=cum_total, previous=previous, previous_total=prev_total)
