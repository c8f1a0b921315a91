"""Claims against the root in effect, with a challenge delay longer than the epoch period, on a real anvil of
its own (its clock is moved with evm_increaseTime): under steady traffic every claim of the amount in effect
succeeds, the pending amount and its time are reported, a proof for a pending epoch is refused with a hint
that points the right way, and `rewards show` works from published epoch files without the operator's log."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraledger.node.chain.keys import dev_account
from loraledger.node.ledger.claims import (
    ClaimError,
    EpochFileSource,
    LogProofSource,
    check_proof,
    claim,
    reward_status,
)
from loraledger.node.ledger.epochs import export_epoch
from loraledger.node.ledger.record_log import RecordLog
from loraledger.node.ledger.settler import Settler

REPO = Path(__file__).resolve().parents[3]
PERIOD = 40  # seconds between epochs: the delay spans 2.5 epochs


def test_every_claim_of_the_amount_in_effect_succeeds_under_steady_traffic(delay_world: Any, tmp_path: Path) -> None:
    world = delay_world
    rng = random.Random(5)
    ledger = world.bind(world.operator).ledger
    claimer = world.bind(dev_account(9)).ledger  # anyone may send a claim; it pays the account
    exports = tmp_path / "exports"
    paid_claims = 0
    pending_seen = 0
    with RecordLog.open(tmp_path / "log.sqlite") as log_:
        settler = Settler(log_, world.bind(world.operator))
        source = LogProofSource(log_)
        for k in range(8):
            log_.append_many(world.records(rng, 5, 1000 * k))
            outcome = settler.settle()
            assert outcome is not None and outcome.epoch == k + 1
            export_epoch(log_, outcome.epoch, exports / f"epoch-{outcome.epoch}.json")
            for acct in world.contributors:
                st = reward_status(claimer, source, acct.address)
                in_effect = ledger.root_in_effect(world.operator.address).epoch
                assert st.epoch == st.epoch_in_effect == in_effect
                assert st.latest_epoch == outcome.epoch
                latest = source.reward_proof(acct.address, outcome.epoch)
                assert latest is not None
                # what the newest epoch adds is pending until it takes effect, and says when
                assert int(st.pending) == int(latest.cumulative_amount) - int(st.cumulative_amount)
                assert int(st.pending) > 0
                assert st.pending_effective_at == ledger.effective_at(world.operator.address, outcome.epoch)
                assert st.pending_effective_at > st.chain_time
                pending_seen += 1
                # the newest epoch's proof is refused before anything is sent, pointing at the epoch in effect
                with pytest.raises(ClaimError) as err:
                    check_proof(claimer, latest)
                if in_effect:
                    assert "still in its challenge delay" in str(err.value)
                    assert f"claim with the proof of epoch {in_effect}" in str(err.value)
                else:
                    assert f"no rewards root in effect yet: epoch {outcome.epoch} takes effect" in str(err.value)
                if st.claimable_now > 0:
                    assert st.proof is not None
                    before = int(world.bind(acct).token.balance_of(acct.address))
                    res = claim(claimer, st.proof)
                    assert res.tx_hash is not None and int(res.paid) == int(st.claimable_now)
                    after = int(world.bind(acct).token.balance_of(acct.address))
                    assert after - before == int(st.claimable_now)
                    paid_claims += 1
                    again = reward_status(claimer, source, acct.address)
                    assert int(again.claimable_now) == 0 and int(again.claimed) == int(st.cumulative_amount)
            world.advance(PERIOD)
    # epochs 1..8 submitted 40 s apart with a 100 s delay: from the 4th on, one epoch is in effect at each round
    assert paid_claims >= 3 * len(world.contributors)
    assert pending_seen == 8 * len(world.contributors)

    # `rewards show` without the operator's record log: the chain plus the published epoch files
    acct = world.contributors[1]
    out = subprocess.run(
        [sys.executable, "-m", "loraledger.node.cli", "rewards", "show", acct.address, "--epoch-file", str(exports),
         "--deployment", str(world.deployment_file), "--rpc-url", world.anvil.rpc_url,
         "--records", str(tmp_path / "no-such-log.sqlite")],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = EpochFileSource([exports])
    st = reward_status(claimer, files, acct.address)
    assert f"claimable now: {st.claimable_now}" in out.stdout
    assert f"claimed: {st.claimed}" in out.stdout
    assert "pending until" in out.stdout and f": {st.pending} (epoch 8)" in out.stdout
    assert "history" not in out.stdout  # no log: no history, and no error about it


def test_show_without_log_or_source_says_how_to_read_without_it(delay_world: Any, tmp_path: Path) -> None:
    world = delay_world
    out = subprocess.run(
        [sys.executable, "-m", "loraledger.node.cli", "rewards", "show", world.contributors[0].address,
         "--deployment", str(world.deployment_file), "--rpc-url", world.anvil.rpc_url,
         "--records", str(tmp_path / "none.sqlite")],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode != 0
    assert "--server HOST:PORT" in out.stderr and "--epoch-file" in out.stderr
