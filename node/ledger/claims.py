"""Reward claims: prove what an account is owed against the root on chain, then pay it.

    proof = proof_from_epoch_file("epoch-3.json", account)          # or EpochProofs(log).reward_proof(account)
    result = claim(contracts.ledger, proof)                          # verifies locally first; sends one claim
    push_claims(contracts.ledger, proofs)                            # claimMany in gas-sized batches

Every claim is checked locally before anything is sent: the proof's root must be the operator's rewards root in
effect on chain, and the leaf `(account, cumulativeAmount)` must verify against it. An account whose
`claimed(operator, account)` already reaches its cumulative amount is told so and no transaction is sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraledger.node.chain.bindings import LedgerClient
from loraledger.node.errors import NodeError
from loraledger.node.ledger.epochs import EPOCH_FILE_FORMAT, RewardProofData
from loraledger.node.ledger.merkle import REWARD_LEAF_ENCODING, verify
from loraledger.node.types import Address, TxHash, Wei, as_address, as_bytes32

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
    """What `push_claims` did: accounts paid (amounts), skipped (nothing new), the batches' transactions."""

    paid: dict[Address, Wei]
    skipped: list[Address]
    tx_hashes: list[TxHash]
    gas_used: list[int]
    batch_size: int


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


def check_proof(ledger: LedgerClient, proof: RewardProofData) -> None:
    """ClaimError unless `proof` is under the operator's rewards root in effect on chain and verifies locally."""
    current = ledger.root_in_effect(proof.operator)
    if current.epoch == 0:
        raise ClaimError(f"operator {proof.operator} has no rewards root in effect yet (pending challenge delay?)")
    if current.rewards_root != proof.rewards_root:
        raise ClaimError(
            f"the proof is for rewards root {proof.rewards_root} (epoch {proof.epoch}) but the root in effect is "
            f"{current.rewards_root} (epoch {current.epoch}); fetch the latest proof or epoch file")
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
    res = ledger.claim(proof.operator, proof.account, int(proof.cumulative_amount), proof.proof)
    paid = sum(int(e["args"]["amount"]) for e in res["events"] if e["event"] == "Claimed")  # type: ignore[call-overload]
    return ClaimResult(proof.account, proof.cumulative_amount, already, Wei(paid), res["tx_hash"],
                       f"paid {paid} to {proof.account} (cumulative {proof.cumulative_amount}) in {res['tx_hash']}")


def _claim_many_gas(ledger: LedgerClient, batch: Sequence[RewardProofData]) -> int:
    fn = ledger.contract.functions.claimMany(
        batch[0].operator, [p.account for p in batch], [int(p.cumulative_amount) for p in batch],
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
    hashes: list[TxHash] = []
    gas: list[int] = []
    for start in range(0, len(owed), size):
        batch = owed[start:start + size]
        res = ledger.claim_many(op, [p.account for p in batch], [int(p.cumulative_amount) for p in batch],
                                [p.proof for p in batch])
        hashes.append(res["tx_hash"])
        gas.append(res["gas_used"])
        for e in res["events"]:
            if e["event"] == "Claimed":
                a = as_address(str(e["args"]["account"]))
                paid[a] = Wei(int(paid.get(a, 0)) + int(str(e["args"]["amount"])))
    log.info("pushed claims to %d accounts in %d transactions (batch %d)", len(paid), len(hashes), size)
    return PushResult(paid, skipped, hashes, gas, size)
