"""AttributionLedger on a real anvil: happy paths of every function and each bad input with its custom error."""

from __future__ import annotations

import pytest
from eth_abi import encode as abi_encode
from web3 import Web3
from web3.exceptions import ContractLogicError

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.ledger.merkle import hash_pair, keccak256, process_proof
from tests.contracts.helpers import (
    DECODER,
    DELAY,
    ChainEnv,
    deploy,
    domain_of,
    events,
    expect_revert,
    export_hash,
    increase_time,
    make_record,
    records_tree,
    rewards_tree,
    send,
    submit,
    submit_fn,
)


def _ledger_state(env: ChainEnv, accounts: list[str]) -> tuple[object, ...]:
    """Everything a failed call must leave unchanged."""
    led, op = env.ledger.functions, env.operator
    return (
        led.lastEpoch(op).call(),
        led.fundedTotal(op).call(),
        led.claimedTotal(op).call(),
        tuple(led.claimed(op, a).call() for a in accounts),
        tuple(env.token.functions.balanceOf(a).call() for a in accounts),
        env.token.functions.balanceOf(env.ledger.address).call(),
        env.token.functions.balanceOf(op).call(),
    )


def test_construction_roles_shares_and_views(env: ChainEnv) -> None:
    led = env.ledger.functions
    assert led.rewardToken().call() == env.token.address
    assert led.challengeDelay().call() == 0
    assert led.shares().call() == [7000, 2000, 1000]
    for role in ("OPERATOR_ROLE", "GUARDIAN_ROLE", "PAUSER_ROLE", "DEFAULT_ADMIN_ROLE"):
        assert led.hasRole(getattr(led, role)().call(), env.admin).call(), role
    assert led.hasRole(led.OPERATOR_ROLE().call(), env.operator).call()
    assert led.hasRole(led.GUARDIAN_ROLE().call(), env.guardian).call()
    assert not led.hasRole(led.OPERATOR_ROLE().call(), env.users[0]).call()
    assert led.lastEpoch(env.operator).call() == 0
    assert led.rootInEffect(env.operator).call() == [0, b"\x00" * 32, 0]
    assert env.delayed_ledger.functions.challengeDelay().call() == DELAY


def test_constructor_rejects_bad_shares_and_token(env: ChainEnv) -> None:
    w3, admin = env.w3, env.admin
    art = load_artifact("AttributionLedger")
    factory = w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    for args, name in (
        ([admin, env.token.address, 0, 7000, 2000, 999], "LedgerInvalidShares"),
        ([admin, env.users[0], 0, 7000, 2000, 1000], "LedgerInvalidAddress"),
        (["0x" + "00" * 20, env.token.address, 0, 7000, 2000, 1000], "LedgerInvalidAddress"),
    ):
        data = factory.constructor(*args).data_in_transaction
        with pytest.raises(ContractLogicError) as info:
            w3.eth.call({"from": admin, "data": data})
        assert DECODER.decode(info.value.data).name == name, args


def test_submit_claim_and_verify_record(env: ChainEnv) -> None:
    a, b, c = env.users[:3]
    tree = rewards_tree({a: 100, b: 250, c: 50})
    recs = records_tree(domain_of(env), 1, n=5)
    op_before = env.token.functions.balanceOf(env.operator).call()
    receipt = submit(env, 1, tree, 400, records=recs)

    (ev,) = events(env.ledger, "EpochSubmitted", receipt)
    assert ev.args.operator == env.operator and ev.args.epoch == 1
    assert ev.args.rewardsRoot == tree.root and ev.args.recordsRoot == recs.root
    assert ev.args.pulled == 400 and ev.args.cumulativeTotal == 400 and ev.args.recordCount == 5
    assert ev.args.exportHash == export_hash(1) and ev.args.effectiveAt == env.w3.eth.get_block("latest")["timestamp"]
    led = env.ledger.functions
    assert env.token.functions.balanceOf(env.operator).call() == op_before - 400
    assert env.token.functions.balanceOf(env.ledger.address).call() == 400
    assert led.fundedTotal(env.operator).call() == 400
    assert led.lastEpoch(env.operator).call() == 1
    info = led.getEpoch(env.operator, 1).call()
    assert info[:5] == (recs.root, tree.root, export_hash(1), 400, 5)
    assert info[6:] == (0, 1, False)  # previousLive, depth, revoked
    assert led.rootInEffect(env.operator).call() == [1, tree.root, 400]
    assert led.liveTip(env.operator).call() == 1 and led.effectiveEpoch(env.operator).call() == 0

    for i in range(5):
        rec = make_record(1, i)
        assert led.recordLeaf(env.operator, 1, rec.ledger_tuple()).call() == rec.leaf_hash(domain_of(env))
        proof = recs.get_proof(rec.leaf_values(domain_of(env)))
        assert led.verifyRecord(env.operator, 1, rec.ledger_tuple(), proof).call()
    other = make_record(1, 99)
    assert not led.verifyRecord(env.operator, 1, other.ledger_tuple(), recs.get_proof(0)).call()
    assert not led.verifyRecord(env.operator, 2, make_record(1, 0).ledger_tuple(), recs.get_proof(0)).call()

    # anyone may claim for an account; the money goes to the account; the event names who sent it
    payer = env.users[5]
    r = send(env.w3, env.ledger.functions.claim(env.operator, 1, b, 250, tree.get_proof([b, 250])), payer)
    (adv,) = events(env.ledger, "EffectiveEpochAdvanced", r)  # the claim's epoch hint advanced the pointer
    assert (adv.args.operator, adv.args.epoch, adv.args.caller) == (env.operator, 1, payer)
    (cl,) = events(env.ledger, "Claimed", r)
    assert (cl.args.account, cl.args.amount, cl.args.cumulativeAmount, cl.args.epoch) == (b, 250, 250, 1)
    assert cl.args.caller == payer
    assert led.effectiveEpoch(env.operator).call() == 1
    assert env.token.functions.balanceOf(b).call() == 250
    assert env.token.functions.balanceOf(payer).call() == 0
    assert led.claimed(env.operator, b).call() == 250
    assert led.claimedTotal(env.operator).call() == 250
    assert env.token.functions.balanceOf(env.ledger.address).call() == 150


def test_claim_many_pays_and_skips(env: ChainEnv) -> None:
    a, b, c = env.users[:3]
    amounts = {a: 10, b: 20, c: 30}
    tree = rewards_tree(amounts)
    submit(env, 1, tree, 60)
    send(env.w3, env.ledger.functions.claim(env.operator, 1, a, 10, tree.get_proof([a, 10])), a)
    accts = [a, b, c]
    proofs = [tree.get_proof([x, amounts[x]]) for x in accts]
    vals = [amounts[x] for x in accts]

    before = _ledger_state(env, accts)
    expect_revert(env.w3, env.ledger.functions.claimMany(env.operator, 1, accts, vals[:2], proofs), env.admin,
                  "LedgerLengthMismatch", 3, 2, 3)
    assert _ledger_state(env, accts) == before

    r = send(env.w3, env.ledger.functions.claimMany(env.operator, 1, accts, vals, proofs), env.admin)
    paid = [(e.args.account, e.args.amount, e.args.caller) for e in events(env.ledger, "Claimed", r)]
    assert paid == [(b, 20, env.admin), (c, 30, env.admin)]  # a had nothing new: skipped, no event, no revert
    assert events(env.ledger, "ClaimSkipped", r) == ()
    assert [env.token.functions.balanceOf(x).call() for x in accts] == [10, 20, 30]
    assert env.ledger.functions.claimedTotal(env.operator).call() == 60
    # all already claimed: a no-op, not a revert
    r = send(env.w3, env.ledger.functions.claimMany(env.operator, 1, accts, vals, proofs), env.admin)
    assert events(env.ledger, "Claimed", r) == ()


def test_double_claim_and_foreign_proofs_revert_without_state_change(env: ChainEnv) -> None:
    a, b = env.users[:2]
    tree = rewards_tree({a: 100, b: 200})
    submit(env, 1, tree, 300)
    claim = env.ledger.functions.claim
    send(env.w3, claim(env.operator, 1, a, 100, tree.get_proof([a, 100])), a)
    before = _ledger_state(env, [a, b])
    expect_revert(env.w3, claim(env.operator, 1, a, 100, tree.get_proof([a, 100])), a,
                  "LedgerNothingToClaim", env.operator, a, 100, 100)
    # b's proof used for a, a's proof with b's amount, a's proof inflated
    expect_revert(env.w3, claim(env.operator, 1, a, 200, tree.get_proof([b, 200])), a,
                  "LedgerInvalidProof", env.operator, a, 200)
    expect_revert(env.w3, claim(env.operator, 1, b, 200, tree.get_proof([a, 100])), b, "LedgerInvalidProof")
    expect_revert(env.w3, claim(env.operator, 1, a, 101, tree.get_proof([a, 100])), a, "LedgerInvalidProof")
    expect_revert(env.w3, claim(env.users[4], 0, a, 100, tree.get_proof([a, 100])), a,
                  "LedgerNoRootInEffect", env.users[4])
    expect_revert(env.w3, claim(env.users[4], 1, a, 100, tree.get_proof([a, 100])), a,
                  "LedgerUnknownEpoch", env.users[4], 1)
    expect_revert(env.w3, claim(env.operator, 0, a, 100, tree.get_proof([a, 100])), a,
                  "LedgerStaleEpoch", env.operator, 0, 1)
    assert _ledger_state(env, [a, b]) == before


def test_old_root_after_new_epoch_pays_only_the_difference(env: ChainEnv) -> None:
    a, b = env.users[:2]
    t1 = rewards_tree({a: 100, b: 40})
    submit(env, 1, t1, 140)
    send(env.w3, env.ledger.functions.claim(env.operator, 1, a, 100, t1.get_proof([a, 100])), a)
    t2 = rewards_tree({a: 150, b: 90})
    r = submit(env, 2, t2, 240)
    assert events(env.ledger, "EpochSubmitted", r)[0].args.pulled == 100
    before = _ledger_state(env, [a, b])
    # the epoch-1 proof against epoch 2 does not verify, and naming epoch 1 now that 2 is effective is stale
    expect_revert(env.w3, env.ledger.functions.claim(env.operator, 2, b, 40, t1.get_proof([b, 40])), b,
                  "LedgerInvalidProof")
    send(env.w3, env.ledger.functions.advance(env.operator, 2), env.users[6])
    expect_revert(env.w3, env.ledger.functions.claim(env.operator, 1, b, 40, t1.get_proof([b, 40])), b,
                  "LedgerStaleEpoch", env.operator, 1, 2)
    expect_revert(env.w3, env.ledger.functions.advance(env.operator, 2), b, "LedgerStaleEpoch", env.operator, 2, 2)
    expect_revert(env.w3, env.ledger.functions.advance(env.operator, 3), b, "LedgerUnknownEpoch", env.operator, 3)
    assert _ledger_state(env, [a, b]) == before
    send(env.w3, env.ledger.functions.claim(env.operator, 2, a, 150, t2.get_proof([a, 150])), a)
    assert env.token.functions.balanceOf(a).call() == 150  # 100 then only the 50 difference
    send(env.w3, env.ledger.functions.claim(env.operator, 2, b, 90, t2.get_proof([b, 90])), b)
    assert env.token.functions.balanceOf(b).call() == 90  # claiming late loses nothing
    assert env.token.functions.balanceOf(env.ledger.address).call() == 0


def test_inner_node_cannot_pass_as_a_leaf(env: ChainEnv) -> None:
    """64-byte second preimage: an inner node whose children read as abi.encode(address, uint256).

    Leaves L1 = bytes32(uint160(x)) and L2 = bytes32(amount) make node N = keccak(L1 ++ L2), which is exactly
    keccak(abi.encode(x, amount)): a single-hashed leaf scheme would accept (x, amount) with proof [L3]. The
    ledger hashes leaves twice, so it must reject it.
    """
    x = env.users[6]
    amount = 2**200 + 12345  # > L1 as a number, so the sorted pair is (L1, L2)
    l1 = b"\x00" * 12 + bytes.fromhex(x[2:])
    l2 = amount.to_bytes(32, "big")
    l3 = keccak256(b"some other leaf")
    n = hash_pair(l1, l2)
    root = hash_pair(n, l3)
    assert n == keccak256(abi_encode(["address", "uint256"], [x, amount]))
    assert process_proof(n, [l3]) == root  # what a single-hashed scheme would accept
    submit(env, 1, root, 10)
    expect_revert(env.w3, env.ledger.functions.claim(env.operator, 1, x, amount, [l3]), x,
                  "LedgerInvalidProof", env.operator, x, amount)
    assert env.ledger.functions.claimed(env.operator, x).call() == 0


def test_submit_rejections(env: ChainEnv) -> None:
    a = env.users[0]
    t1 = rewards_tree({a: 100})
    recs = records_tree(domain_of(env), 1)
    x = export_hash(1)
    z = b"\x00" * 32
    sub = env.ledger.functions.submitEpoch
    stranger = env.users[1]
    role = env.ledger.functions.OPERATOR_ROLE().call()
    before = _ledger_state(env, [a])
    expect_revert(env.w3, sub(1, recs.root, 3, t1.root, x, 100, 0), stranger,
                  "AccessControlUnauthorizedAccount", stranger, role)
    expect_revert(env.w3, sub(2, recs.root, 3, t1.root, x, 100, 0), env.operator,
                  "LedgerUnexpectedEpoch", env.operator, 1, 2)
    expect_revert(env.w3, sub(0, recs.root, 3, t1.root, x, 100, 0), env.operator, "LedgerUnexpectedEpoch")
    expect_revert(env.w3, sub(1, z, 3, t1.root, x, 100, 0), env.operator, "LedgerZeroRoot", "recordsRoot")
    expect_revert(env.w3, sub(1, recs.root, 3, z, x, 100, 0), env.operator, "LedgerZeroRoot", "rewardsRoot")
    expect_revert(env.w3, sub(1, recs.root, 3, t1.root, z, 100, 0), env.operator, "LedgerZeroRoot", "exportHash")
    expect_revert(env.w3, sub(1, recs.root, 0, t1.root, x, 100, 0), env.operator, "LedgerZeroRecordCount")
    assert _ledger_state(env, [a]) == before

    submit(env, 1, t1, 100)
    before = _ledger_state(env, [a])
    t2 = rewards_tree({a: 90})
    expect_revert(env.w3, sub(1, recs.root, 3, t2.root, x, 100, 1), env.operator, "LedgerUnexpectedEpoch",
                  env.operator, 2, 1)
    expect_revert(env.w3, sub(3, recs.root, 3, t2.root, x, 100, 1), env.operator, "LedgerUnexpectedEpoch",
                  env.operator, 2, 3)
    expect_revert(env.w3, sub(2, recs.root, 3, t2.root, x, 90, 1), env.operator, "LedgerCumulativeDecreased",
                  env.operator, 100, 90)
    expect_revert(env.w3, sub(2, recs.root, 3, t1.root, x, 100, 0), env.operator, "LedgerStaleParent",
                  env.operator, 1, 0)
    assert _ledger_state(env, [a]) == before


def test_submit_without_allowance_or_balance(env: ChainEnv) -> None:
    a = env.users[0]
    t = rewards_tree({a: 500})
    send(env.w3, env.token.functions.approve(env.ledger.address, 499), env.operator)
    before = _ledger_state(env, [a])
    expect_revert(env.w3, submit_fn(env, 1, t, 500), env.operator,
                  "ERC20InsufficientAllowance", env.ledger.address, 499, 500)
    assert _ledger_state(env, [a]) == before
    # an operator with allowance but no tokens
    poor = env.users[6]
    send(env.w3, env.ledger.functions.grantRole(env.ledger.functions.OPERATOR_ROLE().call(), poor), env.admin)
    send(env.w3, env.token.functions.approve(env.ledger.address, 10**30), poor)
    expect_revert(env.w3, submit_fn(env, 1, t, 500, operator=poor), poor, "ERC20InsufficientBalance", poor, 0, 500)
    assert env.ledger.functions.lastEpoch(poor).call() == 0


def test_pause_stops_submits_never_claims(env: ChainEnv) -> None:
    a = env.users[0]
    t1 = rewards_tree({a: 100})
    submit(env, 1, t1, 100)
    stranger = env.users[2]
    expect_revert(env.w3, env.ledger.functions.pause(), stranger, "AccessControlUnauthorizedAccount")
    send(env.w3, env.ledger.functions.pause(), env.admin)
    assert env.ledger.functions.paused().call()
    t2 = rewards_tree({a: 200})
    expect_revert(env.w3, submit_fn(env, 2, t2, 200), env.operator, "EnforcedPause")
    assert env.ledger.functions.lastEpoch(env.operator).call() == 1
    send(env.w3, env.ledger.functions.claim(env.operator, 1, a, 100, t1.get_proof(0)), a)  # claims still work
    assert env.token.functions.balanceOf(a).call() == 100
    send(env.w3, env.ledger.functions.unpause(), env.admin)
    expect_revert(env.w3, env.ledger.functions.unpause(), env.admin, "ExpectedPause")
    submit(env, 2, t2, 200)


def test_set_shares(env: ChainEnv) -> None:
    r = send(env.w3, env.ledger.functions.setShares(6000, 3000, 1000), env.admin)
    (ev,) = events(env.ledger, "SharesSet", r)
    assert (ev.args.dataBps, ev.args.adapterOwnerBps, ev.args.operatorBps) == (6000, 3000, 1000)
    assert env.ledger.functions.shares().call() == [6000, 3000, 1000]
    expect_revert(env.w3, env.ledger.functions.setShares(6000, 3000, 1001), env.admin,
                  "LedgerInvalidShares", 6000, 3000, 1001)
    expect_revert(env.w3, env.ledger.functions.setShares(7000, 2000, 1000), env.operator,
                  "AccessControlUnauthorizedAccount")
    assert env.ledger.functions.shares().call() == [6000, 3000, 1000]


def _add_operator(env: ChainEnv, who: str, funds: int, ledger: object = None) -> None:
    led = env.ledger if ledger is None else ledger
    send(env.w3, led.functions.grantRole(led.functions.OPERATOR_ROLE().call(), who), env.admin)  # type: ignore[attr-defined]
    send(env.w3, env.token.functions.mint(who, funds), env.admin)
    send(env.w3, env.token.functions.approve(led.address, funds), who)  # type: ignore[attr-defined]


def test_claims_cannot_exceed_the_funded_total(env: ChainEnv) -> None:
    """A tree that sums to more than its cumulative total cannot spend other operators' funds."""
    a, b = env.users[:2]
    other = env.users[6]
    _add_operator(env, other, 1000)
    submit(env, 1, rewards_tree({b: 1000}), 1000, operator=other)
    greedy = rewards_tree({a: 80, b: 80})
    submit(env, 1, greedy, 100)  # claims 160 but funds 100
    send(env.w3, env.ledger.functions.claim(env.operator, 1, a, 80, greedy.get_proof(0)), a)
    expect_revert(env.w3, env.ledger.functions.claim(env.operator, 1, b, 80, greedy.get_proof(1)), b,
                  "LedgerClaimExceedsFunding", env.operator, 160, 100)
    # in a batch the funding cap is a broken root, not a failing payee: the whole call reverts
    expect_revert(env.w3, env.ledger.functions.claimMany(env.operator, 1, [b], [80], [greedy.get_proof(1)]), b,
                  "LedgerClaimExceedsFunding", env.operator, 160, 100)
    assert env.token.functions.balanceOf(env.ledger.address).call() == 1020


def test_challenge_delay_and_guardian_revoke(env: ChainEnv) -> None:
    led = env.delayed_ledger
    a, b = env.users[:2]
    t1 = rewards_tree({a: 100})
    submit(env, 1, t1, 100, ledger=led)
    claim1 = led.functions.claim(env.operator, 1, a, 100, t1.get_proof(0))
    (_, _, _, _, _, submitted_at, _, _, _) = led.functions.getEpoch(env.operator, 1).call()
    expect_revert(env.w3, claim1, a, "LedgerRootNotInEffect", env.operator, 1, submitted_at + DELAY)
    assert led.functions.effectiveAt(env.operator, 1).call() == submitted_at + DELAY
    assert led.functions.rootInEffect(env.operator).call()[0] == 0
    increase_time(env.w3, DELAY + 1)
    assert led.functions.rootInEffect(env.operator).call() == [1, t1.root, 100]
    expect_revert(env.w3, led.functions.revokeRoot(env.operator, 1), env.guardian, "LedgerRootAlreadyInEffect")

    # a stolen key posts an inflated epoch 2; the guardian revokes it while pending
    evil = rewards_tree({b: 10_000})
    submit(env, 2, evil, 10_100, ledger=led)
    assert led.functions.fundedTotal(env.operator).call() == 10_100
    expect_revert(env.w3, led.functions.revokeRoot(env.operator, 2), env.users[3], "AccessControlUnauthorizedAccount")
    r = send(env.w3, led.functions.revokeRoot(env.operator, 2), env.guardian)
    (ev,) = events(led, "RootRevoked", r)
    assert (ev.args.operator, ev.args.epoch, ev.args.lastRevoked, ev.args.guardian) == (env.operator, 2, 2,
                                                                                        env.guardian)
    expect_revert(env.w3, led.functions.revokeRoot(env.operator, 2), env.guardian, "LedgerEpochRevoked",
                  env.operator, 2)
    expect_revert(env.w3, led.functions.revokeRoot(env.operator, 9), env.guardian, "LedgerUnknownEpoch",
                  env.operator, 9)
    assert led.functions.getEpoch(env.operator, 2).call()[8] is True
    assert led.functions.isRevoked(env.operator, 2).call() and not led.functions.isRevoked(env.operator, 1).call()
    increase_time(env.w3, DELAY + 1)
    assert led.functions.rootInEffect(env.operator).call()[0] == 1  # a revoked root never takes effect
    expect_revert(env.w3, led.functions.claim(env.operator, 2, b, 10_000, evil.get_proof(0)), b,
                  "LedgerEpochRevoked", env.operator, 2)
    expect_revert(env.w3, led.functions.claim(env.operator, 1, b, 10_000, evil.get_proof(0)), b,
                  "LedgerInvalidProof")

    # the honest epoch 3 continues from epoch 1's total; the revoked funds are credit: nothing new is pulled
    t3 = rewards_tree({a: 150, b: 50})
    r = submit(env, 3, t3, 200, ledger=led)
    assert events(led, "EpochSubmitted", r)[0].args.pulled == 0
    assert led.functions.getEpoch(env.operator, 3).call()[6:] == (1, 2, False)  # extends 1 at depth 2
    assert led.functions.fundedTotal(env.operator).call() == 10_100
    send(env.w3, claim1, a)  # epoch 1 is still the root in effect while 3 is pending
    increase_time(env.w3, DELAY + 1)
    send(env.w3, led.functions.claim(env.operator, 3, a, 150, t3.get_proof([a, 150])), a)
    send(env.w3, led.functions.claim(env.operator, 3, b, 50, t3.get_proof([b, 50])), b)
    assert env.token.functions.balanceOf(a).call() == 150 and env.token.functions.balanceOf(b).call() == 50
    bal = env.token.functions.balanceOf(led.address).call()
    assert bal == led.functions.fundedTotal(env.operator).call() - led.functions.claimedTotal(env.operator).call()
    # epoch 4 draws on the remaining credit first: 10_100 funded, so a total of 10_150 pulls 50
    r = submit(env, 4, rewards_tree({a: 10_150}), 10_150, ledger=led)
    assert events(led, "EpochSubmitted", r)[0].args.pulled == 50


def test_reentrancy_through_a_malicious_token(env: ChainEnv) -> None:
    w3, a, b = env.w3, env.users[0], env.users[1]
    mal = deploy(w3, "MaliciousToken", [], env.admin)
    led = deploy(w3, "AttributionLedger", [env.admin, mal.address, 0, 7000, 2000, 1000], env.admin)
    send(w3, mal.functions.mint(env.admin, 1000), env.admin)
    send(w3, mal.functions.approve(led.address, 1000), env.admin)
    tree = rewards_tree({a: 100, b: 200})
    send(w3, submit_fn(env, 1, tree, 300, ledger=led, operator=env.admin), env.admin)

    # claim(a) -> token.transfer -> ledger.claim(b): the guard must stop the inner call
    inner = led.encode_abi("claim", args=[env.admin, 1, b, 200, tree.get_proof([b, 200])])
    send(w3, mal.functions.arm(led.address, inner), env.admin)
    expect_revert(w3, led.functions.claim(env.admin, 1, a, 100, tree.get_proof([a, 100])), a,
                  "ReentrancyGuardReentrantCall")
    assert led.functions.claimed(env.admin, a).call() == 0 and led.functions.claimed(env.admin, b).call() == 0
    assert mal.functions.balanceOf(led.address).call() == 300

    # submitEpoch -> token.transferFrom -> ledger.claimMany: also stopped
    inner = led.encode_abi("claimMany", args=[env.admin, 1, [b], [200], [tree.get_proof([b, 200])]])
    send(w3, mal.functions.arm(led.address, inner), env.admin)
    t2 = rewards_tree({a: 100, b: 300})
    expect_revert(w3, submit_fn(env, 2, t2, 400, ledger=led, operator=env.admin), env.admin,
                  "ReentrancyGuardReentrantCall")
    assert led.functions.lastEpoch(env.admin).call() == 1
    assert mal.functions.balanceOf(b).call() == 0


def test_root_in_effect_skips_revoked_and_pending(env: ChainEnv) -> None:
    """rootInEffect finds the newest live epoch in effect, over revoked and pending ones."""
    led = env.delayed_ledger
    a = env.users[0]
    trees = [rewards_tree({a: 10 * k}) for k in range(1, 6)]
    submit(env, 1, trees[0], 10, ledger=led)
    increase_time(env.w3, DELAY + 1)
    for k in (2, 3, 4):
        submit(env, k, trees[k - 1], 10 * k, ledger=led)
        send(env.w3, led.functions.revokeRoot(env.operator, k), env.guardian)
    submit(env, 5, trees[4], 50, ledger=led)
    assert led.functions.getEpoch(env.operator, 5).call()[6:8] == (1, 2)  # previousLive skips the revoked 2..4
    assert led.functions.rootInEffect(env.operator).call()[0] == 1
    increase_time(env.w3, DELAY + 1)
    assert led.functions.rootInEffect(env.operator).call() == [5, trees[4].root, 50]
    assert Web3.to_checksum_address(led.functions.rewardToken().call()) == env.token.address
