"""loraledger.node.chain.keys: keystores, env keys, dev keys, and `loraledger key` (no secrets on argv)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3

from loraledger.node.chain.keys import (
    ANVIL_DEV_KEYS,
    PASSWORD_ENV,
    PRIVATE_KEY_ENV,
    account_from_hex,
    dev_account,
    load_account,
    load_keystore,
    write_keystore,
)
from loraledger.node.errors import SigningKeyError

FAST = {"kdf": "pbkdf2", "iterations": 2}  # a cheap KDF: these tests check the format, not its cost


def test_dev_keys_are_the_accounts_anvil_funds(w3: Web3) -> None:
    assert [dev_account(i).address for i in range(len(ANVIL_DEV_KEYS))] == w3.eth.accounts
    with pytest.raises(SigningKeyError, match="0..9"):
        dev_account(10)


def test_keystore_round_trip_and_mode(tmp_path: Path) -> None:
    acct = Account.create()
    path = write_keystore(tmp_path / "k.json", acct, "s3cret", **FAST)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["version"] == 3 and acct.key.hex() not in path.read_text()
    assert load_keystore(path, "s3cret").address == acct.address
    with pytest.raises(SigningKeyError, match="wrong password"):
        load_keystore(path, "nope")
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        write_keystore(path, acct, "other", **FAST)
    with pytest.raises(SigningKeyError, match="empty password"):
        write_keystore(tmp_path / "k2.json", acct, "", **FAST)


def test_load_account_sources(tmp_path: Path) -> None:
    acct = Account.create()
    path = write_keystore(tmp_path / "k.json", acct, "pw-from-env", **FAST)
    assert load_account(key_file=path, environ={PASSWORD_ENV: "pw-from-env"}).address == acct.address
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text("pw-from-env\nignored second line\n")
    assert load_account(key_file=path, password_file=pw_file, environ={}).address == acct.address
    with pytest.raises(SigningKeyError, match=PASSWORD_ENV):
        load_account(key_file=path, environ={})
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_account(key_file=tmp_path / "missing.json", environ={PASSWORD_ENV: "x"})
    assert load_account(environ={PRIVATE_KEY_ENV: ANVIL_DEV_KEYS[3]}).address == dev_account(3).address
    with pytest.raises(SigningKeyError, match="--key-file"):
        load_account(environ={})
    with pytest.raises(SigningKeyError, match="64 hex"):
        account_from_hex("0x1234")
    with pytest.raises(SigningKeyError, match="valid secp256k1"):
        account_from_hex("0x" + "00" * 32)


def test_cli_key_new_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from loraledger.node.cli import main

    out = tmp_path / "op.json"
    monkeypatch.setenv(PASSWORD_ENV, "cli-pw")
    assert main(["key", "new", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    address = load_keystore(out, "cli-pw").address
    assert address in printed
    assert main(["key", "show", "--key-file", str(out)]) == 0
    assert capsys.readouterr().out.strip() == address
    # a second `new` to the same file must not destroy the key
    assert main(["key", "new", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert load_keystore(out, "cli-pw").address == address
