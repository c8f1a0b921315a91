"""`build_batch` lays out a step exactly as `inference/batch.py` defines it, token by token, and `to_device` turns
host lists into tensors of the asked dtype whichever way it reads them."""

from __future__ import annotations

import pytest
import torch

from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.kernels import to_device

BS = 4


def reference(chunks: list[SeqChunk]) -> dict[str, list]:
    """The layout of the module docstring, one token at a time."""
    m = max(len(c.adapter_slots) for c in chunks)
    width = max(len(c.block_table) for c in chunks)
    out: dict[str, list] = {k: [] for k in ("input_ids", "positions", "slot_mapping", "logits_indices",
                                             "context_lens", "block_tables", "slots", "scales")}
    out["query_start"] = [0]
    for c in chunks:
        for k, tok in enumerate(c.token_ids):
            q = c.start_pos + k
            out["input_ids"].append(tok)
            out["positions"].append(q)
            out["slot_mapping"].append(c.block_table[q // BS] * BS + q % BS)
            out["slots"].append(list(c.adapter_slots) + [-1] * (m - len(c.adapter_slots)))
            out["scales"].append(list(c.adapter_scales) + [0.0] * (m - len(c.adapter_scales)))
        out["query_start"].append(out["query_start"][-1] + len(c.token_ids))
        out["logits_indices"].append(out["query_start"][-1] - 1)
        out["context_lens"].append(c.start_pos + len(c.token_ids))
        out["block_tables"].append(list(c.block_table) + [0] * (width - len(c.block_table)))
    return out


@pytest.mark.parametrize("merge", [0, 1, 3])
def test_build_batch_matches_the_token_by_token_layout(merge: int) -> None:
    chunks = [
        SeqChunk(0, tuple(range(10, 21)), 3, (7, 2, 9, 4)),  # a prefill chunk from mid-block over three blocks
        SeqChunk(1, (5,), 8, (1, 0, 3)),  # a decode at the start of its third block
        SeqChunk(2, (6,), 6, (11, 12)),  # a decode mid-block
        SeqChunk(3, tuple(range(30, 38)), 0, (5, 6), sample=False),  # a prefill of exactly two whole blocks
    ]
    if merge:
        for i, c in enumerate(chunks):
            k = min(merge, i)  # 0..merge adapters per sequence: columns padded with slot -1, scale 0
            c.adapter_slots = tuple(range(i, i + k))
            c.adapter_scales = tuple(1.0 / k for _ in range(k))
    batch = build_batch(chunks, BS)
    batch.validate()
    ref = reference(chunks)
    t = len(ref["input_ids"])
    width = len(ref["block_tables"][0])
    expect = {
        "input_ids": torch.tensor(ref["input_ids"], dtype=torch.int64),
        "positions": torch.tensor(ref["positions"], dtype=torch.int64),
        "slot_mapping": torch.tensor(ref["slot_mapping"], dtype=torch.int64),
        "logits_indices": torch.tensor(ref["logits_indices"], dtype=torch.int64),
        "query_start": torch.tensor(ref["query_start"], dtype=torch.int32),
        "context_lens": torch.tensor(ref["context_lens"], dtype=torch.int32),
        "block_tables": torch.tensor(ref["block_tables"], dtype=torch.int32).reshape(len(chunks), width),
        "token_adapter_slots": torch.tensor(ref["slots"], dtype=torch.int32).reshape(t, merge),
        "token_adapter_scales": torch.tensor(ref["scales"], dtype=torch.float32).reshape(t, merge),
    }
    for name, want in expect.items():
        got = getattr(batch, name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
        assert got.is_contiguous(), name
        assert got.data_ptr() % 16 == 0, f"{name} is a view the kernels would see unaligned"
    assert batch.max_query_len == 11 and batch.max_context_len == 14
    # runs (slot, first token, end) per merge column: sequences 1, 2, 3 start at tokens 11, 12, 13
    runs = {0: (), 1: (((1, 11, 12), (2, 12, 13), (3, 13, 21)),),
            3: (((1, 11, 12), (2, 12, 13), (3, 13, 21)), ((3, 12, 13), (4, 13, 21)), ((5, 13, 21),))}
    assert batch.adapter_runs == runs[merge]


def test_build_batch_refuses_a_table_too_short() -> None:
    with pytest.raises(ValueError, match="sequence 4: block table too short for 9 tokens"):
        build_batch([SeqChunk(4, (1, 2), 7, (0, 1))], BS)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64, torch.bool])
def test_to_device_gives_what_torch_tensor_gives(dtype: torch.dtype) -> None:
    for values in ([3, 0, 1, 2**20], [[1, 2], [3, 4]], [], [True, False, True]):
        got, want = to_device(values, dtype, "cpu"), torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), values
    flat = [1, 2, 3]
    t = to_device(flat, dtype, "cpu")
    flat[0] = 9  # the tensor owns its memory: a later change to the list does not show
    assert t[0] == torch.tensor(1, dtype=dtype)
