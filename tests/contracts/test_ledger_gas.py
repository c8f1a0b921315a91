"""AttributionLedger gas and its one-slot operator state: claim gas ceilings per scenario, the 2**128 cap on
cumulative totals, and the in-effect fast path staying exact around revocation of the latest epoch.

Ceilings sit a little above the measured values (scripts/bench_settlement.py reports them): a regression that adds
a cold storage read (2,100 gas) or brings back a storage-based reentrancy guard trips them.
"""

from __future__ import annotations

from tests.contracts.helpers import (
    DELAY,
    ChainEnv,
    events,
    expect_revert,
    increase_time,
    rewards_tree,
    send,
    submit,
    submit_fn,
)

# Measured on the committed artifacts with a 3-level proof (6 leaves): 146.7k, 95.2k, 78.2k and 79.1k.
OPERATOR_FIRST_CLAIM_MAX = 147_500  # also advances the effective epoch: fresh root slot, pointer, cap
NEW_ACCOUNT_NO_TOKENS_MAX = 95_500  # two fresh slots: claimed-so-far here, the balance in the token (2 x 22.1k)
NEW_ACCOUNT_HOLDING_TOKENS_MAX = 78_500
REPEAT_CLAIM_MAX = 80_000  # names the next epoch, so it advances the pointer too


def _gas(env: ChainEnv, fn: object, sender: str) -> int:
    return int(send(env.w3, fn, sender)["gasUsed"])


def test_claim_gas_ceilings(env: ChainEnv) -> None:
    users = env.users[:6]
    t1 = rewards_tree({u: 10**18 * (i + 1) for i, u in enumerate(users)})
    submit(env, 1, t1, sum(10**18 * (i + 1) for i in range(6)))
    claim = env.ledger.functions.claim
    first = _gas(env, claim(env.operator, 1, users[0], 10**18, t1.get_proof([users[0], 10**18])), users[0])
    new = _gas(env, claim(env.operator, 1, users[1], 2 * 10**18, t1.get_proof([users[1], 2 * 10**18])), users[1])
    send(env.w3, env.token.functions.mint(users[2], 1), env.admin)
    holding = _gas(env, claim(env.operator, 1, users[2], 3 * 10**18, t1.get_proof([users[2], 3 * 10**18])), users[2])
    t2 = rewards_tree({u: 2 * 10**18 * (i + 1) for i, u in enumerate(users)})
    submit(env, 2, t2, 2 * sum(10**18 * (i + 1) for i in range(6)))
    repeat = _gas(env, claim(env.operator, 2, users[0], 2 * 10**18, t2.get_proof([users[0], 2 * 10**18])), users[0])

    assert first <= OPERATOR_FIRST_CLAIM_MAX, first
    assert new <= NEW_ACCOUNT_NO_TOKENS_MAX, new
    assert holding <= NEW_ACCOUNT_HOLDING_TOKENS_MAX, holding
    assert repeat <= REPEAT_CLAIM_MAX, repeat
    # the packed state still adds up: what was paid is what the views say
    assert env.ledger.functions.claimedTotal(env.operator).call() == 10**18 + 2 * 10**18 + 3 * 10**18 + 10**18
    assert env.ledger.functions.claimed(env.operator, users[0]).call() == 2 * 10**18
    assert env.token.functions.balanceOf(users[0]).call() == 2 * 10**18


def test_cumulative_total_must_fit_112_bits(env: ChainEnv) -> None:
    """Claimed totals and caps share one slot with the effective epoch (uint112 + uint112 + uint32): 2**112 - 1
    base units is 5.2e15 tokens of 18 decimals per operator."""
    a = env.users[0]
    huge = 2**112
    tree = rewards_tree({a: huge})
    sub = submit_fn(env, 1, tree, huge)
    expect_revert(env.w3, sub, env.operator, "SafeCastOverflowedUintDowncast", 112, huge)
    assert env.ledger.functions.lastEpoch(env.operator).call() == 0
    assert env.ledger.functions.fundedTotal(env.operator).call() == 0


def test_in_effect_pointer_around_revoking_the_latest_epoch(env: ChainEnv) -> None:
    """Revoking the latest epoch leaves claims on the effective one; the next submission extends the cut chain."""
    led = env.delayed_ledger
    a = env.users[0]
    trees = {k: rewards_tree({a: 100 * k}) for k in (1, 2, 3)}
    submit(env, 1, trees[1], 100, ledger=led)
    increase_time(env.w3, DELAY + 1)
    submit(env, 2, trees[2], 200, ledger=led)
    send(env.w3, led.functions.revokeRoot(env.operator, 2), env.guardian)  # the latest epoch: revoked
    increase_time(env.w3, DELAY + 1)
    assert led.functions.rootInEffect(env.operator).call() == [1, trees[1].root, 100]
    expect_revert(env.w3, led.functions.claim(env.operator, 2, a, 200, trees[2].get_proof(0)), a,
                  "LedgerEpochRevoked", env.operator, 2)
    r = send(env.w3, led.functions.claim(env.operator, 1, a, 100, trees[1].get_proof(0)), a)
    assert events(led, "Claimed", r)[0].args.epoch == 1

    submit(env, 3, trees[3], 300, ledger=led)
    assert led.functions.rootInEffect(env.operator).call()[0] == 1  # 3 pending, 2 revoked
    increase_time(env.w3, DELAY + 1)
    assert led.functions.rootInEffect(env.operator).call() == [3, trees[3].root, 300]
    r = send(env.w3, led.functions.claim(env.operator, 3, a, 300, trees[3].get_proof(0)), a)
    (ev,) = events(led, "Claimed", r)
    assert (ev.args.epoch, ev.args.amount) == (3, 200)
    assert led.functions.claimedTotal(env.operator).call() == 300
