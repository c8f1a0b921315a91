"""`loraledger deploy`: deploy the contract set to any EVM chain (a testnet) and write deployment.json.

The signing key comes from an encrypted keystore (`--key-file`, password from `$LORALEDGER_KEY_PASSWORD` or
`--password-file`) or from `$LORALEDGER_PRIVATE_KEY`; never from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loraledger.node.chain.deploy import deploy_all
from loraledger.node.chain.devnet_setup import web3_for
from loraledger.node.chain.keys import PASSWORD_ENV, PRIVATE_KEY_ENV, load_account
from loraledger.node.errors import ConfigError


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("deploy", help="deploy all contracts to an EVM chain and write deployment.json")
    p.add_argument("--rpc-url", required=True, help="JSON-RPC endpoint of the chain")
    p.add_argument("--key-file", help=f"deployer keystore (password in ${PASSWORD_ENV} or --password-file); "
                                      f"without it the key is read from ${PRIVATE_KEY_ENV}")
    p.add_argument("--password-file", help="file whose first line is the keystore password")
    p.add_argument("--challenge-delay", type=int, default=0,
                   help="seconds before a rewards root takes effect (default: %(default)s)")
    p.add_argument("--token", help="an existing ERC-20 to pay rewards in (default: deploy RewardToken)")
    p.add_argument("--operator", help="also grant OPERATOR_ROLE to this address")
    p.add_argument("--guardian", help="also grant GUARDIAN_ROLE to this address")
    p.add_argument("--out", default="deployment.json", help="where to write the record (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(handler=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    account = load_account(key_file=args.key_file, password_file=args.password_file)
    w3 = web3_for(args.rpc_url)
    print(f"deploying from {account.address} to chain {w3.eth.chain_id} at {args.rpc_url} ...", flush=True)
    dep = deploy_all(w3, account, challenge_delay=args.challenge_delay, token=args.token,
                     operator=args.operator, guardian=args.guardian)
    dep = dataclasses.replace(dep, extra={**dep.extra, "rpcUrl": args.rpc_url})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dep.to_json())
    for name, addr in sorted(dep.addresses.items()):
        print(f"  {name:<20} {addr}")
    print(f"wrote {out}")
    return 0
