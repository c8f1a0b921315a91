"""The audit: recompute an operator's epoch from its published export and the chain, trusting neither the node nor
its database, and say what is wrong, one line per violation.

    chain = AuditChain(contracts)                               # reads only (any account, never sends)
    report = audit_epoch(chain, operator, n, export_bytes, lineage=...)   # AuditReport: .ok, .violations
    # the guardian's watcher, which runs this on every new epoch and revokes failing roots: watch.py

Checks of one epoch N of operator O (`audit_epoch`), each a `Violation` with a code, the entry and the amount:

    export      the export parses (export.parse_export: canonical bytes, leaves, order, contributor lists,
                both trees rebuilt, roots, totals) and names this chain, ledger, operator and epoch
    hash        sha256(export) == the chain's exportHash of (O, N)
    records     records root and count == the chain's
    terms       the terms snapshot == the chain at the snapshot block (`terms.block`): the ledger's shares, each
                adapter's owner and feePerToken, each contributor's payout and active flag
    fee         each record's fee == floor(sum_i weightBps_i * feePerToken_i * tokens / 10000), feePerToken
                read on chain at the snapshot block
    lineage     with lineage documents (an adapter owner's lineage.json, or `terms.lineage`): the document's
                training config hashes to the adapter's registered trainingConfigHash and names the roots of
                its registered datanets; each record's contributor weights == rewards.contributor_weights over
                the lineage weights (or, for token-level nodes, name only lineage contributors)
    amounts     each account's epoch amount == rewards.epoch_amounts(records, terms) (the ledger's shares with
                largest-remainder rounding, the node's own split_record and largest_remainder, each distinct
                record split once: `epoch_amounts_grouped`), and they sum to the epoch's fees
    previous    the export's previous epoch == the chain's previousLive; its previous cumulative amounts give
                that epoch's rewards root and cumulative total on chain
    decrease    no account's cumulative amount falls below its previous one; cumulative == previous + amount
    total       cumulativeTotal - previous cumulativeTotal == fees, and cumulativeTotal == the chain's
    rewards     the rewards root (tree of the new cumulative amounts) == the chain's

Lineage gap: the chain commits to an adapter's datanet roots and training-config hash, but not to the per-
contributor token counts of lineage.json (`lineage_weights`): the lineage check proves the split follows the
document the auditor holds, and that the document belongs to the adapter as far as the registered hashes go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from web3.exceptions import ContractLogicError

from loraledger.node.chain.bindings import Contracts
from loraledger.node.errors import NodeError
from loraledger.node.ledger.export import EpochExport, ExportError, parse_export
from loraledger.node.ledger.records import BPS, AttributionRecord, RecordDomain
from loraledger.node.ledger.rewards import contributor_weights, largest_remainder, rewards_tree, split_record
from loraledger.node.ledger.terms import AdapterTerms, ContributorStatus, EpochTerms, RewardsError, Shares
from loraledger.node.types import AdapterId, Address, as_address

log = logging.getLogger(__name__)

MAX_LINES_PER_CHECK = 20
"""Violations of one kind listed one per line; beyond this, one summary line says how many more."""


class AuditError(NodeError, RuntimeError):
    """The audit could not run (chain unreachable, unknown epoch, export unavailable); no verdict."""


@dataclass(frozen=True)
class Violation:
    """One thing wrong with an epoch: `code` (the check), `where` (record, account or field), the message."""

    epoch: int
    code: str
    where: str
    message: str

    def line(self, operator: str) -> str:
        return f"operator {operator} epoch {self.epoch}: [{self.code}] {self.where}: {self.message}"


@dataclass
class AuditReport:
    operator: Address
    epoch: int
    violations: list[Violation] = field(default_factory=list)
    records: int = 0
    export_sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        return [v.line(self.operator) for v in self.violations]

    def to_json(self) -> dict[str, Any]:
        return {"operator": self.operator, "epoch": self.epoch, "ok": self.ok, "records": self.records,
                "exportSha256": self.export_sha256, "notes": self.notes, "seconds": round(self.seconds, 3),
                "violations": [asdict(v) for v in self.violations]}


class _Sink:
    """Collects violations, at most MAX_LINES_PER_CHECK lines per code."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.items: list[Violation] = []
        self.dropped: dict[str, int] = {}

    def add(self, code: str, where: str, message: str) -> None:
        if sum(1 for v in self.items if v.code == code) >= MAX_LINES_PER_CHECK:
            self.dropped[code] = self.dropped.get(code, 0) + 1
            return
        self.items.append(Violation(self.epoch, code, where, message))

    def close(self) -> list[Violation]:
        for code, k in self.dropped.items():
            self.items.append(Violation(self.epoch, code, "(more)", f"{k} more violation(s) of this kind"))
        return self.items


# ------------------------------------------------------------------------------------------------- the chain side


@dataclass(frozen=True)
class ChainEpoch:
    records_root: str
    rewards_root: str
    export_hash: str
    cumulative_total: int
    record_count: int
    submitted_at: int
    previous_live: int
    revoked: bool
    effective_at: int


class AuditChain:
    """Read-only views of one deployment, each at a chosen block where the check needs it."""

    def __init__(self, contracts: Contracts) -> None:
        self.c = contracts
        self.w3 = contracts.ledger.client.w3
        self.chain_id = int(self.w3.eth.chain_id)
        self.ledger = contracts.ledger.address

    def domain(self, operator: str) -> RecordDomain:
        return RecordDomain(self.chain_id, self.ledger, as_address(operator))

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def last_epoch(self, operator: str) -> int:
        return self.c.ledger.last_epoch(operator)

    def epoch(self, operator: str, n: int) -> ChainEpoch:
        e = self.c.ledger.epoch(operator, n)
        return ChainEpoch(e.records_root, e.rewards_root, e.export_hash, int(e.cumulative_total), e.record_count,
                          e.submitted_at, e.previous_live, e.revoked, self.c.ledger.effective_at(operator, n))

    def _call(self, fn: Any, block: int) -> Any:
        return fn.call(block_identifier=block)

    def shares_at(self, block: int) -> tuple[int, int, int]:
        s = self._call(self.c.ledger.contract.functions.shares(), block)
        return int(s[0]), int(s[1]), int(s[2])

    def adapter_at(self, adapter_id: int, block: int) -> tuple[Address, int, str, tuple[int, ...]] | None:
        """(owner, feePerToken, trainingConfigHash, datanet ids) at `block`; None when not registered then."""
        try:
            a = self._call(self.c.adapters.contract.functions.getAdapter(int(adapter_id)), block)
        except ContractLogicError:
            return None
        return Address(a[3]), int(a[6]), "0x" + bytes(a[2]).hex(), tuple(int(i) for i in a[7])

    def contributor_at(self, account: str, block: int) -> tuple[Address, bool] | None:
        """(payout, active) at `block`; None when not registered then."""
        fns = self.c.contributors.contract.functions
        if not self._call(fns.isRegistered(as_address(account)), block):
            return None
        payout = as_address(str(self._call(fns.payoutOf(as_address(account)), block)))
        return payout, bool(self._call(fns.isActive(as_address(account)), block))

    def datanet_root(self, datanet_id: int) -> str:
        return self.c.datanets.get_datanet(datanet_id).contributions_root


# ------------------------------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class AdapterLineage:
    """One adapter's lineage as an auditor holds it: contributor -> tokens, and what it claims to belong to."""

    adapter_id: int
    weights: dict[Address, int]
    training_config_hash: str | None
    datanet_roots: tuple[str, ...]
    source: str
    token_level: bool = False  # the node re-weighted this adapter's contributors per token (terms "tokenLevel")


def lineage_from_document(adapter_id: int, doc: Mapping[str, Any], source: str) -> AdapterLineage:
    """An adapter's lineage from its lineage.json document (`loraledger train` writes it)."""
    from loraledger.inference.identity import config_hash
    from loraledger.node.ledger.rewards import lineage_tokens

    try:
        weights = lineage_tokens(doc)
    except RewardsError as e:
        raise AuditError(f"{source}: {e}") from None
    tc = doc.get("training_config")
    tch = config_hash(tc) if isinstance(tc, Mapping) else doc.get("training_config_hash")
    roots = tuple(str(d.get("root")) for d in doc.get("datanets", []) if isinstance(d, Mapping))
    return AdapterLineage(int(adapter_id), weights, str(tch) if tch else None, roots, source)


def load_lineage_files(paths: Iterable[str | os.PathLike[str]]) -> dict[int, AdapterLineage]:
    """`ID=PATH` or `PATH` (the id from the document's `registration.adapter_id`) lineage.json files."""
    out: dict[int, AdapterLineage] = {}
    for spec in paths:
        s = str(spec)
        aid: int | None = None
        if "=" in s and s.split("=", 1)[0].isdigit():
            k, s = s.split("=", 1)
            aid = int(k)
        p = Path(s)
        if p.is_dir():
            p = p / "lineage.json"
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise AuditError(f"--lineage {spec}: cannot read a lineage.json ({e})") from None
        if aid is None:
            reg = doc.get("registration") or {}
            if not isinstance(reg, Mapping) or reg.get("adapter_id") is None:
                raise AuditError(f"--lineage {spec}: the document names no registered adapter id; pass ID={s}")
            aid = int(reg["adapter_id"])
        out[aid] = lineage_from_document(aid, doc, str(p))
    return out


# ------------------------------------------------------------------------------------------------- the audit


def _terms_of(ex: EpochExport, sink: _Sink) -> EpochTerms | None:
    t = ex.terms
    try:
        s = [int(x) for x in t["shares"]]
        shares = Shares(s[0], s[1], s[2])
        adapters = {AdapterId(int(k)): AdapterTerms(as_address(str(v["owner"])), int(str(v["feePerToken"])))
                    for k, v in dict(t["adapters"]).items()}
        contributors = {as_address(str(k)): ContributorStatus(as_address(str(v["payout"])), bool(v["active"]))
                        for k, v in dict(t.get("contributors", {})).items()}
        return EpochTerms(shares, as_address(str(t["operator"])), adapters, contributors)
    except (KeyError, TypeError, ValueError, IndexError, RewardsError) as e:
        sink.add("terms", ex.where("terms"), f"malformed terms snapshot ({e})")
        return None


def _check_terms(chain: AuditChain, ex: EpochExport, terms: EpochTerms, sink: _Sink) -> dict[int, tuple[Any, ...]]:
    """The snapshot against the chain at its block; returns the chain's adapter views by id."""
    block = int(ex.terms["block"])
    s = chain.shares_at(block)
    mine = (terms.shares.data_bps, terms.shares.adapter_owner_bps, terms.shares.operator_bps)
    if s != mine:
        sink.add("terms", ex.where("terms", "shares"),
                 f"shares {list(mine)} but the ledger's shares at block {block} are {list(s)}")
    used = _adapters_used(ex)
    onchain: dict[int, tuple[Any, ...]] = {}
    for i in used:
        a = chain.adapter_at(i, block)
        t = terms.adapters.get(AdapterId(i))
        if a is None:
            sink.add("terms", f"adapter {i}", f"not registered at block {block}")
            continue
        onchain[i] = a
        if t is None:
            sink.add("terms", f"adapter {i}", "used by records but missing from the terms snapshot")
        elif (t.owner, t.fee_per_token) != (a[0], a[1]):
            sink.add("terms", ex.where("terms", "adapters", str(i)),
                     f"owner {t.owner} feePerToken {t.fee_per_token}, but at block {block} the registry says owner "
                     f"{a[0]} feePerToken {a[1]}")
    named = {c for contributors in ex.contributor_lists.values() for c, _ in contributors}
    for account in sorted(named, key=_address_int):
        got = chain.contributor_at(account, block)
        st = terms.contributors.get(account)
        want = ContributorStatus(got[0], got[1]) if got is not None else None
        if want is None:
            if st is not None and st.active:
                sink.add("terms", ex.where("terms", "contributors", account),
                         f"listed as active with payout {st.payout}, but not registered at block {block}")
        elif st is None or (st.active, st.payout if st.active else None) != (want.active,
                                                                              want.payout if want.active else None):
            sink.add("terms", ex.where("terms", "contributors", account) if st else f"contributor {account}",
                     f"snapshot says {st}, the registry at block {block} says payout {want.payout} "
                     f"active {want.active}")
    return onchain


def _address_int(a: str) -> int:
    return int(a, 16)


def _adapters_used(ex: EpochExport) -> list[int]:
    """The adapter ids the epoch's records name, ascending."""
    return sorted(set().union(*{r.adapter_ids for r in ex.records}))


def _check_fees(ex: EpochExport, onchain: Mapping[int, tuple[Any, ...]], sink: _Sink) -> None:
    block = int(ex.terms["block"])
    per_token: dict[tuple[tuple[AdapterId, ...], tuple[int, ...]], int | None] = {}  # sum(weight*feePerToken)
    for i, r in enumerate(ex.records):
        key = (r.adapter_ids, r.weights_bps)
        rate = per_token.get(key, -1)
        if rate == -1:
            rate = per_token[key] = (None if any(a not in onchain for a in r.adapter_ids) else
                                     sum(w * int(onchain[a][1]) for a, w in zip(*key, strict=True)))
        if rate is None:
            continue
        tokens = r.prompt_tokens + r.completion_tokens
        want = rate * tokens // BPS
        if int(r.fee) != want:
            sink.add("fee", f"record {r.request_id} ({ex.record_where(i, 'fee')})",
                     f"fee {int(r.fee)} but sum(weight*feePerToken)*{tokens}/{BPS} with the adapters' terms at "
                     f"block {block} is {want} (difference {int(r.fee) - want})")


def _check_lineage(chain: AuditChain, ex: EpochExport, onchain: Mapping[int, tuple[Any, ...]],
                   lineage: Mapping[int, AdapterLineage], token_level: bool, sink: _Sink, notes: list[str]) -> None:
    usable: dict[AdapterId, dict[Address, int]] = {}
    roots_cache: dict[int, str] = {}
    for aid, lin in sorted(lineage.items()):
        a = onchain.get(aid)
        if a is None:
            continue
        ok = True
        if lin.training_config_hash is not None and lin.training_config_hash != a[2]:
            sink.add("lineage", f"adapter {aid}", f"lineage {lin.source} has training config hash "
                     f"{lin.training_config_hash}, the adapter is registered with {a[2]}")
            ok = False
        want_roots = sorted(roots_cache.setdefault(d, chain.datanet_root(d)) for d in a[3])
        if lin.datanet_roots and sorted(lin.datanet_roots) != want_roots:
            sink.add("lineage", f"adapter {aid}", f"lineage {lin.source} names datanet roots "
                     f"{sorted(lin.datanet_roots)}, the adapter is registered on {want_roots}")
            ok = False
        if ok:
            usable[AdapterId(aid)] = lin.weights
    used = _adapters_used(ex)
    missing = [i for i in used if i not in lineage]
    if missing:
        notes.append(f"no lineage document for adapters {missing}: their records' contributor split was not "
                     "checked (pass --lineage ID=lineage.json)")
    # a record's expected list depends on its adapters and weights only, its list is named by its attributionHash:
    # each (adapters, weights, attributionHash) is checked once, and every record of a failing one is listed
    verdicts: dict[tuple[tuple[AdapterId, ...], tuple[int, ...], str], tuple[str, str] | None] = {}
    for i, r in enumerate(ex.records):
        key = (r.adapter_ids, r.weights_bps, r.attribution_hash)
        if key not in verdicts:
            per_token = token_level or any(lineage[a].token_level for a in r.adapter_ids if a in lineage)
            verdicts[key] = (None if not all(a in usable for a in r.adapter_ids) else
                             _lineage_verdict(r.adapter_ids, r.weights_bps, r.contributors, onchain, usable,
                                              per_token))
        bad = verdicts[key]
        if bad is not None:
            column, message = bad
            sink.add("lineage", f"record {r.request_id} ({ex.record_where(i, column or None)})", message)


def _lineage_verdict(adapter_ids: tuple[AdapterId, ...], weights_bps: tuple[int, ...],
                     contributors: Sequence[tuple[Address, int]], onchain: Mapping[int, tuple[Any, ...]],
                     usable: Mapping[AdapterId, Mapping[Address, int]], token_level: bool) -> tuple[str, str] | None:
    """What is wrong with a record's contributor list against its adapters' lineage: (the record's column to
    name, or "" for the whole record; the message), or None when it agrees."""
    have = dict(contributors)
    if token_level:
        allowed = {c for a in adapter_ids for c in usable[a]}
        extra = sorted(set(have) - allowed)
        return ("", f"contributors {extra} are in none of its adapters' lineage") if extra else None
    fees = [int(onchain[a][1]) for a in adapter_ids]
    want = contributor_weights(adapter_ids, weights_bps, fees, usable)
    if have == want:
        return None
    diff = sorted(set(have) | set(want), key=_address_int)
    bad = [(c, have.get(c, 0), want.get(c, 0)) for c in diff if have.get(c, 0) != want.get(c, 0)]
    c, h, w = bad[0]
    return "contributors", (f"contributor split differs from the adapters' lineage: {c} has weight {h}, lineage "
                            f"gives {w}" + (f" ({len(bad) - 1} more account(s) differ)" if len(bad) > 1 else ""))


def epoch_amounts_grouped(records: Sequence[AttributionRecord], terms: EpochTerms) -> dict[Address, int]:
    """`rewards.epoch_amounts(records, terms)`, with `split_record` run once per distinct (fee, attributionHash,
    adapters, weights): a record's split depends on nothing else (its contributor list is the one its
    attributionHash names), so records that repeat one are added as split * count. Sums exactly, as the
    node's own function does; tests hold the two equal."""
    groups: dict[tuple[int, str, tuple[AdapterId, ...], tuple[int, ...]], list[Any]] = {}
    total = 0
    for r in records:
        total += r.fee
        key = (r.fee, r.attribution_hash, r.adapter_ids, r.weights_bps)
        g = groups.get(key)
        if g is None:
            groups[key] = [r, 1]
        else:
            g[1] += 1
    if total == 0:
        return {}
    subunits: dict[Address, int] = {}
    for r, count in groups.values():
        for a, v in split_record(r, terms).items():
            subunits[a] = subunits.get(a, 0) + v * count
    return largest_remainder(total, subunits, _address_int)


def _check_amounts(ex: EpochExport, terms: EpochTerms, sink: _Sink) -> None:
    try:
        want = epoch_amounts_grouped(ex.records, terms)
    except RewardsError as e:
        sink.add("amounts", "terms", f"the epoch's amounts cannot be computed from its terms: {e}")
        return
    have = ex.amounts
    for k, a in enumerate(sorted(set(want) | set(have), key=lambda x: int(x, 16))):
        if have.get(a, 0) != want.get(a, 0):
            idx = next((i for i, e in enumerate(ex.rewards) if e.account == a), None)
            where = f"account {a}" + (f" ({ex.where('rewards', 'entries', idx, 'amount')})" if idx is not None else "")
            sink.add("amounts", where, f"epoch amount {have.get(a, 0)} but the ledger's shares give "
                     f"{want.get(a, 0)} (difference {have.get(a, 0) - want.get(a, 0)})")
    paid = sum(have.values())
    if paid != ex.fees_total:
        sink.add("amounts", "rewards.entries", f"the epoch's amounts sum to {paid}, its fees to {ex.fees_total}")


def _compare_previous(chain: AuditChain, ex: EpochExport, prev: ChainEpoch, p: int, data: bytes, operator: Address,
                      sink: _Sink) -> None:
    """Per account: the previous live epoch's own export (checked against its exportHash) against the previous
    amounts this export builds on, and against the new cumulative amounts (names the account lowered)."""
    if hashlib.sha256(data).hexdigest() != prev.export_hash[2:]:
        return  # not the published export of epoch p: nothing to compare per account (the root check stands)
    try:
        before = parse_export(data, domain=chain.domain(operator), epoch=p).cumulative
    except ExportError:
        return
    cum = ex.cumulative
    for a in sorted(set(before) | set(ex.previous), key=lambda x: int(x, 16)):
        b, listed = before.get(a, 0), ex.previous.get(a, 0)
        if listed != b:
            sink.add("previous", f"account {a}", f"epoch {p}'s export gives it {b}, this export builds on {listed}")
        if cum.get(a, 0) < b:
            sink.add("decrease", f"account {a}", f"cumulative amount falls from {b} (epoch {p}) to {cum.get(a, 0)} "
                     f"(lowered by {b - cum.get(a, 0)})")


def _check_cumulative(chain: AuditChain, ex: EpochExport, info: ChainEpoch, operator: Address, sink: _Sink,
                      previous_data: bytes | None = None) -> None:
    if ex.previous_epoch != info.previous_live:
        sink.add("previous", ex.where("previousEpoch"),
                 f"builds on epoch {ex.previous_epoch}, the chain says this epoch extends epoch {info.previous_live}")
    if info.previous_live:
        prev = chain.epoch(operator, info.previous_live)
        root = rewards_tree(ex.previous, operator).root_hex
        if root != prev.rewards_root:
            sink.add("previous", ex.where("rewards", "previous"),
                     f"the previous cumulative amounts give rewards root {root}, epoch {info.previous_live}'s on "
                     f"chain is {prev.rewards_root} (an account's previous amount was altered or dropped)")
        if ex.previous_total != prev.cumulative_total:
            sink.add("previous", ex.where("rewards", "previousTotal"),
                     f"{ex.previous_total}, but epoch {info.previous_live}'s cumulative total on chain is "
                     f"{prev.cumulative_total}")
        if previous_data is not None:
            _compare_previous(chain, ex, prev, info.previous_live, previous_data, operator, sink)
    elif ex.previous:
        sink.add("previous", ex.where("rewards", "previous"), "lists previous amounts, but this is the operator's "
                 "first live epoch")
    cum = ex.cumulative
    for a, before in sorted(ex.previous.items(), key=lambda av: int(av[0], 16)):
        after = cum.get(a, 0)
        if after < before:
            sink.add("decrease", f"account {a}", f"cumulative amount falls from {before} to {after} "
                     f"(lowered by {before - after})")
    amounts = ex.amounts
    for e in ex.rewards:
        want = ex.previous.get(e.account, 0) + amounts.get(e.account, 0)
        if e.cumulative != want and e.cumulative >= ex.previous.get(e.account, 0):
            sink.add("decrease", f"account {e.account}", f"cumulative {e.cumulative} != previous "
                     f"{ex.previous.get(e.account, 0)} + epoch amount {amounts.get(e.account, 0)}")
    grown = ex.cumulative_total - ex.previous_total
    if grown != ex.fees_total:
        sink.add("total", ex.where("rewards", "cumulativeTotal"),
                 f"the cumulative total grows by {grown}, the epoch's fees are {ex.fees_total}")


def audit_epoch(chain: AuditChain, operator: str, n: int, data: bytes | None, *,
                lineage: Mapping[int, AdapterLineage] | None = None, token_level: bool = False,
                previous_data: bytes | None = None) -> AuditReport:
    """Audit epoch `n` of `operator` against `data` (its export; None: not published). AuditError when the chain
    cannot be read or has no such epoch; a violation for everything wrong with the epoch (module docstring).
    `previous_data`, the export of the epoch it builds on, lets a lowered account be named."""
    t0 = time.perf_counter()
    op = as_address(operator)
    report = AuditReport(op, n)
    sink = _Sink(n)
    last = chain.last_epoch(op)
    if not 0 < n <= last:
        raise AuditError(f"operator {op} has no epoch {n} on chain {chain.chain_id} (its last is {last})")
    info = chain.epoch(op, n)
    if data is None:
        sink.add("export", "export", f"not published: the epoch's export (sha256 {info.export_hash}) could not be "
                 "fetched from any source")
        report.violations = sink.close()
        return report
    report.export_sha256 = "0x" + hashlib.sha256(data).hexdigest()
    if report.export_sha256 != info.export_hash:
        sink.add("hash", "export", f"sha256 {report.export_sha256} but the chain's exportHash is {info.export_hash}")
    try:
        ex = parse_export(data, domain=chain.domain(op), epoch=n)
    except ExportError as e:
        sink.add("export", "export", str(e))
        report.violations = sink.close()
        report.seconds = time.perf_counter() - t0
        return report
    report.records = ex.record_count
    if ex.records_root != info.records_root:
        sink.add("records", ex.where("records", "root"), f"{ex.records_root}, the chain's records root is "
                 f"{info.records_root}")
    if ex.record_count != info.record_count:
        sink.add("records", ex.where("records", "count"), f"{ex.record_count} records, the chain says "
                 f"{info.record_count}")
    if ex.rewards_root != info.rewards_root:
        sink.add("rewards", ex.where("rewards", "root"), f"{ex.rewards_root}, the chain's rewards root is "
                 f"{info.rewards_root}")
    if ex.cumulative_total != info.cumulative_total:
        sink.add("total", ex.where("rewards", "cumulativeTotal"), f"{ex.cumulative_total}, the chain's cumulative "
                 f"total is {info.cumulative_total}")
    terms = _terms_of(ex, sink)
    if terms is not None:
        if terms.operator != op:
            sink.add("terms", ex.where("terms", "operator"), f"names operator {terms.operator}")
        onchain = _check_terms(chain, ex, terms, sink)
        _check_fees(ex, onchain, sink)
        lin = dict(lineage or {})
        embedded = ex.terms.get("lineage")
        if isinstance(embedded, Mapping):
            for k, v in embedded.items():
                if int(k) not in lin and isinstance(v, Mapping):
                    lin[int(k)] = AdapterLineage(int(k), {as_address(a): int(t) for a, t in
                                                          dict(v.get("weights", {})).items()},
                                                 v.get("trainingConfigHash"), tuple(v.get("datanetRoots", ())),
                                                 "export terms.lineage", bool(v.get("tokenLevel", False)))
        _check_lineage(chain, ex, onchain, lin, token_level, sink, report.notes)
        _check_amounts(ex, terms, sink)
    _check_cumulative(chain, ex, info, op, sink, previous_data)
    report.violations = sink.close()
    report.seconds = time.perf_counter() - t0
    return report
