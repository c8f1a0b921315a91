"""Signing keys: encrypted keystore files (eth-account, Web3 Secret Storage v3), a hex key in an env var, and
anvil's well-known dev keys for the local devnet.

Secrets never come from command-line arguments (they would show in `ps` and shell history): a keystore's
password comes from an env var or a password file, a raw key from an env var.

    load_account(key_file="op.json")              # password from $LORALEDGER_KEY_PASSWORD
    load_account(key_file="op.json", password_file="pw.txt")
    load_account()                                # raw hex key from $LORALEDGER_PRIVATE_KEY
    dev_account(1)                                # anvil account 1 (the devnet's node operator)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from eth_account import Account
from eth_account.signers.local import LocalAccount

from loraledger.node.errors import SigningKeyError

PASSWORD_ENV = "LORALEDGER_KEY_PASSWORD"
PRIVATE_KEY_ENV = "LORALEDGER_PRIVATE_KEY"

# The ten accounts anvil funds by default (mnemonic "test test test test test test test test test test test
# junk", path m/44'/60'/0'/0/i). Public knowledge: for the local devnet only, never for real funds.
ANVIL_DEV_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)

# Roles of the dev accounts on the devnet.
DEV_DEPLOYER = 0  # deployer and admin of every contract
DEV_OPERATOR = 1  # the node's account: operator role, funded with reward tokens
DEV_CONTRIBUTORS = (2, 3, 4)  # the demo's data contributors


def dev_account(index: int) -> LocalAccount:
    """Anvil's dev account `index` (0..9)."""
    if not 0 <= index < len(ANVIL_DEV_KEYS):
        raise SigningKeyError(f"anvil has dev accounts 0..{len(ANVIL_DEV_KEYS) - 1}, not {index}")
    return Account.from_key(ANVIL_DEV_KEYS[index])


def account_from_hex(key: str, source: str = "key") -> LocalAccount:
    """A LocalAccount from `0x` + 64 hex (the `0x` optional); SigningKeyError naming `source` if malformed."""
    text = key.strip()
    if text.startswith(("0x", "0X")):
        text = text[2:]
    if len(text) != 64:
        raise SigningKeyError(f"{source} is not a private key (expected 64 hex digits, got {len(text)} characters)")
    try:
        return Account.from_key(bytes.fromhex(text))
    except ValueError as e:
        raise SigningKeyError(f"{source} is not a valid secp256k1 private key: {e}") from e


def read_password(
    *, password_file: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The keystore password: first line of `password_file` if given, else `$LORALEDGER_KEY_PASSWORD`."""
    env = os.environ if environ is None else environ
    if password_file is not None:
        path = Path(password_file)
        if not path.is_file():
            raise SigningKeyError(f"password file {path} does not exist")
        lines = path.read_text().splitlines()
        return lines[0] if lines else ""
    if PASSWORD_ENV in env:
        return env[PASSWORD_ENV]
    raise SigningKeyError(
        f"no keystore password: set ${PASSWORD_ENV} or pass --password-file (passwords are never read from argv)"
    )


def load_keystore(path: str | os.PathLike[str], password: str) -> LocalAccount:
    """Decrypt a Web3 Secret Storage (v3) keystore file; SigningKeyError on a missing file or wrong password."""
    p = Path(path)
    if not p.is_file():
        raise SigningKeyError(f"keystore file {p} does not exist; create one with `loraledger key new --out {p}`")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SigningKeyError(f"keystore file {p} is not JSON: {e}") from e
    try:
        key = Account.decrypt(doc, password)
    except ValueError as e:
        raise SigningKeyError(f"cannot decrypt keystore {p}: wrong password or corrupted file ({e})") from e
    return Account.from_key(key)


def load_account(
    *,
    key_file: str | os.PathLike[str] | None = None,
    password_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LocalAccount:
    """The signing account: `key_file` keystore (password per `read_password`), else `$LORALEDGER_PRIVATE_KEY`.

    Raises SigningKeyError saying which of the two to provide when neither is there.
    """
    env = os.environ if environ is None else environ
    if key_file is not None:
        return load_keystore(key_file, read_password(password_file=password_file, environ=env))
    if env.get(PRIVATE_KEY_ENV):
        return account_from_hex(env[PRIVATE_KEY_ENV], f"${PRIVATE_KEY_ENV}")
    raise SigningKeyError(f"no signing key: pass --key-file KEYSTORE (password in ${PASSWORD_ENV} or --password-file) "
                    f"or set ${PRIVATE_KEY_ENV}")


def write_keystore(
    path: str | os.PathLike[str],
    account: LocalAccount,
    password: str,
    *,
    kdf: Literal["scrypt", "pbkdf2"] = "scrypt",
    iterations: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Encrypt `account`'s key with `password` into a v3 keystore at `path` (mode 0600).

    kdf "scrypt" (default, eth-account's cost) or "pbkdf2"; `iterations` lowers the cost (tests only).
    Refuses to replace an existing file unless `overwrite`, since that could destroy the only copy of a key.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise SigningKeyError(f"{p} already exists; refusing to overwrite a keystore (move it away first)")
    if not password:
        raise SigningKeyError("refusing to write a keystore with an empty password")
    doc = Account.encrypt(account.key, password, kdf=kdf, iterations=iterations)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return p


def new_keystore(path: str | os.PathLike[str], password: str, **kwargs: object) -> LocalAccount:
    """Create a fresh random account, write its keystore to `path` (see `write_keystore`), return it."""
    account: LocalAccount = Account.create()
    write_keystore(path, account, password, **kwargs)  # type: ignore[arg-type]
    return account
