"""loraledger.node.ledger.merkle against OpenZeppelin's JS StandardMerkleTree (fixed vectors) and the contract's own verification."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak as ref_keccak
from eth_utils import to_checksum_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3.exceptions import ContractLogicError

from loraledger.node.ledger.merkle import (
    CONTRIBUTION_LEAF_ENCODING,
    RECORD_LEAF_ENCODING,
    REWARD_LEAF_ENCODING,
    MerkleError,
    StandardMerkleTree,
    encode_leaf,
    hash_pair,
    keccak256,
    leaf_hash,
    process_proof,
    to_hex,
    verify,
)
from tests.contracts.helpers import (
    ChainEnv,
    domain_of,
    make_record,
    record,
    revert_to,
    send,
    snapshot,
    submit_fn,
)

REPO = Path(__file__).resolve().parents[2]
JS_SCRIPT = Path(__file__).with_name("oz_merkle.js")


def _address(rng: random.Random) -> str:
    """A random EIP-55 checksummed address (mixed case, as web3 wants it)."""
    return to_checksum_address(rng.randbytes(20))


def _reward_values(n: int, seed: int) -> list[list[Any]]:
    rng = random.Random(seed)
    return [[_address(rng), rng.randrange(0, 2**256)] for _ in range(n)]


def _contribution_values(n: int, seed: int) -> list[list[Any]]:
    rng = random.Random(seed)
    return [[_address(rng), rng.randbytes(32), rng.randrange(1, 10**6)] for _ in range(n)]


def _record_values(n: int) -> list[list[Any]]:
    return [record(1 + i % 3, i) for i in range(n)]


def _json_values(tree: StandardMerkleTree) -> list[list[Any]]:
    return [entry["value"] for entry in tree.dump()["values"]]


def _cases() -> list[tuple[tuple[str, ...], list[list[Any]], bool]]:
    cases: list[tuple[tuple[str, ...], list[list[Any]], bool]] = []
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 100):
        cases.append((REWARD_LEAF_ENCODING, _reward_values(n, seed=n), True))
    for n in (1, 6, 13):
        cases.append((CONTRIBUTION_LEAF_ENCODING, _contribution_values(n, seed=100 + n), True))
    for n in (1, 2, 11):
        cases.append((RECORD_LEAF_ENCODING, _record_values(n), True))
    dup = _reward_values(4, seed=7)
    cases.append((REWARD_LEAF_ENCODING, dup + [list(dup[1]), list(dup[3])], True))  # equal leaves: stable order
    cases.append((REWARD_LEAF_ENCODING, _reward_values(6, seed=9), False))  # sortLeaves: false
    cases.append((("bool", "int8", "bytes4", "uint8"), [[True, -5, b"\x01\x02\x03\x04", 7], [False, 127, b"abcd", 0]],
                  True))
    return cases


def _run_js(payload: dict[str, Any]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "@openzeppelin" / "merkle-tree").is_dir():
        pytest.skip("node or node_modules/@openzeppelin/merkle-tree missing (run `npm ci`)")
    proc = subprocess.run([node, str(JS_SCRIPT)], input=json.dumps(payload), capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, f"oz_merkle.js failed: {proc.stderr}"
    return list(json.loads(proc.stdout))


def test_matches_openzeppelin_js_on_fixed_vectors() -> None:
    cases = _cases()
    trees = [StandardMerkleTree.of(values, enc, sort_leaves=sort) for enc, values, sort in cases]
    payload = {"cases": [{"encoding": list(enc), "values": _json_values(t), "sortLeaves": sort,
                          "pythonDump": t.dump()} for (enc, _, sort), t in zip(cases, trees)]}
    results = _run_js(payload)
    assert len(results) == len(cases)
    for (enc, values, _), tree, js in zip(cases, trees, results):
        assert tree.root_hex == js["root"], (enc, len(values))
        assert [tree.get_proof_hex(i) for i in range(len(values))] == js["proofs"], (enc, len(values))
        assert tree.dump() == js["dump"], (enc, len(values))  # same layout, tree indices and JSON values
        assert js["loadedRoot"] == tree.root_hex  # JS loads and validates our dump
        loaded = StandardMerkleTree.load(js["dump"])  # we load and validate theirs
        assert loaded.root == tree.root and loaded.tree_indices == tree.tree_indices


def test_single_leaf_and_small_trees_by_hand() -> None:
    a, b, c = _reward_values(3, seed=1)
    la, lb, lc = (leaf_hash(REWARD_LEAF_ENCODING, v) for v in (a, b, c))
    assert la == ref_keccak(ref_keccak(abi_encode(["address", "uint256"], a)))
    one = StandardMerkleTree.of([a], REWARD_LEAF_ENCODING)
    assert one.root == la and one.get_proof(0) == [] and one.verify(0, [])
    two = StandardMerkleTree.of([a, b], REWARD_LEAF_ENCODING)
    assert two.root == hash_pair(la, lb) == hash_pair(lb, la)
    three = StandardMerkleTree.of([a, b, c], REWARD_LEAF_ENCODING)
    s = sorted([la, lb, lc])  # tree = [root, n1, s2, s1, s0]; n1 = node(s1, s0)
    assert three.tree[2:] == [s[2], s[1], s[0]]
    assert three.root == hash_pair(hash_pair(s[1], s[0]), s[2])
    for v in (a, b, c):
        proof = three.get_proof(v)
        assert process_proof(leaf_hash(REWARD_LEAF_ENCODING, v), proof) == three.root
        assert verify(three.root_hex, REWARD_LEAF_ENCODING, v, [to_hex(p) for p in proof])
    assert not verify(three.root, REWARD_LEAF_ENCODING, [a[0], a[1] ^ 1], three.get_proof(a))


def test_bad_inputs_raise_merkle_errors() -> None:
    with pytest.raises(MerkleError, match="no leaves"):
        StandardMerkleTree.of([], REWARD_LEAF_ENCODING)
    for bad in (["0x1234", 1], ["0x" + "zz" * 20, 1], ["0x" + "11" * 20, -1], ["0x" + "11" * 20, 2**256],
                ["0x" + "11" * 20], ["0xAbCdEf0000000000000000000000000000000000", 1], ["0x" + "11" * 20, True]):
        with pytest.raises(MerkleError):
            encode_leaf(REWARD_LEAF_ENCODING, bad)
    tree = StandardMerkleTree.of(_reward_values(5, seed=3), REWARD_LEAF_ENCODING)
    with pytest.raises(MerkleError, match="not a leaf"):
        tree.get_proof(["0x" + "22" * 20, 5])
    with pytest.raises(MerkleError, match="out of range"):
        tree.get_proof(5)
    dump = tree.dump()
    dump["values"][0]["value"][1] = str(int(dump["values"][0]["value"][1]) + 1)
    with pytest.raises(MerkleError, match="does not hash"):
        StandardMerkleTree.load(dump)
    dump = tree.dump()
    dump["tree"][0] = "0x" + "00" * 32
    with pytest.raises(MerkleError, match="inner node 0"):
        StandardMerkleTree.load(dump)
    with pytest.raises(MerkleError, match="format"):
        StandardMerkleTree.load({**tree.dump(), "format": "simple-v1"})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=20, max_size=20), st.integers(0, 2**256 - 1),
                          st.binary(min_size=32, max_size=32), st.booleans(), st.integers(-2**63, 2**63 - 1)),
                min_size=1, max_size=4))
def test_fast_static_encoder_equals_eth_abi(rows: list[tuple[bytes, int, bytes, bool, int]]) -> None:
    types = ("address", "uint256", "bytes32", "bool", "int64")
    for addr, amount, h, flag, signed in rows:
        value = ["0x" + addr.hex(), amount, h, flag, signed]
        expected = abi_encode(list(types), value)
        assert encode_leaf(types, value) == expected
        assert keccak256(expected) == ref_keccak(expected)


def test_large_tree_is_fast() -> None:
    """50k reward leaves: build, prove and verify well within budget (1M takes ~10 s on a slow shared core)."""
    rng = random.Random(5)
    values = [["0x" + rng.randbytes(20).hex(), rng.randrange(2**128)] for _ in range(50_000)]
    t0 = time.perf_counter()
    tree = StandardMerkleTree.of(values, REWARD_LEAF_ENCODING)
    build = time.perf_counter() - t0
    proofs = [tree.get_proof(i) for i in range(0, 50_000, 997)]
    assert all(tree.verify(i * 997, p) for i, p in enumerate(proofs))
    assert build < 30.0, f"building 50k leaves took {build:.1f}s (expected ~1 s)"


# ------------------------------------------------------------------ against the contract


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), picks=st.lists(st.integers(0, 299), min_size=1,
                                                                              max_size=3))
def test_python_proofs_verify_in_the_ledger(chain_env: ChainEnv, n: int, seed: int, picks: list[int]) -> None:
    """Random reward trees of 1..300 leaves: the ledger's own claim verification accepts Python's proofs."""
    env = chain_env
    rng = random.Random(seed)
    values = [[_address(rng), rng.randrange(1, 10**18)] for _ in range(n)]
    tree = StandardMerkleTree.of(values, REWARD_LEAF_ENCODING)
    dom = domain_of(env)
    rec_objs = [make_record(1, (seed + i) % 997) for i in range(1 + n % 7)]
    recs = StandardMerkleTree.of([r.leaf_values(dom) for r in rec_objs], RECORD_LEAF_ENCODING)
    total = sum(v[1] for v in values)
    snap = snapshot(env.w3)
    try:
        send(env.w3, submit_fn(env, 1, tree, total, records=recs), env.operator)
        for p in picks:
            i = p % n
            account, amount = values[i]
            proof = tree.get_proof(i)
            claim = env.ledger.functions.claim(env.operator, 1, account, amount, proof)
            claim.call({"from": env.admin})  # verifies: no revert
            with pytest.raises(ContractLogicError):
                env.ledger.functions.claim(env.operator, 1, account, amount + 1, proof).call({"from": env.admin})
            r = rec_objs[p % len(rec_objs)]
            proof_r = recs.get_proof(r.leaf_values(dom))
            assert env.ledger.functions.verifyRecord(env.operator, 1, r.ledger_tuple(), proof_r).call()
        i = picks[0] % n
        send(env.w3, env.ledger.functions.claim(env.operator, 1, values[i][0], values[i][1], tree.get_proof(i)),
             env.admin)
        assert env.token.functions.balanceOf(values[i][0]).call() == values[i][1]
    finally:
        revert_to(env.w3, snap)
