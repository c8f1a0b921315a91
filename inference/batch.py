"""The flat batch one engine step runs: tokens of many sequences, prefill chunks and decodes mixed.

This is the contract between the scheduler (which decides what runs), the model runner (which runs it), the
paged KV cache (where the keys and values go) and the LoRA layers (which adapter each token uses).

Layout, for B sequences contributing T tokens in total this step:

    input_ids[t], positions[t]           t in [0, T): tokens in sequence order, each sequence's tokens contiguous
    query_start[b] .. query_start[b+1]   the tokens of sequence b in the flat batch            (query_start: [B+1])
    context_lens[b]                      tokens of b in the KV cache once this step's are written  ([B])
    block_tables[b, j]                   physical block holding tokens [j*bs, (j+1)*bs) of b    ([B, max_blocks])
    slot_mapping[t]                      flat cache slot (block * block_size + offset) for token t   ([T])
    logits_indices[b]                    flat index of the token whose logits are sampled for b ([B])
    token_adapter_slots[t, m]            GPU adapter slot applied to token t, -1 for none       ([T, M])
    token_adapter_scales[t, m]           that slot's merge weight for token t (1.0 for a single adapter) ([T, M])

M is the largest number of adapters any sequence in the batch merges (1 without merges, 0 for a batch that
uses no adapter at all: then both adapter tensors have shape [T, 0] and LoRA costs nothing).
`adapter_runs[m]` is the host copy of column m: runs (slot, start, end) of consecutive tokens on one slot >= 0,
in token order, so the LoRA layers need no device-to-host copy to plan their work.
A prefill chunk of sequence b is the tokens [context_lens[b] - q_len, context_lens[b]); a decode is q_len == 1.

`static` marks a fixed-shape decode step built by `loraledger.inference.graph_runner` (padded rows, block tables of the
full context width, views of buffers a CUDA graph replays): every consumer must take its work from the tensors
alone, with no host copy (`adapter_runs` may then be None) and no shape that depends on their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraledger.kernels import to_device


@dataclass
class BatchMetadata:
    """Tensors of one step; all on the model's device, integer tensors int32 unless noted."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start: torch.Tensor  # [B+1] int32, query_start[0] == 0, query_start[B] == T
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries are 0
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [B] int64
    token_adapter_slots: torch.Tensor  # [T, M] int32, -1 = no adapter
    token_adapter_scales: torch.Tensor  # [T, M] float32
    block_size: int
    max_query_len: int
    max_context_len: int
    adapter_runs: tuple[tuple[tuple[int, int, int], ...], ...] | None = None  # [M] runs (slot, start, end)
    static: bool = False  # a fixed-shape (CUDA-graph) decode step: see the module docstring

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def validate(self) -> None:
        """Internal invariants (cheap shape checks); the scheduler's output must always pass."""
        t, b = self.num_tokens, self.num_seqs
        assert self.positions.shape == (t,)
        assert self.query_start.shape == (b + 1,)
        assert self.slot_mapping.shape == (t,)
        assert self.logits_indices.shape == (b,)
        assert self.block_tables.shape[0] == b
        assert self.token_adapter_slots.shape[0] == t
        assert self.token_adapter_slots.shape == self.token_adapter_scales.shape


@dataclass(slots=True)
class SeqChunk:
    """What the scheduler hands the batch builder for one sequence this step (host-side, plain Python; one per
    running sequence per step, so a plain slotted class, cheaper to build than a frozen one).

    `token_ids` are the tokens to run now (a prefill chunk or the one decode token), starting at absolute
    position `start_pos`; `block_table` covers at least `start_pos + len(token_ids)` tokens.
    `adapter_slots` / `adapter_scales` name the GPU slots (and merge weights) applied to every token of it.
    `sample` is False for a prefill chunk that does not reach the end of the prompt (no token is sampled).
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    adapter_slots: tuple[int, ...] = ()
    adapter_scales: tuple[float, ...] = ()
    sample: bool = True


def build_batch(chunks: list[SeqChunk], block_size: int, device: torch.device | str = "cpu") -> BatchMetadata:
    """Flatten per-sequence chunks into one `BatchMetadata` (host lists -> device tensors: two packed copies)."""
    if not chunks:
        raise ValueError("build_batch needs at least one sequence chunk")
    input_ids: list[int] = []
    positions: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    slot_mapping: list[int] = []
    logits_indices: list[int] = []
    max_m = max(len(c.adapter_slots) for c in chunks)
    slots: list[int] = []  # [T, M] row-major
    scales: list[float] = []
    max_blocks = max(len(c.block_table) for c in chunks)
    tables: list[int] = []  # [B, max_blocks] row-major
    for c in chunks:
        n = len(c.token_ids)
        if n == 0:
            raise ValueError(f"sequence {c.seq_id}: a chunk must carry at least one token")
        end = c.start_pos + n
        if len(c.block_table) * block_size < end:
            raise ValueError(f"sequence {c.seq_id}: block table too short for {end} tokens")
        if len(c.adapter_slots) != len(c.adapter_scales):
            raise ValueError(f"sequence {c.seq_id}: adapter slots and scales differ in length")
        input_ids.extend(c.token_ids)
        q = c.start_pos
        if n == 1:  # a decode
            positions.append(q)
            slot_mapping.append(c.block_table[q // block_size] * block_size + q % block_size)
        else:
            positions.extend(range(q, end))
            for j in range(q // block_size, (end - 1) // block_size + 1):  # block by block, not per token
                base = c.block_table[j] * block_size - j * block_size  # slot of position p in block j: base + p
                slot_mapping.extend(range(base + max(q, j * block_size), base + min(end, (j + 1) * block_size)))
        query_start.append(query_start[-1] + n)
        context_lens.append(end)
        logits_indices.append(query_start[-1] - 1)
        if max_m:  # every token of the chunk on its slots, in row-major [T, M]
            pad = max_m - len(c.adapter_slots)
            slots.extend((list(c.adapter_slots) + [-1] * pad) * n)
            scales.extend((list(c.adapter_scales) + [0.0] * pad) * n)
        tables.extend(c.block_table)
        tables.extend([0] * (max_blocks - len(c.block_table)))
    t, b = len(input_ids), len(chunks)
    # Two host buffers, two copies (pinned and non-blocking on CUDA: building a step never waits for the one
    # running), each tensor a view of one: [input ids | positions | slots | logits indices] in int64 and
    # [query start | context lengths | block tables | adapter slots] in int32. Every part starts on a multiple
    # of 4 elements, so each view is as aligned (16 bytes) as a tensor of its own: Triton specializes on it.
    ints64, at64 = _packed([input_ids, positions, slot_mapping, logits_indices])
    ints32, at32 = _packed([query_start, context_lens, tables, slots])
    dev64, dev32 = to_device(ints64, torch.int64, device), to_device(ints32, torch.int32, device)
    return BatchMetadata(
        input_ids=dev64[at64[0] : at64[0] + t],
        positions=dev64[at64[1] : at64[1] + t],
        query_start=dev32[at32[0] : at32[0] + b + 1],
        context_lens=dev32[at32[1] : at32[1] + b],
        block_tables=dev32[at32[2] : at32[2] + b * max_blocks].view(b, max_blocks),
        slot_mapping=dev64[at64[2] : at64[2] + t],
        logits_indices=dev64[at64[3] : at64[3] + b],
        token_adapter_slots=dev32[at32[3] : at32[3] + t * max_m].view(t, max_m),
        token_adapter_scales=(to_device(scales, torch.float32, device) if max_m
                              else torch.zeros(0, dtype=torch.float32, device=device)).view(t, max_m),
        block_size=block_size,
        max_query_len=max(len(c.token_ids) for c in chunks),
        max_context_len=max(context_lens),
        adapter_runs=adapter_runs(chunks, query_start, max_m),
    )


def _packed(parts: list[list[int]], align: int = 4) -> tuple[list[int], list[int]]:
    """The parts laid end to end in one list, each starting on a multiple of `align` (zeros between), and
    where each starts."""
    flat: list[int] = []
    starts: list[int] = []
    for part in parts:
        flat.extend([0] * (-len(flat) % align))
        starts.append(len(flat))
        flat.extend(part)
    return flat, starts


def adapter_runs(
    chunks: list[SeqChunk], query_start: list[int], num_columns: int
) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """`BatchMetadata.adapter_runs` of chunks laid out from flat token `query_start[b]` on: per merge column
    m < num_columns, the runs (slot, start, end) of consecutive tokens on one slot >= 0, in token order."""
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(num_columns)]
    for c, start in zip(chunks, query_start, strict=False):  # query_start[b]: first token of chunk b
        for m, slot in enumerate(c.adapter_slots):
            col, end = runs[m], start + len(c.token_ids)
            if col and col[-1][0] == slot and col[-1][2] == start:
                col[-1] = (slot, col[-1][1], end)  # the previous sequence ran on the same slot: one run
            elif slot >= 0:
                col.append((slot, start, end))
    return tuple(tuple(col) for col in runs)
