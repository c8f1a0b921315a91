"""The guardian's side of the audit: where an epoch's export is fetched from, and the watcher that audits each
epoch as it lands and revokes one that fails while its challenge delay runs.

    fetch = make_fetch(export=..., server=..., uri_template=..., chain_id=..., ledger=...)   # Fetch
    Watcher(chain, guardian_contracts, operators, fetch, state_path, WatchOptions(...)).run(stop)

The audit itself (every check of one epoch against the chain and its export) is `audit.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import CONNECTION_ERRORS
from loraledger.node.errors import ContractRevertError
from loraledger.node.ledger.audit import (
    AdapterLineage,
    AuditChain,
    AuditError,
    ChainEpoch,
    Violation,
    audit_epoch,
)
from loraledger.node.types import Address, as_address

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- export sources


Fetch = Callable[[str, int], "bytes | None"]
"""fetch(operator, epoch) -> the export's bytes, or None when no source has it (yet)."""


def expand_template(template: str, *, chain_id: int, ledger: str, operator: str, epoch: int) -> str:
    """A mirror URI template with {chainId}, {ledger}, {operator} and {epoch} filled in."""
    try:
        return template.format(chainId=chain_id, ledger=ledger, operator=operator, epoch=epoch)
    except (KeyError, IndexError, ValueError) as e:
        raise AuditError(f"export URI template {template!r} is malformed ({e}); it may use {{chainId}}, "
                         "{ledger}, {operator} and {epoch}") from None


def fetch_uri(uri: str, timeout: float = 30.0) -> bytes | None:
    """The bytes at a file path, file:// or http(s):// URI; None when absent (404, no file, unreachable)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri, timeout=timeout) as resp:
                return bytes(resp.read())
        except (OSError, ValueError) as e:
            log.info("export not at %s (%s)", uri, e)
            return None
    path = Path(uri.removeprefix("file://"))
    try:
        return path.read_bytes()
    except OSError:
        return None


def fetch_grpc(server: str, epoch: int, timeout: float = 60.0, api_key: str = "") -> bytes | None:
    """The export of `epoch` from a node's `Attribution.GetEpochExport` stream; None when the node has none."""
    import grpc

    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb
    from loraledger.proto.loraledger.v1 import loraledger_pb2_grpc as pb_grpc

    md = [("x-api-key", api_key)] if api_key else []
    try:
        with grpc.insecure_channel(server, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.AttributionStub(ch)
            parts: list[bytes] = []
            total = -1
            sha = ""
            for msg in stub.GetEpochExport(pb.GetEpochExportRequest(epoch=epoch), timeout=timeout, metadata=md):
                if msg.total_bytes:
                    total, sha = int(msg.total_bytes), msg.sha256
                parts.append(bytes(msg.data))
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.info("node %s has no export of epoch %d: %s", server, epoch, e.details())
            return None
        raise AuditError(f"node {server}: GetEpochExport({epoch}) failed: {e.code().name} {e.details()}") from None
    data = b"".join(parts)
    if total >= 0 and len(data) != total:
        log.warning("node %s streamed %d of %d bytes of epoch %d's export", server, len(data), total, epoch)
    if sha and "0x" + hashlib.sha256(data).hexdigest() != sha:
        log.warning("node %s: the streamed export of epoch %d does not match the sha256 the node announced", server,
                    epoch)
    return data


def make_fetch(*, export: str | None = None, server: str | None = None, uri_template: str | None = None,
               chain_id: int = 0, ledger: str = "", api_key: str = "") -> Fetch:
    """The export sources, tried in order: a file or folder (`export`: FILE, a folder holding
    epoch-{N}.json / {operator}/epoch-{N}.json, or a template), a node over gRPC, a mirror URI template."""

    def fetch(operator: str, epoch: int) -> bytes | None:
        if export:
            p = Path(export)
            if "{" in export:
                got = fetch_uri(expand_template(export, chain_id=chain_id, ledger=ledger, operator=operator,
                                                epoch=epoch))
                if got is not None:
                    return got
            elif p.is_dir():
                for cand in (p / f"epoch-{epoch}.json", p / operator / f"epoch-{epoch}.json"):
                    if cand.is_file():
                        return cand.read_bytes()
            elif p.is_file():
                return p.read_bytes()
        if server:
            got = fetch_grpc(server, epoch, api_key=api_key)
            if got is not None:
                return got
        if uri_template:
            return fetch_uri(expand_template(uri_template, chain_id=chain_id, ledger=ledger, operator=operator,
                                             epoch=epoch))
        return None

    return fetch


# ------------------------------------------------------------------------------------------------- the watcher


@dataclass
class WatchOptions:
    """grace: seconds after an epoch's submission its export may stay unreachable before that counts as a
    failure (must leave time to revoke inside the delay); poll: seconds between passes; lineage/token_level: as
    `audit_epoch`."""

    grace: float = 600.0
    poll: float = 5.0
    lineage: Mapping[int, AdapterLineage] = field(default_factory=dict)
    token_level: bool = False
    safety: float = 2.0  # seconds before effectiveAt still worth a revoke attempt


class WatchState:
    """The watcher's progress, one small JSON file, rewritten atomically after every decision:

    {"version": 1, "operators": {op: {"next": N, "verdicts": {"N": {"ok", "action", "violations": [lines]}}}}}
    `next` is the first epoch not yet decided; an epoch is decided once audited (and revoked if it failed) or
    found revoked or already in effect."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.doc: dict[str, Any] = {"version": 1, "operators": {}}
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise AuditError(f"watch state {self.path} is unreadable ({e}); fix or delete it") from None
            if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("operators"), dict):
                raise AuditError(f"watch state {self.path} is not a version-1 state file; fix or delete it")
            self.doc = doc

    def op(self, operator: str) -> dict[str, Any]:
        ops: dict[str, Any] = self.doc["operators"]
        return ops.setdefault(as_address(operator), {"next": 1, "verdicts": {}})

    def decide(self, operator: str, epoch: int, verdict: Mapping[str, Any]) -> None:
        st = self.op(operator)
        st["verdicts"][str(epoch)] = dict(verdict)
        while str(st["next"]) in st["verdicts"]:
            st["next"] += 1
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


class Watcher:
    """Follows the epochs of `operators`, audits each as it lands and revokes a failing one during its delay."""

    def __init__(self, chain: AuditChain, guardian: Contracts | None, operators: Sequence[str], fetch: Fetch,
                 state_path: str | os.PathLike[str], options: WatchOptions | None = None,
                 emit: Callable[[str], None] | None = None) -> None:
        self.chain = chain
        self.guardian = guardian
        self.operators = [as_address(o) for o in operators]
        self.fetch = fetch
        self.state = WatchState(state_path)
        self.options = options or WatchOptions()
        self.emit = emit or (lambda line: log.info("%s", line))
        for o in self.operators:
            self.state.op(o)
        self.state.save()

    def run(self, stop: threading.Event, max_passes: int | None = None) -> None:
        """`step` every `poll` s until `stop` is set; RPC outages are logged and retried on the next pass."""
        passes = 0
        while not stop.is_set():
            try:
                self.step()
            except CONNECTION_ERRORS as e:
                self.emit(f"watch: chain unreachable ({e}); retrying in {self.options.poll:g} s")
            passes += 1
            if max_passes is not None and passes >= max_passes:
                return
            stop.wait(self.options.poll)

    def step(self) -> list[tuple[str, int, str]]:
        """One pass over every operator's undecided epochs: [(operator, epoch, action)] decided in this pass."""
        done: list[tuple[str, int, str]] = []
        for op in self.operators:
            last = self.chain.last_epoch(op)
            st = self.state.op(op)
            for n in range(int(st["next"]), last + 1):
                if str(n) in st["verdicts"]:
                    continue
                action = self._one(op, n)
                if action is not None:
                    done.append((op, n, action))
        return done

    def _one(self, op: Address, n: int) -> str | None:
        info = self.chain.epoch(op, n)
        now = self.chain.now()
        if info.revoked:
            self.state.decide(op, n, {"ok": None, "action": "already revoked"})
            return "already revoked"
        data = self.fetch(op, n)
        if data is None and now - info.submitted_at < self.options.grace and now < info.effective_at:
            return None  # not published yet: wait, within the grace
        prev = self.fetch(op, info.previous_live) if data is not None and info.previous_live else None
        report = audit_epoch(self.chain, op, n, data, lineage=self.options.lineage,
                             token_level=self.options.token_level, previous_data=prev)
        if data is None:
            report.violations[0] = Violation(n, "export", "export", f"not published within the grace of "
                                             f"{self.options.grace:g} s after submission ({now - info.submitted_at} s "
                                             f"ago); sha256 {info.export_hash}")
        lines = report.lines()
        if report.ok:
            self.emit(f"operator {op} epoch {n}: PASS ({report.records} records)")
            self.state.decide(op, n, {"ok": True, "action": "passed"})
            return "passed"
        for line in lines:
            self.emit(line)
        action = self._revoke(op, n, info)
        self.state.decide(op, n, {"ok": False, "action": action, "violations": lines})
        if action == "revoked":
            for k in range(n + 1, self.chain.last_epoch(op) + 1):  # built on n: revoked with it
                if str(k) not in self.state.op(op)["verdicts"]:
                    self.state.decide(op, k, {"ok": None, "action": f"revoked with epoch {n}"})
        return action

    def _revoke(self, op: Address, n: int, info: ChainEpoch) -> str:
        if self.guardian is None:
            self.emit(f"operator {op} epoch {n}: FAIL (no guardian key: not revoked)")
            return "failed, not revoked (no guardian key)"
        if self.chain.now() + self.options.safety >= info.effective_at:
            self.emit(f"operator {op} epoch {n}: FAIL, but its root took effect at {info.effective_at}: too late "
                      "to revoke")
            return "failed, already in effect"
        try:
            res = self.guardian.ledger.revoke_root(op, n)
        except ContractRevertError as e:
            self.emit(f"operator {op} epoch {n}: revokeRoot refused: {e}")
            return f"failed, revoke refused ({e})"
        self.emit(f"operator {op} epoch {n}: FAIL -> revoked (tx {res['tx_hash']})")
        return "revoked"
