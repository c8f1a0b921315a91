"""Datanets: signed contributions, validation, duplicates, the manifest and its root, registry and chain
checks."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from loraledger.inference.tiny import train_tokenizer
from loraledger.node.chain.bindings import Contracts
from loraledger.node.chain.client import ChainClient
from loraledger.node.chain.deploy import Deployment, deploy_all
from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.merkle import CONTRIBUTION_LEAF_ENCODING, StandardMerkleTree
from loraledger.node.lineage.contributions import (
    ContributionError,
    ContributionLimits,
    parse_records,
    read_signature,
    sign_contribution,
    signature_path,
    verify_contribution,
)
from loraledger.node.lineage.datanet import (
    FILES_DIR,
    DatanetError,
    DatanetMismatchError,
    EmptyDatanetError,
    TokenCounter,
    build_datanet,
    credited_records,
    load_manifest,
    register_datanet,
    verify_manifest,
    write_manifest,
)

ALICE, BOB, CAROL, MALLORY = (dev_account(i) for i in (2, 3, 4, 5))


def write_contribution(
    path: Path, records: list[dict[str, str]], account: LocalAccount | None, mtime_ns: int
) -> Path:
    """Write JSONL records, set the file's mtime (the credit order), sign it with `account` (if any)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))
    if account is not None:
        sign_contribution(path, account)
    return path


T0 = 1_700_000_000 * 10**9  # a fixed mtime; later files get T0 + k


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the tiny model's tokenizer.json (all a datanet needs to count tokens)."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(512).save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
    return out


def three_contributors(src: Path) -> None:
    """alice (oldest), bob (repeats one of alice's records), carol (a prompt/completion pair)."""
    write_contribution(
        src / "alice.jsonl",
        [{"text": "the cat sat on the mat"}, {"text": "rivers run to the sea"}],
        ALICE,
        T0,
    )
    write_contribution(
        src / "bob.jsonl", [{"text": "rivers run to the sea"}, {"text": "bob writes on"}], BOB, T0 + 1
    )
    write_contribution(
        src / "sub" / "carol.jsonl",
        [{"prompt": "Q: colour of the sky?", "completion": " blue"}],
        CAROL,
        T0 + 2,
    )


# ------------------------------------------------------------------------------------------- contributions


def test_signature_round_trip_and_message(tmp_path: Path) -> None:
    f = write_contribution(tmp_path / "a.jsonl", [{"text": "hello"}], ALICE, T0)
    sig = read_signature(signature_path(f))
    assert sig.contributor == ALICE.address
    assert verify_contribution(f.read_bytes(), sig, "a.jsonl") == ALICE.address
    # signing twice is refused unless forced
    with pytest.raises(ContributionError, match="already exists"):
        sign_contribution(f, ALICE)


def test_signed_by_wrong_key_is_refused(tmp_path: Path) -> None:
    f = write_contribution(tmp_path / "a.jsonl", [{"text": "credit me"}], MALLORY, T0)
    sig_path = signature_path(f)
    doc = json.loads(sig_path.read_text())
    doc["contributor"] = ALICE.address  # Mallory claims Alice's account with her own signature
    sig_path.write_text(json.dumps(doc))
    with pytest.raises(ContributionError, match=f"made by {MALLORY.address}, not by the claimed"):
        verify_contribution(f.read_bytes(), read_signature(sig_path), "a.jsonl")


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    f = write_contribution(tmp_path / "a.jsonl", [{"text": "original"}], ALICE, T0)
    f.write_text(json.dumps({"text": "changed"}) + "\n")
    with pytest.raises(ContributionError, match="changed after signing"):
        verify_contribution(f.read_bytes(), read_signature(signature_path(f)), "a.jsonl")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no records"),
        (b'{"text": "a"}\n\n{"text": "b"}\n', "line 2 is empty"),
        (b'{"text": "a", "extra": 1}\n', "has keys"),
        (b'{"prompt": "a"}\n', "has keys"),
        (b'{"text": ""}\n', "non-empty string"),
        (b'{"text": 3}\n', "non-empty string"),
        (b'["text"]\n', "not a JSON object"),
        (b'{"text": "ok"}\n{"text": "\xff"}\n', "line 2 is not valid UTF-8"),
        (b'{"text": "a\xe2\x80\xa8b"}\n', "line separator"),
        (b'{"text": "' + b"x" * 200 + b'"}\n', "longer than 100 bytes"),
    ],
)
def test_parse_records_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ContributionError, match=reason):
        parse_records(data, "f.jsonl", ContributionLimits(max_record_bytes=100))


def test_parse_records_accepts_both_schemas_and_crlf() -> None:
    recs = parse_records(b'{"text": "a"}\r\n{"prompt": "p", "completion": "c"}', "f.jsonl")
    assert [(r.prompt, r.completion) for r in recs] == [("", "a"), ("p", "c")]


# -------------------------------------------------------------------------------------------------- build


def test_build_credits_duplicates_to_the_earlier_contribution(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = tmp_path / "src"
    three_contributors(src)
    m = build_datanet("demo", src, tmp_path / "dn", tokenizer_dir)
    assert [e.contributor for e in m.entries] == [ALICE.address, BOB.address, CAROL.address]
    assert m.rejected == []
    tok = TokenCounter(tokenizer_dir)
    alice, bob, carol = m.entries
    # alice keeps "rivers run to the sea"; bob's copy (line 1) is dropped from bob's weight
    assert alice.duplicate_lines == () and bob.duplicate_lines == (1,)
    assert alice.weight == len(tok.encode("the cat sat on the mat")) + len(
        tok.encode("rivers run to the sea")
    )
    assert bob.weight == len(tok.encode("bob writes on"))
    assert carol.weight == len(tok.encode("Q: colour of the sky?")) + len(tok.encode(" blue"))
    assert m.weight_unit == "tokens" and m.tokenizer_sha256 == tok.sha256
    # the root is the StandardMerkleTree root over (contributor, sha256(file), weight)
    leaves = [
        [e.contributor, "0x" + hashlib.sha256((src / e.file).read_bytes()).hexdigest(), e.weight]
        for e in m.entries
    ]
    assert m.root == StandardMerkleTree.of(leaves, CONTRIBUTION_LEAF_ENCODING).root_hex
    # copies and signatures sit in the manifest dir; the manifest reloads identically
    assert (tmp_path / "dn" / FILES_DIR / "sub" / "carol.jsonl").read_bytes() == (
        src / "sub/carol.jsonl"
    ).read_bytes()
    assert signature_path(tmp_path / "dn" / FILES_DIR / "bob.jsonl").is_file()
    assert load_manifest(tmp_path / "dn").to_dict() == m.to_dict()
    assert verify_manifest(tmp_path / "dn", tokenizer_dir=tokenizer_dir).root == m.root
    credited = [(a, r.completion) for a, r in credited_records(tmp_path / "dn")]
    assert credited == [
        (ALICE.address, "the cat sat on the mat"),
        (ALICE.address, "rivers run to the sea"),
        (BOB.address, "bob writes on"),
        (CAROL.address, " blue"),
    ]


def test_credit_order_follows_mtime_not_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_contribution(src / "a_late.jsonl", [{"text": "same words"}, {"text": "a's own"}], ALICE, T0 + 5)
    write_contribution(src / "z_early.jsonl", [{"text": "same words"}], BOB, T0)
    m = build_datanet("order", src, tmp_path / "dn")
    assert [e.file for e in m.entries] == ["z_early.jsonl", "a_late.jsonl"]
    assert m.entries[1].duplicate_lines == (1,)
    assert m.weight_unit == "utf8_bytes" and m.entries[1].weight == len("a's own")


def test_bad_files_listed_with_reason_and_the_rest_built(tmp_path: Path) -> None:
    src = tmp_path / "src"
    three_contributors(src)
    write_contribution(src / "unsigned.jsonl", [{"text": "nobody signed"}], None, T0)
    forged = write_contribution(src / "forged.jsonl", [{"text": "forged"}], MALLORY, T0)
    doc = json.loads(signature_path(forged).read_text())
    doc["contributor"] = ALICE.address
    signature_path(forged).write_text(json.dumps(doc))
    tampered = write_contribution(src / "tampered.jsonl", [{"text": "before"}], BOB, T0)
    tampered.write_text(json.dumps({"text": "after"}) + "\n")
    write_contribution(src / "copycat.jsonl", [{"text": "the cat sat on the mat"}], MALLORY, T0 + 9)
    (src / "notes.txt").write_text("hi")
    m = build_datanet("mixed", src, tmp_path / "dn")
    reasons = {r.file: r.reason for r in m.rejected}
    assert set(reasons) == {"unsigned.jsonl", "forged.jsonl", "tampered.jsonl", "copycat.jsonl", "notes.txt"}
    assert "no signature file" in reasons["unsigned.jsonl"]
    assert "not by the claimed contributor" in reasons["forged.jsonl"]
    assert "changed after signing" in reasons["tampered.jsonl"]
    assert "duplicates an earlier contribution" in reasons["copycat.jsonl"]
    assert [e.contributor for e in m.entries] == [ALICE.address, BOB.address, CAROL.address]
    assert not (tmp_path / "dn" / FILES_DIR / "forged.jsonl").exists()


def test_empty_datanet_is_refused_and_nothing_written(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(EmptyDatanetError, match="no files"):
        build_datanet("empty", src, tmp_path / "dn")
    write_contribution(src / "bad.jsonl", [{"text": "x"}], None, T0)
    with pytest.raises(EmptyDatanetError, match="bad.jsonl: no signature file"):
        build_datanet("empty", src, tmp_path / "dn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out dir, no temp dir left


def test_existing_out_dir_is_not_overwritten(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_contribution(src / "a.jsonl", [{"text": "x"}], ALICE, T0)
    build_datanet("one", src, tmp_path / "dn")
    with pytest.raises(DatanetError, match="already exists"):
        build_datanet("two", src, tmp_path / "dn")
    assert build_datanet("two", src, tmp_path / "dn", overwrite=True).name == "two"
    assert load_manifest(tmp_path / "dn").name == "two"


def test_verify_manifest_detects_edits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    three_contributors(src)
    dn = tmp_path / "dn"
    m = build_datanet("demo", src, dn)
    # a weight raised in the manifest: recomputed bytes weights disagree
    d = json.loads((dn / "manifest.json").read_text())
    d["entries"][1]["weight"] += 1
    (dn / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DatanetMismatchError, match="recomputed weight"):
        verify_manifest(dn)
    # a root that is not the leaves' root
    write_manifest(dn, m)
    d = json.loads((dn / "manifest.json").read_text())
    d["root"] = "0x" + "11" * 32
    (dn / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DatanetMismatchError, match="root of the manifest's leaves"):
        verify_manifest(dn)
    # a copied file changed
    write_manifest(dn, m)
    (dn / FILES_DIR / "bob.jsonl").write_text(json.dumps({"text": "edited"}) + "\n")
    with pytest.raises(DatanetMismatchError, match="the file was changed"):
        verify_manifest(dn)


# ---------------------------------------------------------------------------------------------- on chain


@pytest.fixture(scope="module")
def deployment(w3: Web3) -> Deployment:
    return deploy_all(w3, dev_account(0))


@pytest.fixture
def curator(w3: Web3, deployment: Deployment, chain_snapshot: str) -> Iterator[Contracts]:
    yield Contracts.at(ChainClient(w3, dev_account(1)), deployment.addresses)


def _as(w3: Web3, deployment: Deployment, account: LocalAccount) -> Contracts:
    return Contracts.at(ChainClient(w3, account), deployment.addresses)


def test_registry_refuses_unregistered_and_suspended(
    tmp_path: Path, w3: Web3, deployment: Deployment, curator: Contracts
) -> None:
    src = tmp_path / "src"
    three_contributors(src)
    for acct in (ALICE, BOB):
        _as(w3, deployment, acct).contributors.register(f"ipfs://{acct.address}")
    _as(w3, deployment, dev_account(0)).contributors.suspend(BOB.address)
    m = build_datanet("gated", src, tmp_path / "dn", registry=curator.contributors)
    reasons = {r.file: r.reason for r in m.rejected}
    assert "suspended" in reasons["bob.jsonl"]
    assert "not registered" in reasons["sub/carol.jsonl"]
    assert [e.contributor for e in m.entries] == [ALICE.address]
    # alice's record that bob repeated is not affected; bob holds no credit
    assert m.entries[0].duplicate_lines == ()


def test_register_and_detect_root_differing_from_chain(
    tmp_path: Path, w3: Web3, deployment: Deployment, curator: Contracts
) -> None:
    src1, src2 = tmp_path / "s1", tmp_path / "s2"
    three_contributors(src1)
    write_contribution(src2 / "other.jsonl", [{"text": "another datanet"}], ALICE, T0)
    dn1 = tmp_path / "dn1"
    dn2 = tmp_path / "dn2"
    build_datanet("one", src1, dn1)
    build_datanet("two", src2, dn2)
    with pytest.raises(DatanetError, match="not registered or are suspended"):
        register_datanet(dn1, curator)  # built offline from contributors the registry does not know
    assert load_manifest(dn1).registration is None
    for acct in (ALICE, BOB, CAROL):
        _as(w3, deployment, acct).contributors.register("")
    reg1 = register_datanet(dn1, curator)
    assert load_manifest(dn1).registration == reg1
    assert reg1.chain_id == w3.eth.chain_id and reg1.uri.startswith("file://")
    assert verify_manifest(dn1, curator).datanet_id == reg1.datanet_id
    with pytest.raises(DatanetError, match="already registered"):
        register_datanet(dn1, curator)
    # a manifest that claims datanet 1's registration although its root differs
    m2 = load_manifest(dn2)
    m2.registration = reg1
    write_manifest(dn2, m2)
    with pytest.raises(
        DatanetMismatchError, match=f"datanet {reg1.datanet_id} has root .* on chain, the manifest"
    ):
        verify_manifest(dn2, curator)
    # an unregistered manifest cannot be checked against the chain
    m2.registration = None
    write_manifest(dn2, m2)
    with pytest.raises(DatanetMismatchError, match="not registered"):
        verify_manifest(dn2, curator)
