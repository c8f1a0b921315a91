"""How the chain and ledger commands find what they act on: the options they share, the node config, the record
log, the deployment with its RPC endpoint, and the signing key.

    chain_options(p)                 --config, --records, --deployment, --rpc-url
    cfg = load_cfg(args)             the node config (TOML < env), with the deployment discovered
    open_log(args, cfg)              the record log: --records, else [records] postgres_dsn / path
    dep, w3 = chain_of(args, cfg)    the deployment and a Web3 on its chain (RPC from flag, env or config)
    signing_key(args, cfg)           --key-file, else [chain] key_file / key_env, else $LORALEDGER_PRIVATE_KEY
    reader(w3, dep)                  the contracts bound to a throw-away account, for reads
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment
from loraledger.node.chain.devnet_setup import read_deployment, web3_for
from loraledger.node.chain.keys import (
    PASSWORD_ENV,
    account_from_hex,
    load_account,
    load_keystore,
    read_password,
)
from loraledger.node.config import NodeConfig, load_config
from loraledger.node.errors import ConfigError
from loraledger.node.ledger.record_log import RecordLog


def chain_options(p: argparse.ArgumentParser) -> None:
    """The options every chain and ledger command takes to find its config, record log, deployment and RPC."""
    p.add_argument("--config", help="node config TOML (default: built-in defaults + env)")
    p.add_argument("--records", help="record log: SQLite path or postgresql:// DSN (default: from config)")
    p.add_argument("--deployment", help="deployment.json (default: $LORALEDGER_DEPLOYMENT, [chain] deployment, "
                                        "./deployment.json)")
    p.add_argument("--rpc-url", help="JSON-RPC endpoint (default: $LORALEDGER_CHAIN_RPC_URL / [chain] rpc_url)")


def load_cfg(args: argparse.Namespace) -> NodeConfig:
    return load_config(getattr(args, "config", None))


def open_log(args: argparse.Namespace, cfg: NodeConfig) -> RecordLog:
    target = args.records or cfg.records.postgres_dsn or cfg.records.path
    if target.startswith(("postgresql://", "postgres://")):
        return RecordLog.open(dsn=target)
    if not Path(target).exists():
        raise ConfigError(f"no record log at {target}; pass --records PATH (or set records.path in the config)")
    return RecordLog.open(target)


def chain_of(args: argparse.Namespace, cfg: NodeConfig) -> tuple[Deployment, Web3]:
    dep = read_deployment(args.deployment or cfg.chain.deployment)
    rpc = args.rpc_url or cfg.chain.rpc_url or str(dep.extra.get("rpcUrl", ""))
    if not rpc:
        raise ConfigError("no RPC endpoint: pass --rpc-url URL, or set $LORALEDGER_CHAIN_RPC_URL or [chain] rpc_url "
                          "(deployment.json never holds one for a public chain)")
    w3 = web3_for(rpc)
    if int(w3.eth.chain_id) != dep.chain_id:
        raise ConfigError(f"the RPC endpoint serves chain {w3.eth.chain_id}, but the deployment is for chain "
                          f"{dep.chain_id}; pass the matching --rpc-url or --deployment")
    return dep, w3


def signing_key(args: argparse.Namespace, cfg: NodeConfig) -> LocalAccount:
    key_file = getattr(args, "key_file", None) or cfg.chain.key_file or None
    if key_file:
        env = {PASSWORD_ENV: os.environ[cfg.chain.password_env]} if cfg.chain.password_env in os.environ else {}
        return load_keystore(key_file, read_password(password_file=getattr(args, "password_file", None), environ=env))
    if os.environ.get(cfg.chain.key_env):
        return account_from_hex(os.environ[cfg.chain.key_env], f"${cfg.chain.key_env}")
    return load_account()


def reader_account() -> LocalAccount:
    """A throw-away local account for read-only calls (no key needed to read the chain)."""
    acct: LocalAccount = Account.create()
    return acct


def reader(w3: Web3, dep: Deployment) -> Contracts:
    return Contracts.at(ChainClient(w3, reader_account()), dep.addresses)
