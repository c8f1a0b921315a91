"""`loraledger key new|show`: create an encrypted keystore, print a keystore's address.

Passwords come from `$LORALEDGER_KEY_PASSWORD`, `--password-file`, or an interactive prompt; never from argv.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from loraledger.node.chain.keys import PASSWORD_ENV, load_account, new_keystore, read_password
from loraledger.node.errors import SigningKeyError


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("key", help="signing keys: create or inspect an encrypted keystore")
    sub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    new = sub.add_parser("new", help="create a random account and write its encrypted keystore")
    new.add_argument("--out", required=True, help="keystore file to write (refuses to overwrite)")
    new.add_argument("--password-file", help=f"file whose first line is the password (else ${PASSWORD_ENV}, "
                                             "else a prompt)")
    new.set_defaults(handler=_new)

    show = sub.add_parser("show", help="print the address of a keystore (or of $LORALEDGER_PRIVATE_KEY)")
    show.add_argument("--key-file", help="keystore file (password from env or --password-file)")
    show.add_argument("--password-file", help="file whose first line is the password")
    show.set_defaults(handler=_show)


def _password_for_new(password_file: str | None) -> str:
    try:
        return read_password(password_file=password_file)
    except SigningKeyError:
        if not sys.stdin.isatty():
            raise
    first = getpass.getpass("new keystore password: ")
    if first != getpass.getpass("repeat password: "):
        raise SigningKeyError("passwords differ; nothing written")
    return first


def _new(args: argparse.Namespace) -> int:
    account = new_keystore(args.out, _password_for_new(args.password_file))
    print(f"wrote keystore {args.out} for address {account.address}")
    return 0


def _show(args: argparse.Namespace) -> int:
    account = load_account(key_file=args.key_file, password_file=args.password_file)
    print(account.address)
    return 0
