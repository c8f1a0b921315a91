"""`loraledger apikey create|list|revoke`: the API keys a node accepts (`[auth] keys_file`).

    loraledger apikey create --name app1 --scope infer [--account 0x…] [--rpm 600] [--tpm 200000]
    loraledger apikey list
    loraledger apikey revoke app1          # refused by a running node from its next request on

The key is printed once, by `create`; the file keeps only its sha256 (see loraledger.node.serving.auth).
"""

from __future__ import annotations

import argparse
import time

from loraledger.node.serving.auth import SCOPES, KeyStore


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("apikey", help="API keys of a node: create, list, revoke")
    sub = p.add_subparsers(dest="apikey_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="node.toml whose [auth] keys_file to use")
        q.add_argument("--keys-file", help="the keys file itself (default: [auth] keys_file)")

    create = sub.add_parser("create", help="make a key and print it once")
    create.add_argument("--name", required=True, help="a name to list and revoke it by")
    create.add_argument("--scope", required=True, choices=SCOPES, help="infer: generation and reads; admin: also "
                                                                     "LoadAdapter / UnloadAdapter")
    create.add_argument("--account", default="", help="client account that records made with this key name")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = unlimited)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute (0 = unlimited)")
    common(create)
    create.set_defaults(handler=_create)
    listing = sub.add_parser("list", help="the keys (names, scopes, limits; never the keys themselves)")
    common(listing)
    listing.set_defaults(handler=_list)
    revoke = sub.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name", metavar="NAME")
    common(revoke)
    revoke.set_defaults(handler=_revoke)


def _store(args: argparse.Namespace) -> KeyStore:
    if args.keys_file:
        return KeyStore(args.keys_file)
    from loraledger.node.config import load_config

    return KeyStore(load_config(args.config).auth.keys_file)


def _create(args: argparse.Namespace) -> int:
    store = _store(args)
    secret, key = store.create(args.name, args.scope, args.account, args.rpm, args.tpm)
    print(secret)
    print(f"# key {key.name!r} (scope {key.scope}) written to {store.path}; this is the only time it is shown",
          flush=True)
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    keys = store.keys()
    if not keys:
        print(f"no keys in {store.path}")
    for k in keys:
        state = "active" if k.revoked_at is None else "revoked " + time.strftime("%Y-%m-%d %H:%M",
                                                                                time.gmtime(k.revoked_at))
        print(f"{k.name}\t{k.scope}\t{state}\taccount={k.account or '-'}\trpm={k.rpm or '-'}\ttpm={k.tpm or '-'}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    key = _store(args).revoke(args.name)
    print(f"revoked {key.name!r}")
    return 0
