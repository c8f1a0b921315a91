"""AdapterRegistry access on a real anvil: public by default, the owner's allowlist, events, errors, gas ceilings.

Gas ceilings sit a little above the measured values: a change that adds a storage slot per account or a second
write per call trips them.
"""

from __future__ import annotations

import pytest
from web3.exceptions import ContractLogicError

from loraledger.node.ledger.merkle import keccak256
from tests.contracts.helpers import DECODER, ChainEnv, events, expect_revert, register_adapter, send

# Measured (receipt gasUsed, 21k intrinsic included): setPublic(id, false) 50.0k (one fresh slot, 22.1k);
# setAllowed with one new account 51.8k, five 150.4k (24.7k per further account: a fresh slot and its event);
# removing one 29.8k (after the refund).
SET_PUBLIC_MAX = 51_000
SET_ALLOWED_ONE_MAX = 53_000
SET_ALLOWED_PER_EXTRA_ACCOUNT_MAX = 25_500
REMOVE_ONE_MAX = 31_000
ZERO = "0x" + "00" * 20


def _adapter(env: ChainEnv, owner: str, seed: int = 1) -> int:
    """Register a datanet and an adapter owned by `owner`; the adapter id."""
    h = keccak256(bytes([seed]))
    r = send(env.w3, env.datanets.functions.registerDatanet(h, 1, "ipfs://d"), env.users[2])
    datanet = int(events(env.datanets, "DatanetRegistered", r)[0].args.id)
    return register_adapter(env, owner, h, [datanet], fee=1, uri="file://a")


def test_every_adapter_starts_public(env: ChainEnv) -> None:
    reg = env.adapters.functions
    a = _adapter(env, env.users[3])
    assert reg.isPublic(a).call() is True
    for who in (env.users[0], env.users[5], ZERO):
        assert reg.isAllowed(a, who).call() is True


def test_owner_makes_it_private_and_keeps_an_allowlist(env: ChainEnv) -> None:
    reg = env.adapters.functions
    owner, alice, bob, carol = env.users[3], env.users[4], env.users[5], env.users[6]
    a = _adapter(env, owner)

    r = send(env.w3, reg.setPublic(a, False), owner)
    (ev,) = events(env.adapters, "AdapterAccessChanged", r)
    assert (ev.args.id, ev.args.isPublic) == (a, False)
    assert reg.isPublic(a).call() is False
    assert not reg.isAllowed(a, alice).call() and not reg.isAllowed(a, owner).call()  # the owner is a client too

    r = send(env.w3, reg.setAllowed(a, [alice, bob], True), owner)
    evs = events(env.adapters, "AdapterAllowlistChanged", r)
    assert [(e.args.id, e.args.account, e.args.allowed) for e in evs] == [(a, alice, True), (a, bob, True)]
    assert reg.isAllowed(a, alice).call() and reg.isAllowed(a, bob).call() and not reg.isAllowed(a, carol).call()

    # accounts already in the wanted state are skipped: no event, no change
    r = send(env.w3, reg.setAllowed(a, [alice, carol], True), owner)
    assert [e.args.account for e in events(env.adapters, "AdapterAllowlistChanged", r)] == [carol]
    r = send(env.w3, reg.setAllowed(a, [bob, bob], False), owner)
    assert [(e.args.account, e.args.allowed) for e in events(env.adapters, "AdapterAllowlistChanged", r)] == [
        (bob, False)]
    assert not reg.isAllowed(a, bob).call() and reg.isAllowed(a, alice).call()
    r = send(env.w3, reg.setPublic(a, False), owner)
    assert events(env.adapters, "AdapterAccessChanged", r) == ()

    # public again: everyone; the allowlist is kept and applies when it turns private once more
    r = send(env.w3, reg.setPublic(a, True), owner)
    assert events(env.adapters, "AdapterAccessChanged", r)[0].args.isPublic is True
    assert reg.isAllowed(a, bob).call() and reg.isPublic(a).call()
    send(env.w3, reg.setPublic(a, False), owner)
    assert reg.isAllowed(a, alice).call() and reg.isAllowed(a, carol).call() and not reg.isAllowed(a, bob).call()


def test_access_of_one_adapter_leaves_others_alone(env: ChainEnv) -> None:
    reg = env.adapters.functions
    owner, alice = env.users[3], env.users[4]
    a, b = _adapter(env, owner, 1), _adapter(env, owner, 2)
    send(env.w3, reg.setPublic(a, False), owner)
    send(env.w3, reg.setAllowed(a, [alice], True), owner)
    send(env.w3, reg.setPublic(b, False), owner)
    assert reg.isAllowed(a, alice).call() and not reg.isAllowed(b, alice).call()


def test_only_the_owner_changes_access(env: ChainEnv) -> None:
    reg = env.adapters.functions
    owner, other = env.users[3], env.users[4]
    a = _adapter(env, owner)
    expect_revert(env.w3, reg.setPublic(a, False), other, "AdapterNotOwner", a, other)
    expect_revert(env.w3, reg.setAllowed(a, [other], True), other, "AdapterNotOwner", a, other)
    expect_revert(env.w3, reg.setAllowed(a, [other], True), env.admin, "AdapterNotOwner", a, env.admin)
    expect_revert(env.w3, reg.setAllowed(a, [other, ZERO], True), owner, "AdapterZeroAccount", a)
    assert reg.isPublic(a).call() is True
    send(env.w3, reg.setPublic(a, False), owner)
    assert not reg.isAllowed(a, other).call()  # the reverted setAllowed added nobody


def test_unknown_adapter(env: ChainEnv) -> None:
    reg = env.adapters.functions
    owner = env.users[3]
    a = _adapter(env, owner)
    for bad in (0, a + 1):
        expect_revert(env.w3, reg.setPublic(bad, False), owner, "AdapterUnknown", bad)
        expect_revert(env.w3, reg.setAllowed(bad, [owner], True), owner, "AdapterUnknown", bad)
        for view in (reg.isPublic(bad), reg.isAllowed(bad, owner)):
            with pytest.raises(ContractLogicError) as info:
                view.call()
            decoded = DECODER.decode(info.value.data)
            assert (decoded.name, decoded.args) == ("AdapterUnknown", (bad,))


def test_access_gas(env: ChainEnv) -> None:
    reg = env.adapters.functions
    owner = env.users[3]
    a = _adapter(env, owner)
    private = int(send(env.w3, reg.setPublic(a, False), owner)["gasUsed"])
    one = int(send(env.w3, reg.setAllowed(a, [env.users[4]], True), owner)["gasUsed"])
    five = int(send(env.w3, reg.setAllowed(a, [f"0x{i:040x}" for i in range(1, 6)], True), owner)["gasUsed"])
    remove = int(send(env.w3, reg.setAllowed(a, [env.users[4]], False), owner)["gasUsed"])
    assert private <= SET_PUBLIC_MAX, private
    assert one <= SET_ALLOWED_ONE_MAX, one
    assert (five - one) / 4 <= SET_ALLOWED_PER_EXTRA_ACCOUNT_MAX, (one, five)
    assert remove <= REMOVE_ONE_MAX, remove
