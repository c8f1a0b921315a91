"""ContributorRegistry, DatanetRegistry and AdapterRegistry on a real anvil: every function, every custom error."""

from __future__ import annotations

import pytest
from web3.exceptions import ContractLogicError

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.ledger.merkle import CONTRIBUTION_LEAF_ENCODING, StandardMerkleTree, keccak256
from tests.contracts.helpers import (
    DECODER,
    ChainEnv,
    commitment,
    deploy,
    events,
    expect_revert,
    increase_time,
    mine,
    register_adapter,
    send,
)

H1, H2, H3 = (keccak256(bytes([i])) for i in (1, 2, 3))


def _contributions(env: ChainEnv) -> StandardMerkleTree:
    return StandardMerkleTree.of([[env.users[0], H1, 10], [env.users[1], H2, 30]], CONTRIBUTION_LEAF_ENCODING)


def _register_datanet(env: ChainEnv) -> int:
    tree = _contributions(env)
    r = send(env.w3, env.datanets.functions.registerDatanet(tree.root, len(tree), "ipfs://datanet"), env.users[2])
    return int(events(env.datanets, "DatanetRegistered", r)[0].args.id)


def _register_adapter(env: ChainEnv, owner: str, weights: bytes, datanets: list[int], fee: int = 5) -> int:
    return register_adapter(env, owner, weights, datanets, base=H2, config=H3, fee=fee)


# ------------------------------------------------------------------ contributors


def test_contributor_lifecycle(env: ChainEnv) -> None:
    reg = env.contributors.functions
    alice, new_payout = env.users[0], env.users[4]
    assert not reg.isRegistered(alice).call() and not reg.isActive(alice).call()
    r = send(env.w3, reg.registerContributor("https://alice.example"), alice)
    (ev,) = events(env.contributors, "ContributorRegistered", r)
    assert (ev.args.account, ev.args.profileUri) == (alice, "https://alice.example")
    assert reg.isActive(alice).call() and reg.payoutOf(alice).call() == alice
    assert reg.contributorCount().call() == 1
    info = reg.getContributor(alice).call()
    assert info[0] == alice and info[2] is True and info[3] is False and info[4] == "https://alice.example"

    r = send(env.w3, reg.setPayoutAddress(new_payout), alice)
    assert events(env.contributors, "PayoutAddressSet", r)[0].args.payout == new_payout
    assert reg.payoutOf(alice).call() == new_payout

    r = send(env.w3, reg.suspend(alice), env.admin)
    assert events(env.contributors, "ContributorSuspended", r)[0].args.by == env.admin
    assert not reg.isActive(alice).call() and reg.isRegistered(alice).call()
    r = send(env.w3, reg.reinstate(alice), env.admin)
    assert events(env.contributors, "ContributorReinstated", r)[0].args.account == alice
    assert reg.isActive(alice).call()


def test_contributor_errors(env: ChainEnv) -> None:
    reg = env.contributors.functions
    alice, bob = env.users[0], env.users[1]
    send(env.w3, reg.registerContributor(""), alice)
    expect_revert(env.w3, reg.registerContributor("again"), alice, "ContributorAlreadyRegistered", alice)
    expect_revert(env.w3, reg.setPayoutAddress(bob), bob, "ContributorNotRegistered", bob)
    expect_revert(env.w3, reg.setPayoutAddress("0x" + "00" * 20), alice, "ContributorZeroAddress")
    expect_revert(env.w3, reg.suspend(bob), env.admin, "ContributorNotRegistered", bob)
    expect_revert(env.w3, reg.reinstate(alice), env.admin, "ContributorNotSuspended", alice)
    role = reg.SUSPENDER_ROLE().call()
    expect_revert(env.w3, reg.suspend(alice), bob, "AccessControlUnauthorizedAccount", bob, role)
    send(env.w3, reg.suspend(alice), env.admin)
    expect_revert(env.w3, reg.suspend(alice), env.admin, "ContributorAlreadySuspended", alice)
    expect_revert(env.w3, reg.reinstate(alice), bob, "AccessControlUnauthorizedAccount")
    # views of an unknown account
    with pytest.raises(ContractLogicError) as info:
        reg.payoutOf(bob).call()
    assert DECODER.decode(info.value.data).name == "ContributorNotRegistered"
    # unchanged by the failures
    assert reg.payoutOf(alice).call() == alice and not reg.isActive(alice).call()
    assert reg.contributorCount().call() == 1


# ------------------------------------------------------------------ datanets


def test_datanet_register_and_views(env: ChainEnv) -> None:
    reg = env.datanets.functions
    assert reg.contributorRegistry().call() == env.contributors.address
    assert reg.datanetCount().call() == 0 and not reg.exists(1).call()
    tree = _contributions(env)
    r = send(env.w3, reg.registerDatanet(tree.root, 2, "ipfs://d1"), env.users[2])
    (ev,) = events(env.datanets, "DatanetRegistered", r)
    assert (ev.args.id, ev.args.curator, ev.args.contributionsRoot, ev.args.contributionCount, ev.args.uri) == (
        1, env.users[2], tree.root, 2, "ipfs://d1")
    assert reg.registerDatanet(H1, 1, "x").call({"from": env.users[3]}) == 2  # ids count from 1
    d = reg.getDatanet(1).call()
    assert d[0] == tree.root and d[1] == 2 and d[3] == env.users[2] and d[4] == "ipfs://d1"
    assert reg.exists(1).call() and not reg.exists(0).call() and not reg.exists(2).call()
    assert reg.datanetCount().call() == 1


def test_datanet_errors(env: ChainEnv) -> None:
    reg = env.datanets.functions
    expect_revert(env.w3, reg.registerDatanet(b"\x00" * 32, 1, "x"), env.users[0], "DatanetZeroRoot")
    expect_revert(env.w3, reg.registerDatanet(H1, 0, "x"), env.users[0], "DatanetZeroCount")
    assert reg.datanetCount().call() == 0
    for bad in (0, 1):
        with pytest.raises(ContractLogicError) as info:
            reg.getDatanet(bad).call()
        assert DECODER.decode(info.value.data).args == (bad,)
    art = load_artifact("DatanetRegistry")
    data = env.w3.eth.contract(abi=art.abi, bytecode=art.bytecode).constructor(env.users[0]).data_in_transaction
    with pytest.raises(ContractLogicError) as info:
        env.w3.eth.call({"from": env.admin, "data": data})
    assert DECODER.decode(info.value.data).name == "DatanetInvalidContributorRegistry"


# ------------------------------------------------------------------ adapters


def test_adapter_register_deprecate_and_views(env: ChainEnv) -> None:
    reg = env.adapters.functions
    assert reg.datanetRegistry().call() == env.datanets.address
    d1, d2 = _register_datanet(env), _register_datanet(env)
    owner = env.users[3]
    salt = keccak256(b"salt")
    c = commitment(owner, H1, H3, salt)
    assert reg.adapterCommitment(owner, H1, H3, salt).call() == c  # the local computation is the contract's
    r = send(env.w3, reg.commitAdapter(c), owner)
    (cev,) = events(env.adapters, "AdapterCommitted", r)
    assert (cev.args.commitment, cev.args.committer) == (c, owner)
    mine(env.w3)
    fn = reg.registerAdapter(H1, H2, H3, [d1, d2], 7, "file://a", salt)
    r = send(env.w3, fn, owner)
    (ev,) = events(env.adapters, "AdapterRegistered", r)
    assert (ev.args.id, ev.args.owner, ev.args.weightsHash, ev.args.datanetIds, ev.args.feePerToken) == (
        1, owner, H1, [d1, d2], 7)
    a = reg.getAdapter(1).call()
    assert a[0] == H1 and a[1] == H2 and a[2] == H3 and a[3] == owner and a[5] is False
    assert a[6] == 7 and a[7] == [d1, d2] and a[8] == "file://a"
    assert reg.adapterIdByWeightsHash(H1).call() == 1 and reg.adapterIdByWeightsHash(H2).call() == 0
    assert reg.adapterCount().call() == 1
    assert _register_adapter(env, env.users[4], H2, [d2]) == 2

    r = send(env.w3, reg.deprecate(1), owner)
    assert events(env.adapters, "AdapterDeprecated", r)[0].args.id == 1
    assert reg.getAdapter(1).call()[5] is True


def test_adapter_errors(env: ChainEnv) -> None:
    reg = env.adapters.functions
    d1 = _register_datanet(env)
    owner, other = env.users[3], env.users[4]
    _register_adapter(env, owner, H1, [d1])
    zero = b"\x00" * 32
    s = keccak256(b"s")
    # without a commitment (or with a wrong salt) nothing else is even looked at
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1], 1, "u", s), other,
                  "AdapterNotCommitted", commitment(other, H2, H3, s))
    for w, c in ((H2, H3), (H1, H3), (zero, H3), (H2, zero)):
        send(env.w3, reg.commitAdapter(commitment(other, w, c, s)), other)
    mine(env.w3)
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1], 1, "u", keccak256(b"t")), other,
                  "AdapterNotCommitted")
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1, 9], 1, "u", s), other, "AdapterUnknownDatanet", 9)
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [0], 1, "u", s), other, "AdapterUnknownDatanet", 0)
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [], 1, "u", s), other, "AdapterNoDatanets")
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1, d1], 1, "u", s), other,
                  "AdapterDuplicateDatanet", d1)
    expect_revert(env.w3, reg.registerAdapter(H1, H2, H3, [d1], 1, "u", s), other,
                  "AdapterDuplicateWeightsHash", H1, 1)
    expect_revert(env.w3, reg.registerAdapter(zero, H2, H3, [d1], 1, "u", s), other,
                  "AdapterZeroHash", "weightsHash")
    expect_revert(env.w3, reg.registerAdapter(H2, zero, H3, [d1], 1, "u", s), other,
                  "AdapterZeroHash", "baseModelHash")
    expect_revert(env.w3, reg.registerAdapter(H2, H2, zero, [d1], 1, "u", s), other,
                  "AdapterZeroHash", "trainingConfigHash")
    expect_revert(env.w3, reg.commitAdapter(zero), other, "AdapterZeroHash", "commitment")
    expect_revert(env.w3, reg.commitAdapter(commitment(other, H2, H3, s)), other, "AdapterAlreadyCommitted")
    assert reg.adapterCount().call() == 1 and reg.adapterIdByWeightsHash(H2).call() == 0

    expect_revert(env.w3, reg.deprecate(1), other, "AdapterNotOwner", 1, other)
    expect_revert(env.w3, reg.deprecate(2), owner, "AdapterUnknown", 2)
    assert reg.getAdapter(1).call()[5] is False
    send(env.w3, reg.deprecate(1), owner)
    expect_revert(env.w3, reg.deprecate(1), owner, "AdapterAlreadyDeprecated", 1)
    with pytest.raises(ContractLogicError) as info:
        reg.getAdapter(0).call()
    assert DECODER.decode(info.value.data).name == "AdapterUnknown"


def test_adapter_registry_needs_a_contract(env: ChainEnv) -> None:
    art = load_artifact("AdapterRegistry")
    data = env.w3.eth.contract(abi=art.abi, bytecode=art.bytecode).constructor(env.users[0]).data_in_transaction
    with pytest.raises(ContractLogicError) as info:
        env.w3.eth.call({"from": env.admin, "data": data})
    assert DECODER.decode(info.value.data).describe().startswith("AdapterInvalidDatanetRegistry")
    # and a registry bound to a fresh datanet registry works end to end
    fresh = deploy(env.w3, "DatanetRegistry", [env.contributors.address], env.admin)
    bound = deploy(env.w3, "AdapterRegistry", [fresh.address], env.admin)
    assert bound.functions.datanetRegistry().call() == fresh.address


# ------------------------------------------------------------------ front-running (issue 17, item 1)


def _in_one_block(env: ChainEnv, txs: list[dict[str, object]]) -> list[dict[str, object]]:
    """Send raw `txs` (from unlocked accounts) with automine off, mine them in one block, return the receipts.

    anvil orders a block by priority fee, so the tx with the highest `maxPriorityFeePerGas` lands first."""
    w3 = env.w3
    w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        hashes = [w3.eth.send_transaction(tx) for tx in txs]  # type: ignore[arg-type]
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    return [dict(w3.eth.wait_for_transaction_receipt(h)) for h in hashes]


def _copy_from(tx: dict[str, object], sender: str, tip_gwei: int) -> dict[str, object]:
    """`tx` (to + calldata, byte for byte) re-sent from `sender` with a priority fee of `tip_gwei`."""
    return {"from": sender, "to": tx["to"], "data": tx["data"], "gas": 500_000,
            "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": tip_gwei * 10**9}


def test_a_copied_registration_sent_first_does_not_take_the_id(env: ChainEnv) -> None:
    reg = env.adapters.functions
    d1 = _register_datanet(env)
    owner, squatter = env.users[3], env.users[6]
    salt = keccak256(b"owner's secret salt")
    send(env.w3, reg.commitAdapter(commitment(owner, H1, H3, salt)), owner)
    mine(env.w3)
    reveal = reg.registerAdapter(H1, H2, H3, [d1], 7, "file://a", salt).build_transaction(
        {"from": owner, "gas": 500_000, "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": 1 * 10**9})
    copy = _copy_from(reveal, squatter, tip_gwei=50)  # the same bytes, a higher fee
    assert copy["data"] == reveal["data"]
    r_copy, r_owner = _in_one_block(env, [copy, {k: reveal[k] for k in copy if k != "from"} | {"from": owner}])
    assert r_copy["blockNumber"] == r_owner["blockNumber"]
    assert int(r_copy["transactionIndex"]) < int(r_owner["transactionIndex"])  # the copy ran first ...
    assert r_copy["status"] == 0 and r_owner["status"] == 1  # ... and failed; the owner's went through
    assert reg.adapterIdByWeightsHash(H1).call() == 1
    assert reg.getAdapter(1).call()[3] == owner
    # why the copy failed: under the squatter's address there is no commitment to these hashes and salt
    expect_revert(env.w3, reg.registerAdapter(H1, H2, H3, [d1], 7, "file://a", salt), squatter,
                  "AdapterNotCommitted", commitment(squatter, H1, H3, salt))


def test_copying_the_commitment_too_does_not_take_the_id(env: ChainEnv) -> None:
    """The squatter front-runs both steps with byte-for-byte copies. The copied commitment binds the owner's
    address, so it only commits on the owner's behalf: the owner's reveal still lands, the squatter's fails."""
    reg = env.adapters.functions
    d1 = _register_datanet(env)
    owner, squatter = env.users[3], env.users[6]
    salt = keccak256(b"owner's secret salt")
    commit = reg.commitAdapter(commitment(owner, H1, H3, salt)).build_transaction(
        {"from": owner, "gas": 200_000, "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": 10**9})
    r_copy, r_owner = _in_one_block(env, [_copy_from(commit, squatter, 50), _copy_from(commit, owner, 1)])
    assert r_copy["status"] == 1 and int(r_copy["transactionIndex"]) < int(r_owner["transactionIndex"])
    assert r_owner["status"] == 0  # AdapterAlreadyCommitted: the owner's own commitment is already on chain

    reveal = reg.registerAdapter(H1, H2, H3, [d1], 7, "file://a", salt).build_transaction(
        {"from": owner, "gas": 500_000, "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": 10**9})
    r_copy, r_owner = _in_one_block(env, [_copy_from(reveal, squatter, 50), _copy_from(reveal, owner, 1)])
    assert int(r_copy["transactionIndex"]) < int(r_owner["transactionIndex"])
    assert r_copy["status"] == 0 and r_owner["status"] == 1
    assert reg.getAdapter(reg.adapterIdByWeightsHash(H1).call()).call()[3] == owner
    assert reg.adapterCount().call() == 1


def test_reveal_needs_a_later_block_and_a_fresh_commitment(env: ChainEnv) -> None:
    reg = env.adapters.functions
    d1 = _register_datanet(env)
    owner = env.users[3]
    salt = keccak256(b"s1")
    c = commitment(owner, H1, H3, salt)
    commit = _copy_from(reg.commitAdapter(c).build_transaction({"from": owner, "gas": 200_000}), owner, 2)
    reveal = _copy_from(reg.registerAdapter(H1, H2, H3, [d1], 7, "u", salt).build_transaction(
        {"from": owner, "gas": 500_000}), owner, 1)
    r_commit, r_reveal = _in_one_block(env, [commit, reveal])
    assert r_commit["status"] == 1 and r_reveal["status"] == 0  # same block: AdapterCommitTooNew
    assert reg.adapterCount().call() == 0
    # a commitment expires after COMMIT_TTL
    ttl = reg.COMMIT_TTL().call()
    increase_time(env.w3, ttl)
    expect_revert(env.w3, reg.registerAdapter(H1, H2, H3, [d1], 7, "u", salt), owner, "AdapterNotCommitted", c)
    # re-committing the expired commitment works, and a commitment is used up by its reveal
    send(env.w3, reg.commitAdapter(c), owner)
    mine(env.w3)
    send(env.w3, reg.registerAdapter(H1, H2, H3, [d1], 7, "u", salt), owner)
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1], 7, "u", salt), owner, "AdapterNotCommitted")
