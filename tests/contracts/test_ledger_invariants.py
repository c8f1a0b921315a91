"""Invariants of the AttributionLedger over random sequences of submits and claims (hypothesis stateful test).

After every step, for the operator:
    claimedTotal <= fundedTotal
    token.balanceOf(ledger) == fundedTotal - claimedTotal
    claimed[account] never decreases, and equals what the account received
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from loraledger.node.ledger.merkle import StandardMerkleTree
from tests.contracts.helpers import (
    ChainEnv,
    expect_revert,
    revert_to,
    rewards_tree,
    send,
    snapshot,
    submit_fn,
)

N_ACCOUNTS = 4


@pytest.mark.slow
def test_ledger_invariants_over_random_submits_and_claims(chain_env: ChainEnv) -> None:
    env = chain_env

    class LedgerMachine(RuleBasedStateMachine):
        """Model: what each account is owed in total (latest tree) and has claimed; the chain must agree."""

        def __init__(self) -> None:
            super().__init__()
            self.snap = snapshot(env.w3)
            self.accounts = env.users[:N_ACCOUNTS]
            self.owed = dict.fromkeys(self.accounts, 0)
            self.claimed = dict.fromkeys(self.accounts, 0)
            self.trees: list[tuple[StandardMerkleTree, dict[str, int]]] = []
            self.last_seen = dict.fromkeys(self.accounts, 0)

        @initialize()
        def start_clean(self) -> None:
            assert env.ledger.functions.lastEpoch(env.operator).call() == 0

        @rule(increments=st.lists(st.tuples(st.integers(0, N_ACCOUNTS - 1), st.integers(0, 1000)), max_size=4))
        def submit(self, increments: list[tuple[int, int]]) -> None:
            for i, amount in increments:
                self.owed[self.accounts[i]] += amount
            snapshot_owed = dict(self.owed)
            tree = rewards_tree(snapshot_owed)
            epoch = len(self.trees) + 1
            send(env.w3, submit_fn(env, epoch, tree, sum(snapshot_owed.values())), env.operator)
            self.trees.append((tree, snapshot_owed))

        @rule(i=st.integers(0, N_ACCOUNTS - 1), many=st.booleans())
        def claim(self, i: int, many: bool) -> None:
            account = self.accounts[i]
            if not self.trees:
                expect_revert(env.w3, env.ledger.functions.claim(env.operator, 0, account, 0, []), account,
                              "LedgerNoRootInEffect")
                return
            tree, owed = self.trees[-1]
            epoch = len(self.trees)
            amount = owed[account]
            proof = tree.get_proof([account, amount])
            if many:
                send(env.w3, env.ledger.functions.claimMany(env.operator, epoch, [account], [amount], [proof]), env.admin)
            elif amount <= self.claimed[account]:
                expect_revert(env.w3, env.ledger.functions.claim(env.operator, epoch, account, amount, proof), account,
                              "LedgerNothingToClaim")
            else:
                send(env.w3, env.ledger.functions.claim(env.operator, epoch, account, amount, proof), env.admin)
            self.claimed[account] = max(self.claimed[account], amount)

        @rule(i=st.integers(0, N_ACCOUNTS - 1), back=st.integers(1, 3))
        def claim_with_an_old_proof(self, i: int, back: int) -> None:
            if len(self.trees) <= back:
                return
            account = self.accounts[i]
            old_tree, old_owed = self.trees[-1 - back]
            if old_owed[account] == self.trees[-1][1][account]:
                return  # the same leaf is in the latest tree too; nothing stale about it
            # against the latest epoch the old proof does not verify; naming the old epoch is stale once a later
            # one is effective
            latest = len(self.trees)
            proof = old_tree.get_proof([account, old_owed[account]])
            fn = env.ledger.functions.claim(env.operator, latest, account, old_owed[account], proof)
            expect_revert(env.w3, fn, account, "LedgerInvalidProof")
            effective = env.ledger.functions.effectiveEpoch(env.operator).call()
            if effective > latest - back:
                fn = env.ledger.functions.claim(env.operator, latest - back, account, old_owed[account], proof)
                expect_revert(env.w3, fn, account, "LedgerStaleEpoch")

        @invariant()
        def books_balance(self) -> None:
            led = env.ledger.functions
            funded = led.fundedTotal(env.operator).call()
            claimed_total = led.claimedTotal(env.operator).call()
            assert claimed_total <= funded
            assert env.token.functions.balanceOf(env.ledger.address).call() == funded - claimed_total
            expected_funded = sum(self.trees[-1][1].values()) if self.trees else 0
            assert funded == expected_funded
            received = 0
            for account in self.accounts:
                on_chain = led.claimed(env.operator, account).call()
                assert on_chain >= self.last_seen[account], "claimed-so-far decreased"
                assert on_chain == self.claimed[account]
                balance = env.token.functions.balanceOf(account).call()
                assert balance == on_chain
                received += balance
                self.last_seen[account] = on_chain
            assert received == claimed_total

        def teardown(self) -> None:
            revert_to(env.w3, self.snap)

    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(max_examples=10, stateful_step_count=10, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]),
    )
