"""The reward math: what a request costs, and how an epoch's fees split over accounts. Integers only.

Fee of one record (at serving time), `T = promptTokens + completionTokens`, adapter weights `w_i` in bps:

    fee = floor(sum_i w_i * feePerToken_i * T / 10000)          # one floor, after the sum

Contributor weights of one record (its `contributors` list, see loraledger.node.ledger.records), from lineage: adapter i was trained
on `t_ic` tokens of contributor c (sum `L_i`), and its fee numerator is `N_i = w_i * feePerToken_i`:

    weight_c = sum_i floor(N_i * t_ic * 10**18 / L_i)            # N_i := w_i when every feePerToken is 0

Token-level attribution, where enabled, supplies the per-record weight map instead (`contributor_weights`).

Split of one epoch (at close), with the ledger's shares (data / adapter owner / operator bps) and the
ContributorRegistry as it is at close. Per record, in `SCALE` sub-units (fee * SCALE in all):

    pools     = LR(fee * SCALE, {data: dataBps, owner: ownerBps, operator: operatorBps})
    data      -> LR over payoutOf(c) of the record's *active* contributors, pro rata to weight_c
                 (suspended or unregistered contributors drop out, so their share goes to the others of the
                 record's datanets; with none left the data pool joins the owner pool)
    owner     -> LR over owner(adapter_i), pro rata to N_i
    operator  -> the operator
    epoch:  S[a] = sum over records of a's sub-units;  amount[a] = LR(sum fee, S)[a]

LR(total, weights) is the largest-remainder apportionment: floor(total * w_k / W) each, then +1 to the keys with
the largest remainders (ties: smallest key) until the sum is `total`. So an epoch's amounts add up exactly to
its fees, each is within 1 unit of its exact rational share, and the result depends neither on record order
nor on dict order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from loraledger.node.ledger.merkle import REWARD_LEAF_ENCODING, StandardMerkleTree, gc_paused
from loraledger.node.ledger.records import BPS, AttributionRecord
from loraledger.node.ledger.terms import AdapterTerms, EpochTerms, RewardsError
from loraledger.node.types import AdapterId, Address, Wei, as_address

K = TypeVar("K", bound=Hashable)

SCALE = 10**18
"""Sub-units per token unit in the per-record split (bounds per-record rounding to 1e-18 of a unit)."""

WEIGHT_SCALE = 10**18
"""Fixed-point scale of lineage-derived contributor weights."""


def _address_order(a: str) -> int:
    return int(a, 16)


def largest_remainder(total: int, weights: Mapping[K, int], order: Callable[[K], object] | None = None) -> dict[K, int]:
    """Apportion the integer `total` over `weights` (each >= 0, sum W > 0); the result sums to `total` exactly.

    a_k = floor(total * w_k / W) + (1 if k is among the (total - sum floor) largest remainders (total*w_k mod W),
    ties broken by `order(k)` ascending (default: k itself)); keys with a_k = 0 are left out.
    """
    if total < 0:
        raise RewardsError(f"cannot apportion a negative total {total}")
    wsum = 0
    for k, w in weights.items():
        if w < 0:
            raise RewardsError(f"weight of {k!r} is negative ({w})")
        wsum += w
    if total == 0:
        return {}
    if wsum == 0:
        raise RewardsError(f"cannot apportion {total} over weights that are all zero")
    out: dict[K, int] = {}
    rems: list[tuple[int, K]] = []
    given = 0
    for k, w in weights.items():
        q, r = divmod(total * w, wsum)
        out[k] = q
        given += q
        if r:
            rems.append((r, k))
    left = total - given
    if left:
        key = order if order is not None else (lambda k: k)
        rems.sort(key=lambda rk: (-rk[0], key(rk[1])))  # type: ignore[operator]
        for _, k in rems[:left]:
            out[k] += 1
    return {k: v for k, v in out.items() if v}


def record_fee(weights_bps: Sequence[int], fees_per_token: Sequence[int], prompt_tokens: int,
               completion_tokens: int) -> Wei:
    """fee = floor(sum_i weights_bps[i] * fees_per_token[i] * (prompt + completion) / 10000)."""
    if len(weights_bps) != len(fees_per_token):
        raise RewardsError(f"{len(weights_bps)} adapter weights but {len(fees_per_token)} fees per token")
    if sum(weights_bps) != BPS:
        raise RewardsError(f"adapter weights {list(weights_bps)} sum to {sum(weights_bps)}, not {BPS}")
    tokens = int(prompt_tokens) + int(completion_tokens)
    return Wei(sum(int(w) * int(f) for w, f in zip(weights_bps, fees_per_token, strict=True)) * tokens // BPS)


def contributor_weights(
    adapter_ids: Sequence[AdapterId],
    weights_bps: Sequence[int],
    fees_per_token: Sequence[int],
    lineage: Mapping[AdapterId, Mapping[Any, int]],
    token_level: Mapping[Any, int] | None = None,
) -> dict[Address, int]:
    """A record's contributor weights (module docstring): token-level map if given, else from lineage.

    lineage[adapter_id] = {contributor: tokens of theirs the adapter was trained on}; every adapter of the record
    must be present (RewardsError otherwise). weight_c = sum_i floor(N_i * t_ic * WEIGHT_SCALE / L_i).
    """
    if token_level is not None:
        return {as_address(a): int(w) for a, w in token_level.items() if int(w) > 0}
    nums = [int(w) * int(f) for w, f in zip(weights_bps, fees_per_token, strict=True)]
    if not any(nums):
        nums = [int(w) for w in weights_bps]
    out: dict[Address, int] = {}
    for adapter_id, n in zip(adapter_ids, nums, strict=True):
        if adapter_id not in lineage:
            raise RewardsError(f"no lineage for adapter {adapter_id}: its lineage.json must list its contributors")
        tokens = lineage[adapter_id]
        total = sum(int(t) for t in tokens.values())
        if total <= 0:
            continue
        for c, t in tokens.items():
            w = n * int(t) * WEIGHT_SCALE // total
            if w:
                a = as_address(c)
                out[a] = out.get(a, 0) + w
    return out


def _adapter_terms(terms: EpochTerms, adapter_id: AdapterId) -> AdapterTerms:
    t = terms.adapters.get(adapter_id)
    if t is None:
        raise RewardsError(f"adapter {adapter_id} is in a record but not in the epoch's adapter terms "
                           "(is it registered in the AdapterRegistry?)")
    return t


def split_record(record: AttributionRecord, terms: EpochTerms, scale: int = SCALE) -> dict[Address, int]:
    """One record's fee in sub-units (fee * scale in all) per account (module docstring). Sums exactly."""
    units = int(record.fee) * scale
    if units == 0:
        return {}
    s = terms.shares
    pools = largest_remainder(units, {0: s.data_bps, 1: s.adapter_owner_bps, 2: s.operator_bps})
    out: dict[Address, int] = {}

    def add(parts: Mapping[Address, int]) -> None:
        for a, v in parts.items():
            out[a] = out.get(a, 0) + v

    owner_pool = pools.get(1, 0)
    data_pool = pools.get(0, 0)
    if data_pool:
        payees: dict[Address, int] = {}
        for account, weight in record.contributors:
            st = terms.contributors.get(account)
            if st is None or not st.active:
                continue
            payees[st.payout] = payees.get(st.payout, 0) + int(weight)
        if payees:
            add(largest_remainder(data_pool, payees, _address_order))
        else:
            owner_pool += data_pool
    if owner_pool:
        adapters = [_adapter_terms(terms, i) for i in record.adapter_ids]
        nums = [w * a.fee_per_token for w, a in zip(record.weights_bps, adapters, strict=True)]
        if not any(nums):
            nums = list(record.weights_bps)
        owners: dict[Address, int] = {}
        for a, n in zip(adapters, nums, strict=True):
            owners[a.owner] = owners.get(a.owner, 0) + n
        add(largest_remainder(owner_pool, owners, _address_order))
    if pools.get(2):
        add({terms.operator: pools[2]})
    return out


def epoch_amounts(records: Iterable[AttributionRecord], terms: EpochTerms) -> dict[Address, Wei]:
    """Per-account amounts of one epoch: LR(sum of fees, sum over records of split_record). Sums exactly."""
    subunits: dict[Address, int] = {}
    total = 0
    for r in records:
        total += int(r.fee)
        for a, v in split_record(r, terms).items():
            subunits[a] = subunits.get(a, 0) + v
    if total == 0:
        return {}
    return {a: Wei(v) for a, v in largest_remainder(total, subunits, _address_order).items()}


def add_cumulative(previous: Mapping[Address, int], amounts: Mapping[Address, int]) -> dict[Address, Wei]:
    """cumulative[a] = previous[a] + amounts[a] over the union of accounts (the rewards tree's values)."""
    out = {a: Wei(int(v)) for a, v in previous.items()}
    for a, v in amounts.items():
        out[a] = Wei(out.get(a, 0) + int(v))
    return out


def lineage_tokens(lineage: Mapping[str, object]) -> dict[Address, int]:
    """{contributor: tokens} from an adapter's `lineage.json` document (its `lineage_weights` list)."""
    entries = lineage.get("lineage_weights")
    if not isinstance(entries, list):
        raise RewardsError("lineage document has no `lineage_weights` list; was it written by `loraledger train`?")
    out: dict[Address, int] = {}
    for e in entries:
        if not isinstance(e, Mapping) or "contributor" not in e or "tokens" not in e:
            raise RewardsError(f"lineage entry {e!r} needs `contributor` and `tokens`")
        a = as_address(str(e["contributor"]))
        out[a] = out.get(a, 0) + int(str(e["tokens"]))
    return out


def rewards_tree(cumulative: Mapping[Address, int], operator: Address) -> StandardMerkleTree:
    """The cumulative rewards tree: leaves (address account, uint256 cumulativeAmount) for every account with a
    positive cumulative amount, sorted by address; the operator's leaf is always present (amount possibly 0)
    so the tree is never empty.  cumulativeTotal = sum of the leaves' amounts."""
    with gc_paused():  # millions of acyclic lists: collector passes here free nothing and cost seconds
        values = {a: v for a, v in ((a, int(v)) for a, v in cumulative.items()) if v > 0}
        values.setdefault(operator, 0)
        leaves = [[a, v] for a, v in sorted(values.items(), key=lambda av: _address_order(av[0]))]
        return StandardMerkleTree.of(leaves, REWARD_LEAF_ENCODING)


def weights_to_bps(weights: list[float]) -> list[int]:
    """Float weights summing to 1 -> basis points summing exactly to 10000, each >= 1 (largest remainder:
    floor(w * 10000) each, the missing points to the largest fractional parts, ties to the earlier)."""
    raw = [w * BPS for w in weights]
    bps = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    k = 0
    while sum(bps) < BPS:
        bps[order[k % len(order)]] += 1
        k += 1
    while sum(bps) > BPS:  # only after lifting tiny weights to 1: take from the largest
        bps[max(range(len(bps)), key=lambda i: bps[i])] -= 1
    return bps
