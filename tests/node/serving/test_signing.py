"""loraledger.node.serving.signing: the request hash, EIP-712 client signatures and their verification."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from loraledger.inference.errors import InvalidRequestError
from loraledger.node.chain.keys import dev_account
from loraledger.node.commands.serve import signing_target
from loraledger.node.errors import AuthenticationError, ConfigError, SignatureError
from loraledger.node.serving.signing import (
    SignatureVerifier,
    canonical_request,
    proto_request_hash,
    request_hash,
    sign_fields,
    sign_proto_request,
    sign_request,
    typed_data,
)
from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb

CHAIN_ID = 31337
NOW = 1_700_000_000
CLIENT = dev_account(5)
OTHER = dev_account(6)
OPERATOR = dev_account(1).address
OTHER_OPERATOR = dev_account(2).address
HASH = request_hash("Hello", [("7", 0.7), ("law", 0.3)], max_tokens=32)

# The documented test vector (module docstring): a third-party implementation must reproduce these bytes.
VECTOR_JSON = b'{"adapters":[["7",0.7],["law",0.3]],"input":"Hello","max_tokens":32}'
VECTOR_HASH = "0xb91d88b942eff09aba4f6bb3cf59406168a96c587e8a7993eff2f404c63d441a"


def verifier(**kwargs: object) -> SignatureVerifier:
    return SignatureVerifier(CHAIN_ID, OPERATOR, **kwargs)  # type: ignore[arg-type]


def signed(deadline: int = NOW + 120, account: object = CLIENT, chain_id: int = CHAIN_ID,
           operator: str = OPERATOR, digest: str = HASH) -> str:
    return sign_request(account, digest, deadline, chain_id, operator)  # type: ignore[arg-type]


# ---- the request hash ----------------------------------------------------------------------------------------


def test_request_hash_is_the_documented_vector() -> None:
    assert canonical_request("Hello", [("7", 0.7), ("law", 0.3)], max_tokens=32) == VECTOR_JSON
    assert HASH == VECTOR_HASH == "0x" + hashlib.sha256(VECTOR_JSON).hexdigest()
    assert request_hash("Hello", [["7", 0.7], ["law", 0.3]], max_tokens=32) == VECTOR_HASH  # lists as pairs


def test_request_hash_covers_input_adapters_and_max_tokens() -> None:
    base = request_hash("Hello", [("7", 1.0)], max_tokens=0)
    assert request_hash("Hello", [("7", 1)], max_tokens=0) == base  # 1.0 and 1 are the same JSON number
    assert request_hash("Hello", [("7", 0.0)], max_tokens=0) != base  # weights exactly as sent
    assert request_hash("Hello!", [("7", 1.0)], max_tokens=0) != base
    assert request_hash("Hello", [("8", 1.0)], max_tokens=0) != base
    assert request_hash("Hello", [("7", 1.0)], max_tokens=16) != base
    assert request_hash("Hello", [], max_tokens=0) != base
    two = [("7", 0.5), ("8", 0.5)]
    assert request_hash("Hello", two, max_tokens=0) != request_hash("Hello", two[::-1], max_tokens=0)  # order kept


def test_chat_and_prompt_inputs_hash_differently() -> None:
    chat = [("user", "Hello")]
    assert canonical_request(chat, [], max_tokens=0) == b'{"adapters":[],"input":[["user","Hello"]],"max_tokens":0}'
    assert request_hash(chat, [], max_tokens=0) != request_hash("Hello", [], max_tokens=0)
    assert request_hash([("system", "be brief"), ("user", "Hello")], [], max_tokens=0) != \
        request_hash(chat, [], max_tokens=0)
    assert canonical_request([1, 2, 3], [], max_tokens=0) == b'{"adapters":[],"input":[1,2,3],"max_tokens":0}'


@pytest.mark.parametrize(("number", "text"), [  # RFC 8785 appendix B and ECMAScript Number::toString
    (0.0, "0"), (-0.0, "0"), (1.0, "1"), (0.7, "0.7"), (4.5, "4.5"), (0.002, "0.002"), (1e-6, "0.000001"),
    (1e-7, "1e-7"), (-1.5e-7, "-1.5e-7"), (1e20, "100000000000000000000"), (1e21, "1e+21"),
    (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    (9.999999999999997e20, "999999999999999700000"), (333333333.3333333, "333333333.3333333"),
])
def test_weights_are_written_as_javascript_numbers(number: float, text: str) -> None:
    assert canonical_request("", [("a", number)], max_tokens=0) == \
        f'{{"adapters":[["a",{text}]],"input":"","max_tokens":0}}'.encode()


def test_strings_are_escaped_as_json_stringify_does() -> None:
    got = canonical_request('q"\\\n\t\x01é€😀/', [], max_tokens=0)
    assert got == '{"adapters":[],"input":"q\\"\\\\\\n\\t\\u0001é€😀/","max_tokens":0}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "0.5"])
def test_a_weight_json_cannot_carry_exactly_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        request_hash("Hello", [("7", bad)], max_tokens=0)  # type: ignore[list-item]


@pytest.mark.skipif(shutil.which("node") is None, reason="node (JavaScript) is not installed")
def test_javascript_json_stringify_gives_the_same_hash(tmp_path: Path) -> None:
    cases = [("Hello", [["7", 0.7], ["law", 0.3]], 32), ([["user", 'q"\\\n\x01é😀']], [["a", 1e-7]], 0),
             ([5, 6], [["x", 1.0]], 7)]
    script = tmp_path / "h.js"
    script.write_text(
        "const c = require('crypto'); const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "for (const [input, adapters, max_tokens] of cases) console.log('0x' + c.createHash('sha256')"
        ".update(JSON.stringify({adapters, input, max_tokens}), 'utf8').digest('hex'));\n")
    out = subprocess.run(["node", str(script)], input=json.dumps(cases), capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    assert out == [request_hash(i, a, max_tokens=m) for i, a, m in cases]  # type: ignore[arg-type]


def test_proto_request_hash_follows_the_grpc_row() -> None:
    request = pb.GenerateRequest(prompt="Hello", adapters=[pb.AdapterRef(adapter="7", weight=0.7),
                                                           pb.AdapterRef(adapter="law", weight=0.3)],
                                 sampling=pb.SamplingParams(max_tokens=32, temperature=0.5))
    assert proto_request_hash(request) == VECTOR_HASH
    chat = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hello")]))
    assert proto_request_hash(chat) == request_hash([("user", "Hello")], [], max_tokens=0)


# ---- typed data and verification -----------------------------------------------------------------------------


def test_typed_data_is_the_documented_structure() -> None:
    doc = typed_data(HASH, CLIENT.address, NOW, CHAIN_ID, OPERATOR)
    assert doc["domain"] == {"name": "loraledger", "version": "1", "chainId": CHAIN_ID}
    assert doc["primaryType"] == "Request"
    assert [(f["name"], f["type"]) for f in doc["types"]["Request"]] == [
        ("requestHash", "bytes32"), ("account", "address"), ("operator", "address"), ("deadline", "uint64")]
    # what a wallet's eth_signTypedData_v4 returns for this document verifies
    wallet_sig = Account.sign_message(encode_typed_data(full_message=doc), CLIENT.key).signature
    assert verifier().verify(HASH, CLIENT.address, NOW, "0x" + bytes(wallet_sig).hex(), now=NOW) == CLIENT.address


def test_round_trip() -> None:
    v = verifier()
    got = v.verify(HASH, CLIENT.address.lower(), NOW + 120, signed(), now=NOW)
    assert got == CLIENT.address  # checksummed, whatever case was sent
    fresh = Account.create()
    assert v.verify(HASH, fresh.address, NOW + 60, signed(NOW + 60, fresh), now=NOW) == fresh.address


def test_wrong_account_is_refused() -> None:
    with pytest.raises(SignatureError, match="not client_account") as e:
        verifier().verify(HASH, OTHER.address, NOW + 120, signed(), now=NOW)
    assert e.value.reason == "mismatch"
    assert isinstance(e.value, AuthenticationError)  # UNAUTHENTICATED / 401 through status.py's table


def test_another_request_is_refused() -> None:
    other = request_hash("Hello", [("7", 1.0)], max_tokens=32)
    with pytest.raises(SignatureError, match="changed since") as e:
        verifier().verify(other, CLIENT.address, NOW + 120, signed(), now=NOW)
    assert e.value.reason == "mismatch"


def test_expired_is_refused() -> None:
    with pytest.raises(SignatureError, match="expired at") as e:
        verifier().verify(HASH, CLIENT.address, NOW - 1, signed(NOW - 1), now=NOW)
    assert e.value.reason == "expired"
    assert verifier().verify(HASH, CLIENT.address, NOW, signed(NOW), now=NOW)  # valid up to its deadline


def test_deadline_too_far_ahead_is_refused() -> None:
    with pytest.raises(SignatureError, match="at most 300 s") as e:
        verifier().verify(HASH, CLIENT.address, NOW + 301, signed(NOW + 301), now=NOW)
    assert e.value.reason == "too_far"
    with pytest.raises(SignatureError, match="at most 60 s"):
        verifier(max_ttl_s=60).verify(HASH, CLIENT.address, NOW + 120, signed(), now=NOW)


def test_signature_for_another_chain_is_refused() -> None:
    with pytest.raises(SignatureError, match="another chain") as e:
        verifier().verify(HASH, CLIENT.address, NOW + 120, signed(chain_id=1), now=NOW)
    assert e.value.reason == "mismatch"
    assert f"chainId {CHAIN_ID}" in str(e.value) and "another chain" in str(e.value)


def test_signature_for_another_operator_is_refused() -> None:
    with pytest.raises(SignatureError, match=f"operator {OPERATOR}") as e:
        verifier().verify(HASH, CLIENT.address, NOW + 120, signed(operator=OTHER_OPERATOR), now=NOW)
    assert e.value.reason == "mismatch"
    assert "another node" in str(e.value)


def test_replay_is_refused_then_a_new_deadline_is_accepted() -> None:
    v = verifier()
    sig = signed()
    v.verify(HASH, CLIENT.address, NOW + 120, sig, now=NOW)
    with pytest.raises(SignatureError, match="already used") as e:
        v.verify(HASH, CLIENT.address, NOW + 120, sig, now=NOW + 5)
    assert e.value.reason == "replayed"
    assert v.verify(HASH, CLIENT.address, NOW + 121, signed(NOW + 121), now=NOW + 5) == CLIENT.address


def test_the_malleable_twin_of_a_signature_is_refused() -> None:
    v = verifier()
    raw = bytes.fromhex(signed()[2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(raw[32:64], "big")
    twin = "0x" + (raw[:32] + (n - s).to_bytes(32, "big") + bytes([55 - raw[64]])).hex()
    v.verify(HASH, CLIENT.address, NOW + 120, signed(), now=NOW)
    with pytest.raises(SignatureError, match="upper half"):
        v.verify(HASH, CLIENT.address, NOW + 120, twin, now=NOW)


def test_used_digests_are_pruned_once_expired() -> None:
    v = verifier()
    for i in range(5):
        v.verify(HASH, CLIENT.address, NOW + 10 + i, signed(NOW + 10 + i), now=NOW)
    assert len(v) == 5
    v.verify(HASH, CLIENT.address, NOW + 200, signed(NOW + 200), now=NOW + 12)
    assert len(v) == 4  # NOW+10 and +11 passed and are dropped; +12, +13, +14 and the new one are held
    v.verify(HASH, CLIENT.address, NOW + 300, signed(NOW + 300), now=NOW + 100)
    assert len(v) == 2  # NOW+200 and NOW+300


def test_concurrent_replays_accept_exactly_one() -> None:
    v = verifier()
    sig = signed()
    results: list[str] = []

    def attempt() -> None:
        try:
            v.verify(HASH, CLIENT.address, NOW + 120, sig, now=NOW)
            results.append("ok")
        except SignatureError as e:
            results.append(e.reason)

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["replayed"] * 15


@pytest.mark.parametrize(("digest", "account", "deadline", "signature", "match"), [
    (HASH, CLIENT.address, NOW + 120, "0x1234", "0x \\+ 130 hex"),
    (HASH, CLIENT.address, NOW + 120, "not hex at all", "0x \\+ 130 hex"),
    (HASH, CLIENT.address, NOW + 120, "0x" + "00" * 65, "invalid v"),
    (HASH, "alice", NOW + 120, None, "not an address"),
    ("0x1234", CLIENT.address, NOW + 120, None, "request hash"),
    (HASH, CLIENT.address, 0, None, "no deadline"),
])
def test_malformed_inputs_are_refused(digest: str, account: str, deadline: int, signature: str | None,
                                      match: str) -> None:
    with pytest.raises(SignatureError, match=match) as e:
        verifier().verify(digest, account, deadline, signature or signed(), now=NOW)
    assert e.value.reason == "malformed"


# ---- client helpers ------------------------------------------------------------------------------------------


def test_sign_fields_and_sign_proto_request_verify() -> None:
    fields = sign_fields(CLIENT, [("user", "Hello")], [("7", 0.0)], max_tokens=8, chain_id=CHAIN_ID,
                         operator=OPERATOR, now=NOW)
    assert fields.signature_deadline == NOW + 120
    assert fields.request_hash == request_hash([("user", "Hello")], [("7", 0.0)], max_tokens=8)
    assert verifier().verify(fields.request_hash, fields.client_account, fields.signature_deadline,
                             fields.client_signature, now=NOW) == CLIENT.address

    request = pb.GenerateRequest(prompt="Hello", adapters=[pb.AdapterRef(adapter="7")],
                                 sampling=pb.SamplingParams(max_tokens=8))
    sign_proto_request(request, CLIENT, chain_id=CHAIN_ID, operator=OPERATOR, now=NOW)
    assert request.client_account == CLIENT.address and request.signature_deadline == NOW + 120
    # the node's side: the hash from the request as received
    v = verifier()
    assert v.verify(proto_request_hash(request), request.client_account, request.signature_deadline,
                    request.client_signature, now=NOW + 1) == CLIENT.address
    request.sampling.max_tokens = 800  # changed after signing: refused
    with pytest.raises(SignatureError, match="mismatch|not client_account"):
        verifier().verify(proto_request_hash(request), request.client_account, request.signature_deadline,
                          request.client_signature, now=NOW + 1)


def test_generate_signing_target_from_options_or_deployment(tmp_path: Path) -> None:
    assert signing_target(CHAIN_ID, OPERATOR.lower(), None) == (CHAIN_ID, OPERATOR)
    dep = tmp_path / "deployment.json"
    names = ("RewardToken", "ContributorRegistry", "DatanetRegistry", "AdapterRegistry", "AttributionLedger")
    dep.write_text(json.dumps({"chainId": 5, "blockNumber": 1, "deployer": OTHER.address, "operator": OPERATOR,
                               "addresses": {n: OTHER.address for n in names}}))
    assert signing_target(None, None, str(dep)) == (5, OPERATOR)
    assert signing_target(CHAIN_ID, OTHER_OPERATOR, str(dep)) == (CHAIN_ID, OTHER_OPERATOR)  # options win
    with pytest.raises(ConfigError, match="--chain-id and --operator"):
        signing_target(None, None, None)
    with pytest.raises(ConfigError, match="--operator"):
        signing_target(CHAIN_ID, None, None)
