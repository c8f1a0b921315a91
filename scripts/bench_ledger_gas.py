"""Gas of the AttributionLedger against the number of pending and revoked epochs (issue 17's budget).

    python scripts/bench_ledger_gas.py                       # 0, 100 and 1,000 pending epochs
    python scripts/bench_ledger_gas.py --pending 0,100      # quicker

On a fresh anvil (chain 31337) with the committed artifacts, a ledger with a one-hour challenge delay. For each
count N: epoch 1 pays 8 accounts and takes effect; N more epochs are submitted and left pending; then

    claim           an account's first claim (no reward token held before: two fresh slots, its claimed-so-far
                    here and its balance in the token), against the epoch in effect (the pointer already there)
    claim_token_holder  the same for an account that already holds reward tokens (one fresh slot fewer)
    claim_advance   the same, but naming a later epoch in effect, which advances the pointer on the way
    claim_repeat    a repeat claim of an increase, by an account that already holds tokens
    claimMany/acct  claimMany for 4 fresh accounts, divided by 4
    submitEpoch     the next epoch, pulling new funds
then the guardian revokes all N pending epochs (one call: the chain is cut) and claim / submitEpoch are measured
again (`revoked_*`). Each count is a baseline-relative figure: `ratio_to_0` divides by the N = 0 run of the same
invocation.

Budget (issue 17): claim <= 90,000 gas at 1,000 pending epochs; submitEpoch flat.
Writes JSON to benchmarks/results/ledger_gas.json (or --out), with the machine named.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import machine_info  # scripts/benchlib.py, beside this script
from web3 import Web3
from web3.contract import Contract

from loraledger.node.chain.artifacts import load_artifact
from loraledger.node.chain.devnet import Anvil
from loraledger.node.ledger.merkle import REWARD_LEAF_ENCODING, StandardMerkleTree, keccak256

DELAY = 3600
BUDGET_CLAIM = 90_000
GAS = 1_500_000


def _deploy(w3: Web3, name: str, args: list[Any], sender: str) -> Contract:
    art = load_artifact(name)
    h = w3.eth.contract(abi=art.abi, bytecode=art.bytecode).constructor(*args).transact({"from": sender})
    r = w3.eth.wait_for_transaction_receipt(h)
    assert r["status"] == 1, f"deploying {name} failed"
    return w3.eth.contract(address=r["contractAddress"], abi=art.abi)


def _tx(w3: Web3, fn: Any, sender: str) -> dict[str, Any]:
    r = w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender, "gas": GAS}))
    assert r["status"] == 1, f"{fn.fn_name} failed: {r}"
    return dict(r)


def _tree(amounts: dict[str, int]) -> StandardMerkleTree:
    return StandardMerkleTree.of([[a, v] for a, v in amounts.items()], REWARD_LEAF_ENCODING)


class Bench:
    def __init__(self, w3: Web3) -> None:
        self.w3 = w3
        acc = w3.eth.accounts
        self.admin, self.op, self.guardian = acc[0], acc[1], acc[2]
        self.token = _deploy(w3, "RewardToken", ["Reward", "RWD", self.admin], self.admin)
        self.led = _deploy(w3, "AttributionLedger", [self.admin, self.token.address, DELAY, 7000, 2000, 1000],
                           self.admin)
        _tx(w3, self.led.functions.grantRole(self.led.functions.OPERATOR_ROLE().call(), self.op), self.admin)
        _tx(w3, self.token.functions.mint(self.op, 10**30), self.admin)
        _tx(w3, self.token.functions.approve(self.led.address, 2**256 - 1), self.op)
        # claimants: fresh addresses (no ETH needed: someone else sends the claim)
        self.accounts = [Web3.to_checksum_address(keccak256(b"acct" + bytes([i]))[:20]) for i in range(16)]
        self.epoch = 0

    def submit(self, amounts: dict[str, int], wait: bool = True) -> Any:
        self.epoch += 1
        tree = _tree(amounts)
        rec = keccak256(b"records" + self.epoch.to_bytes(8, "big"))
        exp = keccak256(b"export" + self.epoch.to_bytes(8, "big"))
        parent = self.epoch - 1 if not wait else self.led.functions.liveTip(self.op).call()
        fn = self.led.functions.submitEpoch(self.epoch, rec, 100, tree.root, exp, sum(amounts.values()), parent)
        if wait:
            return tree, _tx(self.w3, fn, self.op)
        return tree, fn.transact({"from": self.op, "gas": GAS})

    def claim(self, epoch: int, tree: StandardMerkleTree, amounts: dict[str, int], who: str) -> dict[str, Any]:
        fn = self.led.functions.claim(self.op, epoch, who, amounts[who], tree.get_proof([who, amounts[who]]))
        return _tx(self.w3, fn, self.admin)

    def run(self, pending: int) -> dict[str, Any]:
        w3 = self.w3
        snap = w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
        try:
            a = self.accounts
            base = {x: 10**18 * (i + 1) for i, x in enumerate(a[:12])}
            t1, _ = self.submit(base)
            w3.provider.make_request("evm_increaseTime", [DELAY + 1])  # type: ignore[arg-type]
            t2, _ = self.submit(base)  # same amounts: epoch 2 is in effect together with 1 after the wait below
            w3.provider.make_request("evm_increaseTime", [DELAY + 1])  # type: ignore[arg-type]
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
            self.claim(1, t1, base, a[0])  # advances to 1; a[0] now holds tokens
            out: dict[str, Any] = {"pending_epochs": pending}
            t_start = time.perf_counter()
            hashes = [self.submit(base, wait=False)[1] for _ in range(pending)]
            if hashes:
                w3.eth.wait_for_transaction_receipt(hashes[-1], timeout=600)
            out["setup_seconds"] = round(time.perf_counter() - t_start, 1)
            assert self.led.functions.lastEpoch(self.op).call() == 2 + pending
            r = self.claim(1, t1, base, a[1])
            out["claim"] = r["gasUsed"]
            _tx(w3, self.token.functions.mint(a[9], 1), self.admin)  # a[9] holds reward tokens already
            out["claim_token_holder"] = self.claim(1, t1, base, a[9])["gasUsed"]
            out["claim_advance"] = self.claim(2, t2, base, a[2])["gasUsed"]  # names epoch 2: advances the pointer
            more = {**base, a[0]: base[a[0]] + 10**18}
            out["submitEpoch"] = self.submit(more)[1]["gasUsed"]
            many = a[3:7]
            fn = self.led.functions.claimMany(self.op, 2, many, [base[x] for x in many],
                                              [t2.get_proof([x, base[x]]) for x in many])
            out["claimMany_per_account"] = _tx(w3, fn, self.admin)["gasUsed"] // len(many)
            out["claim_fresh_plain"] = self.claim(2, t2, base, a[7])["gasUsed"]
            if pending:
                r = _tx(w3, self.led.functions.revokeRoot(self.op, 3), self.admin)
                out["revokeRoot_all_pending"] = r["gasUsed"]
                out["revoked_claim"] = self.claim(2, t2, base, a[8])["gasUsed"]
                out["revoked_submitEpoch"] = self.submit({**base, a[0]: base[a[0]] + 2 * 10**18})[1]["gasUsed"]
            return out
        finally:
            w3.provider.make_request("evm_revert", [snap])  # type: ignore[arg-type]
            self.epoch = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", default="0,100,1000", help="comma-separated pending-epoch counts (0 first)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks/results/ledger_gas.json")
    args = ap.parse_args()
    counts = [int(x) for x in args.pending.split(",")]
    if counts[0] != 0:
        raise SystemExit("--pending must start with 0 (the baseline every ratio is against)")
    with tempfile.TemporaryDirectory() as tmp, Anvil(Path(tmp)) as node:
        w3 = Web3(Web3.HTTPProvider(node.rpc_url, request_kwargs={"timeout": 120}))
        bench = Bench(w3)
        runs = []
        for n in counts:
            r = bench.run(n)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}))
            runs.append(r)
    base = runs[0]
    keys = ["claim", "claim_token_holder", "claim_advance", "claim_fresh_plain", "claimMany_per_account",
            "submitEpoch"]
    for r in runs:
        r["ratio_to_0"] = {k: round(r[k] / base[k], 4) for k in keys}
    worst = max(max(r["claim"], r["claim_fresh_plain"], r.get("revoked_claim", 0)) for r in runs)
    worst_holder = max(r["claim_token_holder"] for r in runs)
    result = {
        "benchmark": "bench_ledger_gas",
        "machine": machine_info(),
        "challenge_delay_s": DELAY,
        "runs": runs,
        "budget": {"claim_max_gas_at_1000_pending": BUDGET_CLAIM, "worst_claim_gas": worst,
                   "claim_within_budget": worst <= BUDGET_CLAIM, "worst_claim_gas_token_holder": worst_holder,
                   "claim_token_holder_within_budget": worst_holder <= BUDGET_CLAIM,
                   # flat: within 0.1% (calldata of larger epoch numbers adds a few gas)
                   "submitEpoch_flat": max(r["submitEpoch"] for r in runs) <= 1.001 * base["submitEpoch"]},
        "claim_gas_notes": (
            "claim = a first claim by an account holding no reward token: 21,000 intrinsic + 2 x 22,100 for two "
            "fresh storage slots (its claimed-so-far in the ledger, its balance in the token) + ~30k of proof, "
            "cold reads (the ledger's claim state and root, the account's claimed-so-far, the token account, 2 token balances) and events; claim_token_holder = the same "
            "for an account that already holds tokens (one fresh slot fewer)"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
