"""RewardToken on a real anvil: metadata, minting by role, transfers, and the errors."""

from __future__ import annotations

import pytest
from web3.exceptions import ContractLogicError

from loraledger.node.chain.artifacts import load_artifact
from tests.contracts.helpers import DECODER, ChainEnv, events, expect_revert, send


def test_metadata_and_roles(env: ChainEnv) -> None:
    tok = env.token.functions
    assert (tok.name().call(), tok.symbol().call(), tok.decimals().call()) == ("LoraLedger Reward", "LLR", 18)
    assert tok.hasRole(tok.MINTER_ROLE().call(), env.admin).call()
    assert tok.hasRole(tok.DEFAULT_ADMIN_ROLE().call(), env.admin).call()
    assert not tok.hasRole(tok.MINTER_ROLE().call(), env.operator).call()


def test_mint_by_minter_and_transfer(env: ChainEnv) -> None:
    tok = env.token.functions
    a, b = env.users[:2]
    supply = tok.totalSupply().call()
    r = send(env.w3, tok.mint(a, 500), env.admin)
    (ev,) = events(env.token, "Transfer", r)
    assert (ev.args["from"], ev.args.to, ev.args.value) == ("0x" + "00" * 20, a, 500)
    assert tok.balanceOf(a).call() == 500 and tok.totalSupply().call() == supply + 500
    send(env.w3, tok.transfer(b, 200), a)
    assert (tok.balanceOf(a).call(), tok.balanceOf(b).call()) == (300, 200)
    # a newly granted minter can mint
    send(env.w3, tok.grantRole(tok.MINTER_ROLE().call(), b), env.admin)
    send(env.w3, tok.mint(b, 1), b)
    assert tok.balanceOf(b).call() == 201


def test_mint_and_transfer_errors(env: ChainEnv) -> None:
    tok = env.token.functions
    a, b = env.users[:2]
    supply = tok.totalSupply().call()
    expect_revert(env.w3, tok.mint(a, 1), a, "AccessControlUnauthorizedAccount", a, tok.MINTER_ROLE().call())
    expect_revert(env.w3, tok.mint("0x" + "00" * 20, 1), env.admin, "ERC20InvalidReceiver", "0x" + "00" * 20)
    expect_revert(env.w3, tok.transfer(b, 1), a, "ERC20InsufficientBalance", a, 0, 1)
    assert tok.totalSupply().call() == supply and tok.balanceOf(a).call() == 0


def test_constructor_rejects_zero_admin(env: ChainEnv) -> None:
    art = load_artifact("RewardToken")
    factory = env.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    data = factory.constructor("T", "T", "0x" + "00" * 20).data_in_transaction
    with pytest.raises(ContractLogicError) as info:
        env.w3.eth.call({"from": env.admin, "data": data})
    assert DECODER.decode(info.value.data).name == "RewardTokenZeroAdmin"
