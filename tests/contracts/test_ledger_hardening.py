"""Issue 17 on a real anvil: each way the ledger failed its contributors, as an attack or a stuck state that
now fails or resolves. (Squatting is in test_registries.py; Foundry fuzz/invariant suites in test_forge.py.)

    2 fee-on-transfer token: refused, nothing credited     5 revocation cascades; a revoked root never pays
    3 claim/submit gas flat in pending and revoked epochs  6 claimMany pays the others past a failing payee
    4 a zero challenge delay refused off dev chains        7 verifyRecord takes fields, domain-separated
    8 refundCredit and sweep: nothing stuck                  Claimed names the caller
"""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_abi import encode as abi_encode
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.chain.devnet import Anvil
from loraledger.node.ledger.merkle import hash_pair, keccak256
from loraledger.node.ledger.records import RecordDomain
from tests.contracts.helpers import (
    DECODER,
    DELAY,
    MAX_UINT,
    ChainEnv,
    deploy,
    domain_of,
    events,
    expect_revert,
    increase_time,
    make_record,
    records_tree,
    rewards_tree,
    send,
    send_all,
    submit,
    submit_fn,
)

ZERO = "0x" + "00" * 20
PENDING = 200  # pending epochs in the flat-gas tests (scripts/bench_ledger_gas.py goes to 1,000)


def _ledger_on(env: ChainEnv, token: Contract, delay: int = 0) -> Contract:
    """A fresh ledger paying in `token`, the env's operator holding OPERATOR_ROLE, the guardian GUARDIAN_ROLE."""
    led = deploy(env.w3, "AttributionLedger", [env.admin, token.address, delay, 7000, 2000, 1000], env.admin)
    send(env.w3, led.functions.grantRole(led.functions.OPERATOR_ROLE().call(), env.operator), env.admin)
    send(env.w3, led.functions.grantRole(led.functions.GUARDIAN_ROLE().call(), env.guardian), env.admin)
    return led


def _operator(env: ChainEnv, led: Contract, token: Contract, who: str, funds: int) -> None:
    send(env.w3, led.functions.grantRole(led.functions.OPERATOR_ROLE().call(), who), env.admin)
    send(env.w3, token.functions.mint(who, funds), env.admin)
    send(env.w3, token.functions.approve(led.address, MAX_UINT), who)


# ------------------------------------------------------------------ 2. funding counts what arrived


def test_a_fee_on_transfer_token_is_refused(env: ChainEnv) -> None:
    """Two operators each fund 1,000 of a 10%-fee token: each submit reverts (900 arrived of 1,000 pulled), so
    no operator is ever credited with tokens the ledger does not hold."""
    w3 = env.w3
    fot = deploy(w3, "FeeOnTransferToken", [1000], env.admin)
    led = _ledger_on(env, fot)
    op_b = env.users[6]
    for who in (env.operator, op_b):
        _operator(env, led, fot, who, 10_000)
        expect_revert(w3, submit_fn(env, 1, rewards_tree({env.users[0]: 1000}), 1000, ledger=led, operator=who),
                      who, "LedgerTransferShortfall", 1000, 900)
        assert led.functions.lastEpoch(who).call() == 0 and led.functions.fundedTotal(who).call() == 0
    assert fot.functions.balanceOf(led.address).call() == 0

    # the same flow with a fee of 0 goes through: the refusal is about the shortfall, not the token
    clean = deploy(w3, "FeeOnTransferToken", [0], env.admin)
    led0 = _ledger_on(env, clean)
    for who in (env.operator, op_b):
        _operator(env, led0, clean, who, 10_000)
        submit(env, 1, rewards_tree({env.users[0]: 1000}), 1000, ledger=led0, operator=who)
    assert clean.functions.balanceOf(led0.address).call() == 2000 == led0.functions.owedTotal().call()


# ------------------------------------------------------------------ 3. bounded cost


def _claim_gas(env: ChainEnv, led: Contract, epoch: int, tree: object, account: str, amount: int) -> int:
    fn = led.functions.claim(env.operator, epoch, account, amount, tree.get_proof([account, amount]))  # type: ignore[attr-defined]
    return int(send(env.w3, fn, account)["gasUsed"])


def test_claim_and_submit_gas_stay_flat_with_many_pending_and_revoked_epochs(env: ChainEnv) -> None:
    """Before: claim 93.6k at 0 pending epochs, 673k at 199; submit after revoking them 2.8M. Now: the same gas
    at 0, PENDING pending and PENDING revoked epochs (each claim pays a fresh account of the same root)."""
    led, w3 = env.delayed_ledger, env.w3
    users = env.users[:4]
    t1 = rewards_tree({u: 100 * (i + 1) for i, u in enumerate(users)})
    submit(env, 1, t1, 1000, ledger=led)
    g_submit_0 = int(send(w3, submit_fn(env, 2, t1, 1000, ledger=led), env.operator)["gasUsed"])
    increase_time(w3, DELAY + 1)
    # epoch 2 is in effect now; claims name it (advancing the pointer once, then the plain path)
    g_first = _claim_gas(env, led, 2, t1, users[0], 100)
    g_claim_0 = _claim_gas(env, led, 2, t1, users[1], 200)

    calls = [(submit_fn(env, k, t1, 1000, ledger=led, parent=k - 1), env.operator) for k in range(3, 3 + PENDING)]
    receipts = send_all(w3, calls)
    g_submit_n = int(receipts[-1]["gasUsed"])
    g_claim_n = _claim_gas(env, led, 2, t1, users[2], 300)
    assert led.functions.lastEpoch(env.operator).call() == 2 + PENDING
    assert led.functions.effectiveEpoch(env.operator).call() == 2

    # revoke the whole pending run at once (cascade) and claim / submit again
    r = send(w3, led.functions.revokeRoot(env.operator, 3), env.guardian)
    g_revoke = int(r["gasUsed"])
    assert events(led, "RootRevoked", r)[0].args.lastRevoked == 2 + PENDING
    g_claim_revoked = _claim_gas(env, led, 2, t1, users[3], 400)
    g_submit_after = int(send(w3, submit_fn(env, 3 + PENDING, t1, 1000, ledger=led), env.operator)["gasUsed"])

    # fresh-account claims of one root differ only in calldata (address bytes): well under one cold read
    assert abs(g_claim_n - g_claim_0) <= 300, (g_claim_0, g_claim_n)
    assert g_claim_revoked <= g_claim_0 + 300, (g_claim_0, g_claim_revoked)
    assert g_first > g_claim_0  # the first claim also advanced the effective epoch
    assert abs(g_submit_n - g_submit_0) <= 300, (g_submit_0, g_submit_n)
    assert g_submit_after <= g_submit_0 + 300, (g_submit_0, g_submit_after)  # reuses the cut chain position
    assert g_revoke < 60_000, g_revoke
    # the budget (90k) holds for an account already holding reward tokens (scripts/bench_ledger_gas.py:
    # 78.9k); this first claim of a brand-new account also pays its fresh token-balance slot (94.5k)
    assert g_claim_n <= 96_000, g_claim_n


def test_a_claim_hint_advances_past_many_epochs_in_one_step(env: ChainEnv) -> None:
    led, w3 = env.delayed_ledger, env.w3
    a, b = env.users[:2]
    trees = {k: rewards_tree({a: 10 * k, b: 5 * k}) for k in range(1, 41)}
    send_all(w3, [(submit_fn(env, k, trees[k], 15 * k, ledger=led, parent=k - 1), env.operator) for k in trees])
    increase_time(w3, DELAY + 1)
    r = send(w3, led.functions.claim(env.operator, 40, a, 400, trees[40].get_proof([a, 400])), b)
    (adv,) = events(led, "EffectiveEpochAdvanced", r)
    assert (adv.args.epoch, adv.args.caller) == (40, b)
    assert led.functions.effectiveEpoch(env.operator).call() == 40
    # anyone may advance; only forward, only to a live epoch in effect
    expect_revert(w3, led.functions.advance(env.operator, 39), b, "LedgerStaleEpoch", env.operator, 39, 40)
    submit(env, 41, rewards_tree({a: 500}), 600, ledger=led)
    expect_revert(w3, led.functions.advance(env.operator, 41), b, "LedgerRootNotInEffect")


# ------------------------------------------------------------------ 4. delays that protect


@pytest.fixture(scope="module")
def sepolia_like(tmp_path_factory: pytest.TempPathFactory) -> object:
    """An anvil answering as chain 11155111 (a public testnet's id), for the zero-delay rule only."""
    with Anvil(Path(tmp_path_factory.mktemp("anvil-11155111")), chain_id=11155111) as node:
        w3 = Web3(Web3.HTTPProvider(node.rpc_url, request_kwargs={"timeout": 30}))
        assert w3.eth.chain_id == 11155111
        yield w3


def test_a_zero_challenge_delay_is_refused_off_dev_chains(sepolia_like: Web3, env: ChainEnv) -> None:
    w3 = sepolia_like
    admin = w3.eth.accounts[0]
    token = deploy(w3, "RewardToken", ["Reward", "RWD", admin], admin)
    art = load_artifact("AttributionLedger")
    factory = w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    data = factory.constructor(admin, token.address, 0, 7000, 2000, 1000).data_in_transaction
    with pytest.raises(ContractLogicError) as info:
        w3.eth.call({"from": admin, "data": data})
    decoded = DECODER.decode(info.value.data)
    assert (decoded.name, decoded.args) == ("LedgerUnsafeChallengeDelay", (11155111,))
    # a positive delay deploys there; on the dev chain (31337) a delay of 0 deploys (env.ledger has one)
    led = deploy(w3, "AttributionLedger", [admin, token.address, 1, 7000, 2000, 1000], admin)
    assert led.functions.challengeDelay().call() == 1
    assert env.ledger.functions.challengeDelay().call() == 0 and env.w3.eth.chain_id == 31337


# ------------------------------------------------------------------ 5. revocations that stick


def test_revocation_cascades_and_a_revoked_root_never_pays(env: ChainEnv) -> None:
    led, w3 = env.delayed_ledger, env.w3
    a, b, thief = env.users[:3]
    t1 = rewards_tree({a: 100, b: 50})
    submit(env, 1, t1, 150, ledger=led)
    increase_time(w3, DELAY + 1)
    # a stolen key builds three epochs on each other, each paying the thief more
    stolen = {k: rewards_tree({a: 100, b: 50, thief: 1000 * k}) for k in (2, 3, 4)}
    for k, t in stolen.items():
        submit(env, k, t, 150 + 1000 * k, ledger=led)
    r = send(w3, led.functions.revokeRoot(env.operator, 2), env.guardian)  # one call cuts 2, 3 and 4
    (ev,) = events(led, "RootRevoked", r)
    assert (ev.args.epoch, ev.args.lastRevoked) == (2, 4)
    assert [led.functions.isRevoked(env.operator, k).call() for k in (1, 2, 3, 4)] == [False, True, True, True]
    assert [led.functions.getEpoch(env.operator, k).call()[8] for k in (2, 3, 4)] == [True, True, True]
    assert led.functions.liveTip(env.operator).call() == 1
    expect_revert(w3, led.functions.revokeRoot(env.operator, 3), env.guardian, "LedgerEpochRevoked", env.operator, 3)

    # the honest epoch 5 builds on epoch 1's cumulative state, not on the revoked 4's (which was higher)
    t5 = rewards_tree({a: 120, b: 80})
    submit(env, 5, t5, 200, ledger=led)
    assert led.functions.getEpoch(env.operator, 5).call()[6:] == (1, 2, False)
    increase_time(w3, 10 * DELAY)
    for k in (2, 3, 4):  # long past their delay: still never payable, by claim, by batch or by advance
        proof = stolen[k].get_proof([thief, 1000 * k])
        expect_revert(w3, led.functions.claim(env.operator, k, thief, 1000 * k, proof), thief,
                      "LedgerEpochRevoked", env.operator, k)
        expect_revert(w3, led.functions.claimMany(env.operator, k, [thief], [1000 * k], [proof]), thief,
                      "LedgerEpochRevoked", env.operator, k)
        expect_revert(w3, led.functions.advance(env.operator, k), thief, "LedgerEpochRevoked", env.operator, k)
        assert not led.functions.verifyRecord(
            env.operator, k, make_record(k, 0).ledger_tuple(),
            records_tree(domain_of(env, led), k).get_proof(0)).call()
    assert led.functions.rootInEffect(env.operator).call() == [5, t5.root, 200]
    send(w3, led.functions.claimMany(env.operator, 5, [a, b], [120, 80],
                                     [t5.get_proof([a, 120]), t5.get_proof([b, 80])]), a)
    assert env.token.functions.balanceOf(thief).call() == 0
    assert led.functions.claimedTotal(env.operator).call() == 200
    # a revoked epoch number is never reused as live: a chain position cut and refilled still says revoked
    submit(env, 6, rewards_tree({a: 130, b: 80}), 210, ledger=led)
    send(w3, led.functions.revokeRoot(env.operator, 6), env.guardian)
    submit(env, 7, rewards_tree({a: 140, b: 80}), 220, ledger=led)
    assert [led.functions.isRevoked(env.operator, k).call() for k in (3, 4, 5, 6, 7)] == [True, True, False, True,
                                                                                          False]


# ------------------------------------------------------------------ 6. payouts that cannot block each other


def test_claim_many_pays_the_others_past_a_blocked_a_zero_and_a_bad_proof(env: ChainEnv) -> None:
    w3 = env.w3
    blk = deploy(w3, "BlocklistToken", [], env.admin)
    led = _ledger_on(env, blk)
    _operator(env, led, blk, env.operator, 10_000)
    a, blocked, c, d = env.users[:4]
    amounts = {a: 10, blocked: 20, ZERO: 30, c: 40}
    tree = rewards_tree(amounts)
    submit(env, 1, tree, 100, ledger=led)
    send(w3, blk.functions.setBlocked(blocked, True), env.admin)

    accounts = [a, blocked, ZERO, c, d]
    values = [10, 20, 30, 40, 50]
    proofs = [tree.get_proof([x, amounts[x]]) for x in accounts[:4]] + [tree.get_proof([c, 40])]  # d: c's proof
    caller = env.users[5]
    r = send(w3, led.functions.claimMany(env.operator, 1, accounts, values, proofs), caller)
    paid = [(e.args.account, e.args.amount, e.args.caller) for e in events(led, "Claimed", r)]
    assert paid == [(a, 10, caller), (c, 40, caller)]
    skipped = [(e.args.account, e.args.cumulativeAmount, e.args.reason) for e in events(led, "ClaimSkipped", r)]
    assert skipped == [(blocked, 20, 2), (Web3.to_checksum_address(ZERO), 30, 2), (d, 50, 1)]  # 2 transfer, 1 proof
    assert [led.functions.claimed(env.operator, x).call() for x in accounts] == [10, 0, 0, 40, 0]
    assert led.functions.claimedTotal(env.operator).call() == 50
    assert blk.functions.balanceOf(led.address).call() == 50
    # the skipped account is whole later: unblocked, it claims what it was owed
    send(w3, blk.functions.setBlocked(blocked, False), env.admin)
    send(w3, led.functions.claim(env.operator, 1, blocked, 20, tree.get_proof([blocked, 20])), blocked)
    assert blk.functions.balanceOf(blocked).call() == 20
    # a single claim to a blocked account still reverts with the token's error (nothing to skip to)
    send(w3, blk.functions.setBlocked(a, True), env.admin)
    t2 = rewards_tree({a: 15, blocked: 20, ZERO: 30, c: 40})
    submit(env, 2, t2, 105, ledger=led)
    expect_revert(w3, led.functions.claim(env.operator, 2, a, 15, t2.get_proof([a, 15])), a,
                  "TokenAccountBlocked", a)


# ------------------------------------------------------------------ 7. records proved by their contents


def test_verify_record_takes_fields_and_is_domain_separated(env: ChainEnv) -> None:
    w3, led = env.w3, env.ledger
    op_a, op_b = env.operator, env.users[6]
    _operator(env, led, env.token, op_b, 10_000)
    dom_a = domain_of(env)
    recs = [make_record(1, i) for i in range(4)]
    tree_a = records_tree(dom_a, 1, n=4)
    submit(env, 1, rewards_tree({env.users[0]: 10}), 10, records=tree_a)
    # operator B submits A's records root as its own
    submit(env, 1, rewards_tree({env.users[0]: 10}), 10, operator=op_b, records=tree_a)

    verify = led.functions.verifyRecord
    proofs = [tree_a.get_proof(r.leaf_values(dom_a)) for r in recs]
    assert all(verify(op_a, 1, r.ledger_tuple(), p).call() for r, p in zip(recs, proofs))
    # A's records do not verify under B, though B's root is A's root: the leaf names the operator
    assert not any(verify(op_b, 1, r.ledger_tuple(), p).call() for r, p in zip(recs, proofs))
    assert led.functions.recordLeaf(op_b, 1, recs[0].ledger_tuple()).call() == recs[0].leaf_hash(
        RecordDomain(31337, led.address, op_b)) != recs[0].leaf_hash(dom_a)
    # ... nor on another ledger, nor with another epoch number
    assert recs[0].leaf_hash(domain_of(env, env.delayed_ledger)) != recs[0].leaf_hash(dom_a)
    leaf = led.functions.recordLeaf
    assert leaf(op_a, 2, recs[0].ledger_tuple()).call() != leaf(op_a, 1, recs[0].ledger_tuple()).call()
    assert not verify(op_a, 2, recs[0].ledger_tuple(), proofs[0]).call()
    # the interface takes the record's fields, never a leaf: a root or an inner node has nothing to pass as
    (fn_abi,) = [e for e in led.abi if e.get("name") == "verifyRecord"]
    assert [i["type"] for i in fn_abi["inputs"]] == ["address", "uint64", "tuple", "bytes32[]"]
    # and a proof cut short at an inner node (what the old raw-leaf check accepted) verifies no record
    inner = hash_pair(recs[0].leaf_hash(dom_a), proofs[0][0])
    assert inner != tree_a.root and len(proofs[0]) == 2
    assert all(not verify(op_a, 1, r.ledger_tuple(), proofs[0][1:]).call() for r in recs)
    assert all(not verify(op_a, 1, r.ledger_tuple(), []).call() for r in recs)
    # a changed field breaks the proof
    tampered = list(recs[0].ledger_tuple())
    tampered[5] = tampered[5] + 1  # fee
    assert not verify(op_a, 1, tuple(tampered), proofs[0]).call()
    # the leaf is the double hash of the domain-prefixed encoding (what the node and auditors compute)
    enc = abi_encode(["uint256", "address", "address"], [31337, led.address, op_a]) + recs[0].abi_encode(dom_a)[96:]
    assert recs[0].leaf_hash(dom_a) == keccak256(keccak256(enc))
    assert w3.eth.chain_id == dom_a.chain_id


# ------------------------------------------------------------------ 8. nothing stuck


def test_refund_credit_after_revocation(env: ChainEnv) -> None:
    led, w3 = env.delayed_ledger, env.w3
    a = env.users[0]
    op = env.operator
    expect_revert(w3, led.functions.refundCredit(), op, "LedgerNothingToRefund", op)
    t1 = rewards_tree({a: 100})
    submit(env, 1, t1, 100, ledger=led)
    submit(env, 2, rewards_tree({a: 5000}), 5000, ledger=led)
    send(w3, led.functions.revokeRoot(env.operator, 2), env.guardian)
    # epoch 1 (the live tip) is still pending: no refund yet, its funds may still be needed
    expect_revert(w3, led.functions.refundCredit(), op, "LedgerEpochPending")
    increase_time(w3, DELAY + 1)
    before = env.token.functions.balanceOf(op).call()
    r = send(w3, led.functions.refundCredit(), op)
    (ev,) = events(led, "CreditRefunded", r)
    assert (ev.args.operator, ev.args.amount) == (op, 4900)
    assert env.token.functions.balanceOf(op).call() == before + 4900
    assert led.functions.refundedTotal(op).call() == 4900
    expect_revert(w3, led.functions.refundCredit(), op, "LedgerNothingToRefund", op)
    # what the live epoch owes stays: the contributor is still paid in full
    send(w3, led.functions.claim(op, 1, a, 100, t1.get_proof([a, 100])), a)
    assert env.token.functions.balanceOf(led.address).call() == 0 == led.functions.owedTotal().call()
    # an operator whose every epoch was revoked (and who lost its role) takes all of it back
    leaver = env.users[6]
    _operator(env, led, env.token, leaver, 700)
    submit(env, 1, rewards_tree({a: 700}), 700, ledger=led, operator=leaver)
    send(w3, led.functions.revokeRoot(leaver, 1), env.guardian)
    send(w3, led.functions.revokeRole(led.functions.OPERATOR_ROLE().call(), leaver), env.admin)
    send(w3, led.functions.refundCredit(), leaver)
    assert env.token.functions.balanceOf(leaver).call() == 700


def test_sweep_takes_only_stray_tokens(env: ChainEnv) -> None:
    led, w3 = env.ledger, env.w3
    a, b = env.users[:2]
    t1 = rewards_tree({a: 300, b: 200})
    submit(env, 1, t1, 500)
    send(w3, led.functions.claim(env.operator, 1, a, 300, t1.get_proof([a, 300])), a)
    expect_revert(w3, led.functions.sweep(env.users[5]), env.admin, "LedgerNothingToSweep")
    send(w3, env.token.functions.transfer(led.address, 777), env.operator)  # sent directly: stray
    assert led.functions.owedTotal().call() == 200
    expect_revert(w3, led.functions.sweep(env.users[5]), env.users[5], "AccessControlUnauthorizedAccount")
    expect_revert(w3, led.functions.sweep(ZERO), env.admin, "LedgerInvalidAddress")
    r = send(w3, led.functions.sweep(env.users[5]), env.admin)
    (ev,) = events(led, "Swept", r)
    assert (ev.args.to, ev.args.amount) == (env.users[5], 777)
    assert env.token.functions.balanceOf(env.users[5]).call() == 777
    assert env.token.functions.balanceOf(led.address).call() == 200 == led.functions.owedTotal().call()
    expect_revert(w3, led.functions.sweep(env.users[5]), env.admin, "LedgerNothingToSweep")
    send(w3, led.functions.claim(env.operator, 1, b, 200, t1.get_proof([b, 200])), b)  # b is still paid
    assert env.token.functions.balanceOf(b).call() == 200
    assert led.functions.operators().call() == [env.operator]
