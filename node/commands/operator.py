"""`loraledger operator status` and `loraledger token mint`: the operator's funding.

    loraledger operator status [--address ADDR]     ETH, reward tokens, allowance, what the next epoch pulls, and
                                                    how many epochs the balances last at the current rate
    loraledger token mint --to ADDR --amount N       mint on the demo RewardToken (needs its MINTER_ROLE)

The deployment, RPC endpoint, record log and operator key are found as for `loraledger rewards`
(`--deployment`, `$LORALEDGER_DEPLOYMENT`, `[chain] deployment`, `./deployment.json`; `--rpc-url`,
`$LORALEDGER_CHAIN_RPC_URL`). Without the record log, `status` shows the balances alone.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.keys import load_account
from loraledger.node.commands.context import (
    chain_of,
    chain_options,
    load_cfg,
    open_log,
    reader_account,
    signing_key,
)
from loraledger.node.errors import ConfigError
from loraledger.node.ledger.funding import funding_report
from loraledger.node.types import as_address


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    op = subparsers.add_parser("operator", help="the operator's funding: ETH, tokens, what settling pulls")
    osub = op.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    st = osub.add_parser("status", help="ETH, reward tokens, allowance, next pull, epochs left")
    st.add_argument("--address", help="operator address (default: the operator key's, else the deployment's)")
    st.add_argument("--key-file", help="operator keystore, to name the operator (default: config / env)")
    st.add_argument("--password-file", help="file whose first line is the keystore password")
    chain_options(st)
    st.set_defaults(handler=_status)

    tok = subparsers.add_parser("token", help="the demo RewardToken: mint")
    tsub = tok.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    mint = tsub.add_parser("mint", help="mint reward tokens (the deployer of RewardToken holds MINTER_ROLE)")
    mint.add_argument("--to", required=True, help="recipient address (the operator, to fund its epochs)")
    mint.add_argument("--amount", required=True, type=int, help="amount in reward-token base units")
    mint.add_argument("--key-file", help="minter keystore (default: $LORALEDGER_PRIVATE_KEY)")
    mint.add_argument("--password-file", help="file whose first line is the keystore password")
    chain_options(mint)
    mint.set_defaults(handler=_mint)


def _status(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    if args.address:
        operator = as_address(args.address)
    else:
        try:
            operator = as_address(signing_key(args, cfg).address)
        except ConfigError:
            if not dep.operator:
                raise ConfigError("no operator: pass --address ADDR or the operator's --key-file") from None
            operator = as_address(dep.operator)
    contracts = Contracts.at(ChainClient(w3, reader_account()), dep.addresses)
    with ExitStack() as stack:
        try:
            log_ = stack.enter_context(open_log(args, cfg))
        except ConfigError as e:
            print(f"(no record log: {e}; balances only)")
            log_ = None
        report = funding_report(contracts, log_, operator)
    for line in report.lines():
        print(line)
    return 1 if report.eth_short or report.token_short else 0


def _mint(args: argparse.Namespace) -> int:
    cfg = load_cfg(args)
    dep, w3 = chain_of(args, cfg)
    if dep.external_token:
        raise ConfigError(f"this deployment pays in the external token {dep.address('RewardToken')}: mint or "
                          "transfer with that token's own tools")
    if args.amount <= 0:
        raise ConfigError(f"--amount must be > 0, got {args.amount}")
    to = as_address(args.to)
    minter = load_account(key_file=args.key_file, password_file=args.password_file)
    token = Contracts.at(ChainClient(w3, minter), dep.addresses).token
    res = token.mint(to, args.amount)
    print(f"minted {args.amount} to {to} (tx {res['tx_hash']}); balance now {token.balance_of(to)}")
    return 0
