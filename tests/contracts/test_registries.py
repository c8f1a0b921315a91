"""ContributorRegistry, DatanetRegistry and AdapterRegistry on a real anvil: every function, every custom error."""

from __future__ import annotations

import pytest
from web3.exceptions import ContractLogicError

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.ledger.merkle import CONTRIBUTION_LEAF_ENCODING, StandardMerkleTree, keccak256
from tests.contracts.helpers import DECODER, ChainEnv, deploy, events, expect_revert, send

H1, H2, H3 = (keccak256(bytes([i])) for i in (1, 2, 3))


def _contributions(env: ChainEnv) -> StandardMerkleTree:
    return StandardMerkleTree.of([[env.users[0], H1, 10], [env.users[1], H2, 30]], CONTRIBUTION_LEAF_ENCODING)


def _register_datanet(env: ChainEnv) -> int:
    tree = _contributions(env)
    r = send(env.w3, env.datanets.functions.registerDatanet(tree.root, len(tree), "ipfs://datanet"), env.users[2])
    return int(events(env.datanets, "DatanetRegistered", r)[0].args.id)


def _register_adapter(env: ChainEnv, owner: str, weights: bytes, datanets: list[int], fee: int = 5) -> int:
    fn = env.adapters.functions.registerAdapter(weights, H2, H3, datanets, fee, "file://adapter")
    r = send(env.w3, fn, owner)
    return int(events(env.adapters, "AdapterRegistered", r)[0].args.id)


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
    fn = reg.registerAdapter(H1, H2, H3, [d1, d2], 7, "file://a")
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
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1, 9], 1, "u"), other, "AdapterUnknownDatanet", 9)
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [0], 1, "u"), other, "AdapterUnknownDatanet", 0)
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [], 1, "u"), other, "AdapterNoDatanets")
    expect_revert(env.w3, reg.registerAdapter(H2, H2, H3, [d1, d1], 1, "u"), other, "AdapterDuplicateDatanet", d1)
    expect_revert(env.w3, reg.registerAdapter(H1, H2, H3, [d1], 1, "u"), other,
                  "AdapterDuplicateWeightsHash", H1, 1)
    expect_revert(env.w3, reg.registerAdapter(zero, H2, H3, [d1], 1, "u"), other, "AdapterZeroHash", "weightsHash")
    expect_revert(env.w3, reg.registerAdapter(H2, zero, H3, [d1], 1, "u"), other, "AdapterZeroHash", "baseModelHash")
    expect_revert(env.w3, reg.registerAdapter(H2, H2, zero, [d1], 1, "u"), other,
                  "AdapterZeroHash", "trainingConfigHash")
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
