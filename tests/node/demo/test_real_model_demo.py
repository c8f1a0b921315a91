"""The real-model demo's plan, without the real model: its stages, its held-out records (not in the datanet),
and the refusal of an unknown model. The run itself is `make run MODEL=smollm2` (measured in the README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraledger.node.demo import smollm2
from loraledger.node.demo.data_files import sample_records
from loraledger.node.demo.processes import DemoError
from loraledger.node.demo.stages import CONTRIBUTOR_NAMES, STAGES, DemoContext


def test_stages_swap_the_model_add_evaluate_and_skip_reproduce(tmp_path: Path) -> None:
    ctx = DemoContext(state_dir=tmp_path)
    names = [n for n, _ in smollm2.configure(ctx, "smollm2", STAGES)]
    assert names[names.index("train") + 1] == "evaluate"
    assert "reproduce" not in names and names.count("model") == 1
    assert dict(smollm2.stages(STAGES))["model"] is smollm2.stage_model
    assert ctx.sizes == smollm2.SIZES and ctx.plans == smollm2.PLANS
    assert len(ctx.merge_weights) == len(ctx.plans)
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
