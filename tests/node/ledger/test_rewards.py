"""The reward math: a worked example by hand, then properties (hypothesis): sums exact, nothing negative,
deterministic, independent of record order, within one unit of the exact rational share."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraledger.node.ledger.records import AttributionRecord
from loraledger.node.ledger.rewards import (
    add_cumulative,
    contributor_weights,
    epoch_amounts,
    largest_remainder,
    record_fee,
)
from loraledger.node.ledger.terms import AdapterTerms, ContributorStatus, EpochTerms, RewardsError, Shares
from loraledger.node.types import Address, as_address

ACCTS = [as_address("0x" + f"{i:02x}" * 20) for i in range(1, 13)]
OPERATOR, OWNER1, OWNER2 = ACCTS[0], ACCTS[1], ACCTS[2]
CONTRIBS = ACCTS[3:9]
PAYOUT = ACCTS[9]


DEFAULT_SHARES = Shares(7000, 2000, 1000)


def _terms(suspended: frozenset[Address] = frozenset(), shares: Shares = DEFAULT_SHARES) -> EpochTerms:
    contributors = {c: ContributorStatus(c, c not in suspended) for c in CONTRIBS}
    contributors[CONTRIBS[0]] = ContributorStatus(PAYOUT, CONTRIBS[0] not in suspended)  # rotated payout
    return EpochTerms(shares=shares, operator=OPERATOR,
                      adapters={1: AdapterTerms(OWNER1, 3), 2: AdapterTerms(OWNER2, 5)}, contributors=contributors)


def _rec(i: int, adapters: list[int], weights: list[int], tokens: int, contribs: dict[str, int]) -> AttributionRecord:
    fees = {1: 3, 2: 5}
    fee = record_fee(weights, [fees[a] for a in adapters], tokens, 0)
    return AttributionRecord.create(request_id=i.to_bytes(32, "big"), adapter_ids=adapters, weights_bps=weights,
                                    prompt_tokens=tokens, completion_tokens=0, fee=fee, output_hash=b"\x00" * 32,
                                    contributors=contribs)


def test_fee_rounds_once_after_the_sum() -> None:
    # 3333*7 + 6667*11 = 96_668 per token; * 3 tokens / 10000 = 29.0004 -> 29
    assert record_fee([3333, 6667], [7, 11], 2, 1) == 29
    with pytest.raises(RewardsError, match="sum to"):
        record_fee([5000], [1], 1, 1)


def test_largest_remainder_by_hand() -> None:
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}  # tie: smallest key
    assert largest_remainder(100, {"a": 2, "b": 1}) == {"a": 67, "b": 33}
    assert largest_remainder(0, {"a": 1}) == {}
    with pytest.raises(RewardsError, match="all zero"):
        largest_remainder(5, {"a": 0})


def test_worked_example() -> None:
    # One record, adapter 1 only, 1000 tokens at 3/token: fee 3000; data 2100 split 2:1, owner 600, operator 300.
    r = _rec(1, [1], [10_000], 1000, {CONTRIBS[0]: 2, CONTRIBS[1]: 1})
    assert r.fee == 3000
    got = epoch_amounts([r], _terms())
    assert got == {PAYOUT: 1400, CONTRIBS[1]: 700, OWNER1: 600, OPERATOR: 300}
    # Suspended contributor: their share goes to the others of the record.
    got = epoch_amounts([r], _terms(suspended=frozenset({CONTRIBS[0]})))
    assert got == {CONTRIBS[1]: 2100, OWNER1: 600, OPERATOR: 300}
    # Everyone suspended: the data pool joins the owner pool.
    got = epoch_amounts([r], _terms(suspended=frozenset(CONTRIBS[:2])))
    assert got == {OWNER1: 2700, OPERATOR: 300}
    assert add_cumulative({OWNER1: 5, PAYOUT: 1}, got) == {OWNER1: 2705, PAYOUT: 1, OPERATOR: 300}


def test_lineage_weights_and_token_level_override() -> None:
    lineage = {1: {CONTRIBS[0]: 300, CONTRIBS[1]: 100}, 2: {CONTRIBS[1]: 50}}
    w = contributor_weights([1, 2], [5000, 5000], [3, 5], lineage)
    # N1 = 15000, N2 = 25000; c0 = 15000*3/4, c1 = 15000/4 + 25000 (in units of 1e18)
    assert w == {CONTRIBS[0]: 11250 * 10**18, CONTRIBS[1]: 28750 * 10**18}
    assert contributor_weights([1], [10_000], [3], lineage, token_level={CONTRIBS[2]: 9}) == {CONTRIBS[2]: 9}
    with pytest.raises(RewardsError, match="no lineage for adapter 2"):
        contributor_weights([2], [10_000], [5], {1: {}})


def _exact(records: list[AttributionRecord], terms: EpochTerms) -> dict[Address, Fraction]:
    """Independent exact rational shares, straight from the definitions."""
    out: dict[Address, Fraction] = {}

    def add(a: Address, v: Fraction) -> None:
        out[a] = out.get(a, Fraction(0)) + v

    s = terms.shares
    for r in records:
        fee = Fraction(int(r.fee))
        data, owner = fee * s.data_bps / 10_000, fee * s.adapter_owner_bps / 10_000
        add(terms.operator, fee * s.operator_bps / 10_000)
        active = [(terms.contributors[c].payout, w) for c, w in r.contributors if terms.contributors[c].active]
        if active:
            tw = sum(w for _, w in active)
            for p, w in active:
                add(p, data * w / tw)
        else:
            owner += data
        nums = [w * terms.adapters[i].fee_per_token for i, w in zip(r.adapter_ids, r.weights_bps, strict=True)]
        for i, n in zip(r.adapter_ids, nums, strict=True):
            add(terms.adapters[i].owner, owner * n / sum(nums))
    return out


record_strategy = st.tuples(
    st.sampled_from([([1], [10_000]), ([2], [10_000]), ([1, 2], [2500, 7500]), ([2, 1], [3333, 6667])]),
    st.integers(0, 5000),
    st.dictionaries(st.sampled_from(CONTRIBS), st.integers(1, 10**20), min_size=1, max_size=6),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(record_strategy, min_size=1, max_size=12), st.frozensets(st.sampled_from(CONTRIBS), max_size=6),
       st.sampled_from([Shares(7000, 2000, 1000), Shares(10_000, 0, 0), Shares(3333, 3333, 3334)]),
       st.randoms(use_true_random=False))
def test_epoch_split_properties(spec: list, suspended: frozenset[Address], shares: Shares,
                                rnd: random.Random) -> None:
    records = [_rec(i, a, w, t, c) for i, ((a, w), t, c) in enumerate(spec)]
    terms = _terms(suspended, shares)
    got = epoch_amounts(records, terms)
    assert sum(got.values()) == sum(int(r.fee) for r in records)  # exact
    assert all(v > 0 for v in got.values())  # no negative (and zero amounts left out)
    shuffled = records[:]
    rnd.shuffle(shuffled)
    assert epoch_amounts(shuffled, terms) == got  # order-independent
    assert epoch_amounts(records, terms) == got  # deterministic
    exact = _exact(records, terms)
    for a in set(exact) | set(got):
        assert abs(got.get(a, 0) - exact.get(a, Fraction(0))) < 1 + Fraction(len(records), 10**12)
    for c in suspended:
        if c != CONTRIBS[0]:
            assert c not in got or c in (OPERATOR, OWNER1, OWNER2)  # suspended earn nothing
