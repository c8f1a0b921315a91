"""`loraledger deploy`: deploy the contract set to any EVM chain (a testnet) and write deployment.json.

The signing key comes from an encrypted keystore (`--key-file`, password from `$LORALEDGER_KEY_PASSWORD` or
`--password-file`) or from `$LORALEDGER_PRIVATE_KEY`; never from the command line.

    deployment.json          what contributors and nodes receive: chain id, addresses, parameters. Never the RPC
                             URL (it often carries an API key): nodes keep theirs in `[chain] rpc_url` or
                             `$LORALEDGER_CHAIN_RPC_URL`.
    deployment.journal.json  every step as it lands (beside --out), the `--mint-to` mints included; a re-run
                             with the same arguments after a failure resumes, without deploying or minting
                             again what landed.

The challenge delay defaults to one day (86400 s) on every chain but local dev chains (31337, 1337, where it is
0); 0 is refused elsewhere, since without a delay the guardian cannot stop a bad root.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from loraledger.node.chain.deploy import SAFE_CHALLENGE_DELAY, deploy_all
from loraledger.node.chain.devnet_setup import web3_for
from loraledger.node.chain.keys import PASSWORD_ENV, PRIVATE_KEY_ENV, load_account
from loraledger.node.errors import ConfigError

RPC_ENV = "LORALEDGER_CHAIN_RPC_URL"


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("deploy", help="deploy all contracts to an EVM chain and write deployment.json")
    p.add_argument("--rpc-url", default=os.environ.get(RPC_ENV),
                   help=f"JSON-RPC endpoint of the chain (default: ${RPC_ENV}); never written to --out")
    p.add_argument("--key-file", help=f"deployer keystore (password in ${PASSWORD_ENV} or --password-file); "
                                      f"without it the key is read from ${PRIVATE_KEY_ENV}")
    p.add_argument("--password-file", help="file whose first line is the keystore password")
    p.add_argument("--challenge-delay", type=int, default=None,
                   help=f"seconds before a rewards root takes effect (default: {SAFE_CHALLENGE_DELAY}, one day; 0 "
                        "on local dev chains 31337/1337, where alone 0 is allowed)")
    p.add_argument("--token", help="an existing ERC-20 to pay rewards in (default: deploy RewardToken)")
    p.add_argument("--operator", help="also grant OPERATOR_ROLE to this address")
    p.add_argument("--guardian", help="also grant GUARDIAN_ROLE to this address")
    p.add_argument("--mint-to", nargs=2, action="append", default=[], metavar=("ADDRESS", "AMOUNT"),
                   help="mint AMOUNT reward-token base units to ADDRESS (the deployed RewardToken only; repeatable)")
    p.add_argument("--out", default="deployment.json", help="where to write the record (default: %(default)s)")
    p.add_argument("--journal", help="deploy journal (default: beside --out, NAME.journal.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(handler=_deploy)


def journal_path(out: Path) -> Path:
    """deployment.json -> deployment.journal.json, beside it."""
    return out.with_name(out.stem + ".journal.json")


def _mints(args: argparse.Namespace) -> list[tuple[str, int]]:
    from eth_utils import is_address, to_checksum_address

    out: list[tuple[str, int]] = []
    for address, amount in args.mint_to:
        if not is_address(address):
            raise ConfigError(f"--mint-to: {address!r} is not an address")
        try:
            n = int(amount)
        except ValueError:
            raise ConfigError(f"--mint-to: amount {amount!r} is not an integer (reward-token base units)") from None
        if n <= 0:
            raise ConfigError(f"--mint-to: amount must be > 0, got {n}")
        out.append((to_checksum_address(address), n))
    if out and args.token:
        raise ConfigError("--mint-to mints on the RewardToken this command deploys; with --token, fund the "
                          "operator from that token's own supply")
    return out


def _deploy(args: argparse.Namespace) -> int:
    if not args.rpc_url:
        raise ConfigError(f"no RPC endpoint: pass --rpc-url URL or set ${RPC_ENV}")
    out = Path(args.out)
    journal = Path(args.journal) if args.journal else journal_path(out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it or choose another --out "
                          f"(with the journal {journal} in place, a re-run with the same arguments sends nothing)")
    mints = _mints(args)
    account = load_account(key_file=args.key_file, password_file=args.password_file)
    w3 = web3_for(args.rpc_url)
    chain_id = int(w3.eth.chain_id)
    print(f"deploying from {account.address} to chain {chain_id} ...", flush=True)
    dep = deploy_all(w3, account, challenge_delay=args.challenge_delay, token=args.token,
                     operator=args.operator, guardian=args.guardian, journal=journal, mint_to=mints)
    doc = json.loads(journal.read_text())
    for i, (address, amount) in enumerate(mints):
        print(f"  minted {amount} to {address} (tx {doc['steps'][f'mint:{i}']['tx']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(dep.to_json())
    tmp.replace(out)
    for name, addr in sorted(dep.addresses.items()):
        print(f"  {name:<20} {addr}")
    print(f"  {'challenge delay':<20} {dep.challenge_delay} s")
    print(f"wrote {out} (no RPC URL in it: keep yours in [chain] rpc_url or ${RPC_ENV}); journal {journal}")
    return 0
