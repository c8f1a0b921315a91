"""Reward claims: prove what an account is owed against the root in effect on chain, then pay it.

    source = LogProofSource(log)            # or EpochFileSource(["epoch-3.json", ...]) or a node (rewards.py)
    status = reward_status(ledger, source, account)    # claimable now, pending, and when it takes effect
    result = claim(ledger, status.proof)               # verifies locally first; sends one claim
    push_claims(ledger, proofs)                        # claimMany in gas-sized batches

The root in effect. An epoch's rewards root takes effect `challengeDelay` seconds after it was submitted
(`effectiveAt(operator, epoch)`); until then only the previous root in effect pays (`rootInEffect(operator)`).
With a delay of an epoch or more, the newest confirmed epoch is always still pending, so a claim proves the
account's cumulative amount under the epoch in effect, never under the newest one:

    claimable now = cumulative(account, epoch in effect) - claimed(operator, account)
    pending       = cumulative(account, newest epoch)    - cumulative(account, epoch in effect)
                    payable from effectiveAt(operator, newest epoch) on

Every claim is checked locally before anything is sent: the proof's root must be the operator's rewards root in
effect on chain, and the leaf `(account, cumulativeAmount)` must verify against it. An account whose
`claimed(operator, account)` already reaches its cumulative amount is told so and no transaction is sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loraledger.node.chain.bindings import LedgerClient
from loraledger.node.errors import NodeError
from loraledger.node.ledger.epochs import CONFIRMED, EPOCH_FILE_FORMAT, EpochProofs, RewardProofData
from loraledger.node.ledger.merkle import REWARD_LEAF_ENCODING, verify
from loraledger.node.types import Address, TxHash, Wei, as_address, as_bytes32

if TYPE_CHECKING:
    from loraledger.node.ledger.record_log import RecordLog

log = logging.getLogger(__name__)


class ClaimError(NodeError, ValueError):
    """A claim cannot be made (no root in effect, stale or invalid proof, malformed epoch file)."""


@dataclass(frozen=True)
class ClaimResult:
    """What a claim did: `paid` tokens in `tx_hash` (None when nothing was sent), and why."""

    account: Address
    cumulative_amount: Wei
    already_claimed: Wei
    paid: Wei
    tx_hash: TxHash | None
    message: str


@dataclass(frozen=True)
class PushResult:
    """What `push_claims` did: accounts paid (amounts), skipped (nothing new), the batches' transactions, and the
    accounts the ledger could not pay (`ClaimSkipped`: a refused transfer or a bad proof -> the reason), whose
    claims stay open for them to make themselves."""

    paid: dict[Address, Wei]
    skipped: list[Address]
    tx_hashes: list[TxHash]
    gas_used: list[int]
    batch_size: int
    failed: dict[Address, str] = field(default_factory=dict)


_SKIP_REASONS = {1: "its proof does not verify", 2: "the token refused the transfer"}  # IAttributionLedger.SkipReason


def load_epoch_file(path: str | Path) -> dict[str, Any]:
    """Read an epoch file written by `export_epoch`; ClaimError naming the problem when it is not one."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ClaimError(f"cannot read epoch file {p}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != EPOCH_FILE_FORMAT:
        raise ClaimError(f"{p} is not a loraledger epoch file (format {EPOCH_FILE_FORMAT!r}); "
                         "write one with `loraledger epoch export N --out FILE`")
    return doc


def proofs_from_epoch_file(path: str | Path) -> list[RewardProofData]:
    """Every reward entry of an epoch file as a RewardProofData."""
    doc = load_epoch_file(path)
    try:
        operator = as_address(doc["operator"])
        root = as_bytes32(doc["rewardsRoot"])
        return [RewardProofData(operator, as_address(e["account"]), int(doc["epoch"]), Wei(int(e["cumulativeAmount"])),
                                root, [as_bytes32(x) for x in e["proof"]]) for e in doc["rewards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ClaimError(f"epoch file {path} is malformed: {e!r}") from e


def proof_from_epoch_file(path: str | Path, account: str) -> RewardProofData:
    """The entry of `account` in an epoch file; ClaimError when it has none."""
    a = as_address(account)
    for p in proofs_from_epoch_file(path):
        if p.account == a:
            return p
    raise ClaimError(f"epoch file {path} has no reward for {a}")


def _when(ledger: LedgerClient, operator: Address, epoch: int) -> str:
    """'at <UTC time> (in N s)' for when `epoch` of `operator` takes effect, from the chain's clock."""
    try:
        at = ledger.effective_at(operator, epoch)
    except NodeError:
        return "(its epoch is not on chain)"
    return f"at {_utc(at)} ({_relative(at - chain_time(ledger))})"


def check_proof(ledger: LedgerClient, proof: RewardProofData) -> None:
    """ClaimError unless `proof` is under the operator's rewards root in effect on chain and verifies locally.

    The error says which way to go: a proof for an epoch still in its challenge delay names the epoch in effect
    (claim with its proof) and when the newer one takes effect; a proof for an older epoch asks for the proof
    of the epoch in effect."""
    current = ledger.root_in_effect(proof.operator)
    if current.epoch == 0:
        raise ClaimError(
            f"operator {proof.operator} has no rewards root in effect yet: epoch {proof.epoch} takes effect "
            f"{_when(ledger, proof.operator, proof.epoch)}; claim again then")
    if current.rewards_root != proof.rewards_root:
        if proof.epoch > current.epoch:
            raise ClaimError(
                f"the proof is for epoch {proof.epoch}, still in its challenge delay: it takes effect "
                f"{_when(ledger, proof.operator, proof.epoch)}. Claims are paid against epoch {current.epoch} "
                f"(root {current.rewards_root}) now: claim with the proof of epoch {current.epoch} (`loraledger "
                f"rewards claim` picks it by default; `--epoch {current.epoch}` names it), or wait")
        raise ClaimError(
            f"the proof is for epoch {proof.epoch} (root {proof.rewards_root}), but epoch {current.epoch} "
            f"(root {current.rewards_root}) is in effect now: fetch the proof of epoch {current.epoch} (its "
            f"epoch file, or the node's GetRewardProof, which serves the epoch in effect by default)")
    if not verify(bytes.fromhex(current.rewards_root[2:]), REWARD_LEAF_ENCODING,
                  [proof.account, int(proof.cumulative_amount)], [bytes.fromhex(p[2:]) for p in proof.proof]):
        raise ClaimError(f"the proof of ({proof.account}, {proof.cumulative_amount}) does not verify against "
                         f"root {current.rewards_root}; nothing was sent")


def claim(ledger: LedgerClient, proof: RewardProofData) -> ClaimResult:
    """Pay `proof.account` what it is owed beyond what it claimed, from the ledger client's account (anyone may).

    amount = cumulativeAmount - claimed(operator, account); amount <= 0 -> no transaction, message says so.
    """
    check_proof(ledger, proof)
    already = ledger.claimed(proof.operator, proof.account)
    if int(proof.cumulative_amount) <= int(already):
        return ClaimResult(proof.account, proof.cumulative_amount, already, Wei(0), None,
                           f"nothing new to pay: {proof.account} already claimed {already} of "
                           f"{proof.cumulative_amount}; no transaction sent")
    res = ledger.claim(proof.operator, proof.epoch, proof.account, int(proof.cumulative_amount), proof.proof)
    paid = sum(int(e["args"]["amount"]) for e in res["events"] if e["event"] == "Claimed")  # type: ignore[call-overload]
    return ClaimResult(proof.account, proof.cumulative_amount, already, Wei(paid), res["tx_hash"],
                       f"paid {paid} to {proof.account} (cumulative {proof.cumulative_amount}) in {res['tx_hash']}")


def _claim_many_gas(ledger: LedgerClient, batch: Sequence[RewardProofData]) -> int:
    fn = ledger.contract.functions.claimMany(
        batch[0].operator, batch[0].epoch, [p.account for p in batch], [int(p.cumulative_amount) for p in batch],
        [[bytes.fromhex(x[2:]) for x in p.proof] for p in batch])
    return int(ledger.client.read(lambda: fn.estimate_gas({"from": ledger.client.address}), "estimate claimMany"))


def push_claims(ledger: LedgerClient, proofs: Sequence[RewardProofData], *, threshold: int = 0,
                gas_fraction: float = 0.5, max_batch: int | None = None) -> PushResult:
    """Pay every account owed more than `threshold` beyond what it claimed, with claimMany in batches.

    Batch size = floor(gas_fraction * blockGasLimit / gas per account), gas per account measured by estimating a
    claimMany over the first few accounts; accounts that already claimed everything are skipped (never paid
    twice: the ledger pays cumulative - claimed).
    """
    if not 0 < gas_fraction <= 1:
        raise ClaimError(f"gas_fraction must be in (0, 1], got {gas_fraction}")
    if not proofs:
        return PushResult({}, [], [], [], 0)
    operators = {p.operator for p in proofs}
    if len(operators) != 1:
        raise ClaimError(f"push_claims takes proofs of one operator, got {sorted(operators)}")
    for p in proofs[:1]:
        check_proof(ledger, p)
    root = proofs[0].rewards_root
    if any(p.rewards_root != root for p in proofs):
        raise ClaimError("push_claims got proofs under different rewards roots; use one epoch's proofs")
    op = proofs[0].operator
    owed: list[RewardProofData] = []
    skipped: list[Address] = []
    already: dict[Address, int] = {}
    for p in proofs:
        c = int(ledger.claimed(op, p.account))
        already[p.account] = c
        if int(p.cumulative_amount) - c > threshold:
            owed.append(p)
        else:
            skipped.append(p.account)
    if not owed:
        return PushResult({}, skipped, [], [], 0)
    w3 = ledger.client.w3
    gas_limit = int(w3.eth.get_block("latest")["gasLimit"])
    sample = owed[: min(4, len(owed))]
    per_account = max(1, _claim_many_gas(ledger, sample) // len(sample))
    size = max(1, int(gas_limit * gas_fraction) // per_account)
    if max_batch is not None:
        size = max(1, min(size, max_batch))
    paid: dict[Address, Wei] = {}
    failed: dict[Address, str] = {}
    hashes: list[TxHash] = []
    gas: list[int] = []
    for start in range(0, len(owed), size):
        batch = owed[start:start + size]
        res = ledger.claim_many(op, proofs[0].epoch, [p.account for p in batch], [int(p.cumulative_amount) for p in batch],
                                [p.proof for p in batch])
        hashes.append(res["tx_hash"])
        gas.append(res["gas_used"])
        for e in res["events"]:
            if e["event"] == "Claimed":
                a = as_address(str(e["args"]["account"]))
                paid[a] = Wei(int(paid.get(a, 0)) + int(str(e["args"]["amount"])))
            elif e["event"] == "ClaimSkipped":
                a = as_address(str(e["args"]["account"]))
                failed[a] = _SKIP_REASONS.get(int(str(e["args"]["reason"])), "unknown reason")
    log.info("pushed claims to %d accounts in %d transactions (batch %d)", len(paid), len(hashes), size)
    for a, why in sorted(failed.items()):
        log.warning("push: the ledger could not pay %s (%s); its claim stays open for it to make itself", a, why)
    return PushResult(paid, skipped, hashes, gas, size, failed)


# ---------------------------------------------------------------------------------------------- the root in effect


def chain_time(ledger: LedgerClient) -> int:
    """The latest block's timestamp: the clock `effectiveAt` is compared with on chain."""
    block = ledger.client.read(lambda: ledger.client.w3.eth.get_block("latest"), "get_block")
    return int(block["timestamp"])


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(seconds: int) -> str:
    return f"in {seconds} s" if seconds > 0 else "now"


class ProofSource(Protocol):
    """Where an account's cumulative amounts and proofs come from: the record log, epoch files, a node."""

    def reward_proof(self, account: str, epoch: int | None = None) -> RewardProofData | None:
        """The account's cumulative amount and proof under `epoch` (None: the newest the source has)."""
        ...

    def latest_epoch(self) -> int | None:
        """The newest confirmed epoch the source has (None: none)."""
        ...


class LogProofSource:
    """Proofs from the operator's record log (its confirmed epochs)."""

    def __init__(self, log_: RecordLog, proofs: EpochProofs | None = None) -> None:
        self.log = log_
        self.proofs = proofs if proofs is not None else EpochProofs(log_)

    def reward_proof(self, account: str, epoch: int | None = None) -> RewardProofData | None:
        if epoch is not None:
            row = self.log.epoch(epoch)
            if row is None or row.state != CONFIRMED:
                return None
        return self.proofs.reward_proof(account, epoch)

    def latest_epoch(self) -> int | None:
        row = self.log.last_confirmed()
        return None if row is None else row.epoch


class EpochFileSource:
    """Proofs from exported epoch files (`loraledger epoch export`), one epoch per file; read once."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        files: list[Path] = []
        for p in map(Path, paths):
            files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
        if not files:
            raise ClaimError(f"no epoch files in {[str(p) for p in paths]}; write them with `loraledger epoch export`")
        self.by_epoch: dict[int, dict[Address, RewardProofData]] = {}
        for f in files:
            entries = proofs_from_epoch_file(f)
            if entries:
                self.by_epoch[entries[0].epoch] = {e.account: e for e in entries}
        operators = {e.operator for entries in self.by_epoch.values() for e in entries.values()}
        if len(operators) > 1:
            raise ClaimError(f"the epoch files name several operators {sorted(operators)}; pass one operator's files")

    def reward_proof(self, account: str, epoch: int | None = None) -> RewardProofData | None:
        n = self.latest_epoch() if epoch is None else epoch
        if n is None or n not in self.by_epoch:
            return None
        return self.by_epoch[n].get(as_address(account))

    def latest_epoch(self) -> int | None:
        return max(self.by_epoch) if self.by_epoch else None

    def operator(self) -> Address | None:
        for entries in self.by_epoch.values():
            for e in entries.values():
                return e.operator
        return None


@dataclass(frozen=True)
class RewardStatus:
    """What `account` is owed by `operator`, split by the challenge delay (module docstring).

    proof: the proof a claim sends (under `epoch`'s root; None when the account has nothing under it).
    epoch: the epoch the numbers are for: the epoch in effect, or the one the caller named.
    in_effect: whether `epoch`'s root is the one claims are checked against now.
    effective_at: when `epoch` takes (took) effect (0: no epoch).
    latest_epoch / pending / pending_effective_at: the newest confirmed epoch the source has, what it adds on
    top of `epoch`, and when it takes effect (0 when nothing is pending or the epoch is not on chain).
    """

    operator: Address
    account: Address
    epoch: int
    epoch_in_effect: int
    in_effect: bool
    effective_at: int
    cumulative_amount: Wei
    claimed: Wei
    claimable_now: Wei
    latest_epoch: int
    pending: Wei
    pending_effective_at: int
    chain_time: int
    proof: RewardProofData | None

    def lines(self) -> list[str]:
        """The status as the CLI prints it."""
        out = [f"account {self.account} (operator {self.operator})"]
        if self.epoch_in_effect == 0:
            out.append("  epoch in effect: none yet")
        else:
            out.append(f"  epoch in effect: {self.epoch_in_effect}")
        if self.epoch:
            state = "in effect" if self.in_effect else (
                f"takes effect at {_utc(self.effective_at)} ({_relative(self.effective_at - self.chain_time)})"
                if self.effective_at > self.chain_time else "superseded by a later epoch")
            out.append(f"  cumulative under epoch {self.epoch} ({state}): {self.cumulative_amount}")
        out.append(f"  claimed: {self.claimed}")
        out.append(f"  claimable now: {self.claimable_now}")
        if self.pending > 0:
            when = (f"until {_utc(self.pending_effective_at)} "
                    f"({_relative(self.pending_effective_at - self.chain_time)})"
                    if self.pending_effective_at else "(its epoch is not on chain yet)")
            out.append(f"  pending {when}: {self.pending} (epoch {self.latest_epoch})")
        else:
            out.append("  pending: 0")
        return out


def reward_status(ledger: LedgerClient, source: ProofSource, account: str, *, operator: str | None = None,
                  epoch: int | None = None) -> RewardStatus:
    """The account's claimable and pending amounts from `source`'s proofs and the chain (module docstring).

    epoch None: the operator's epoch in effect on chain (what a claim can use now); else the epoch named.
    `operator` defaults to the one the source's proofs name. ClaimError when no operator can be told, or the
    source's root for the epoch differs from the chain's (the source belongs to another deployment).
    """
    a = as_address(account)
    latest = source.latest_epoch()
    latest_proof = source.reward_proof(a, latest) if latest is not None else None
    if operator is None:
        if latest_proof is None:
            raise ClaimError(f"no reward for {a} in the proofs given (newest epoch {latest}); pass --operator to "
                             "read what the chain holds for it")
        op = latest_proof.operator
    else:
        op = as_address(operator)
    now = chain_time(ledger)
    current = ledger.root_in_effect(op)
    last_on_chain = ledger.last_epoch(op)
    n = current.epoch if epoch is None else int(epoch)
    if n < 0 or n > last_on_chain:
        raise ClaimError(f"operator {op} has epochs 1..{last_on_chain} on chain; epoch {n} is not one of them")
    proof = source.reward_proof(a, n) if n > 0 else None
    if n > 0 and proof is None and latest is not None and n > latest:
        raise ClaimError(f"the proofs given reach epoch {latest} only; epoch {n} needs a newer epoch file or node")
    if proof is not None:
        onchain_root = ledger.epoch(op, n).rewards_root
        if onchain_root != proof.rewards_root:
            raise ClaimError(f"epoch {n}'s rewards root on chain is {onchain_root}, but the proof gives "
                             f"{proof.rewards_root}: the proofs belong to another deployment or operator")
    amount = int(proof.cumulative_amount) if proof is not None else 0
    claimed = int(ledger.claimed(op, a))
    effective = ledger.effective_at(op, n) if n > 0 else 0
    in_effect = n > 0 and n == current.epoch
    claimable = max(0, amount - claimed) if in_effect else 0
    latest_amount = int(latest_proof.cumulative_amount) if latest_proof is not None else 0
    pending = max(0, latest_amount - amount) if latest is not None and latest > n else 0
    pending_at = ledger.effective_at(op, latest) if pending and latest is not None and latest <= last_on_chain else 0
    return RewardStatus(op, a, n, current.epoch, in_effect, effective, Wei(amount), Wei(claimed), Wei(claimable),
                        latest or 0, Wei(pending), pending_at, now, proof)
