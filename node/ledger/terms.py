"""An epoch's terms: everything outside the records that its split depends on, snapshotted at epoch close.

    Shares            the fee split in basis points (data contributors, adapter owner, node operator)
    AdapterTerms      per adapter: owner and fee per token (AdapterRegistry)
    ContributorStatus per contributor: payout address and whether it is active (ContributorRegistry)
    EpochTerms        the three above plus the operator; `terms_to_json` is its stored and exported form
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraledger.node.errors import NodeError
from loraledger.node.ledger.records import BPS, RecordDomain
from loraledger.node.types import AdapterId, Address


@dataclass(frozen=True)
class Shares:
    """Fee shares in basis points, as `AttributionLedger.shares()` holds them; they sum to 10000."""

    data_bps: int
    adapter_owner_bps: int
    operator_bps: int

    def __post_init__(self) -> None:
        parts = (self.data_bps, self.adapter_owner_bps, self.operator_bps)
        if any(p < 0 for p in parts) or sum(parts) != BPS:
            raise RewardsError(f"shares {parts} must be non-negative and sum to {BPS} bps")


@dataclass(frozen=True)
class AdapterTerms:
    """What the AdapterRegistry says of one adapter: who owns it and its fee per token."""

    owner: Address
    fee_per_token: int


@dataclass(frozen=True)
class ContributorStatus:
    """What the ContributorRegistry says of one contributor at epoch close."""

    payout: Address
    active: bool


@dataclass(frozen=True)
class EpochTerms:
    """Everything outside the records that an epoch's split depends on, snapshotted at epoch close.

    Contributors missing from `contributors` count as inactive (never registered: nothing is paid to them).
    """

    shares: Shares
    operator: Address
    adapters: Mapping[AdapterId, AdapterTerms]
    contributors: Mapping[Address, ContributorStatus]


def terms_to_json(terms: EpochTerms, block: int, domain: RecordDomain) -> dict[str, Any]:
    """The terms snapshot as stored in the log and written to epoch files, with the records' domain."""
    if domain.operator != terms.operator:
        raise RewardsError(f"the records' domain names operator {domain.operator}, the terms {terms.operator}")
    return {
        "block": block,
        "chainId": domain.chain_id,
        "ledger": domain.ledger,
        "operator": terms.operator,
        "shares": [terms.shares.data_bps, terms.shares.adapter_owner_bps, terms.shares.operator_bps],
        "adapters": {str(i): {"owner": t.owner, "feePerToken": str(t.fee_per_token)}
                     for i, t in sorted(terms.adapters.items())},
        "contributors": {a: {"payout": s.payout, "active": s.active} for a, s in sorted(terms.contributors.items())},
    }


def domain_of_terms(terms: Mapping[str, Any]) -> RecordDomain:
    """The records' domain stored with an epoch's terms snapshot."""
    return RecordDomain.from_json(terms)


class RewardsError(NodeError, ValueError):
    """The reward inputs are inconsistent (unknown adapter, bad shares, ...); the message names which."""
