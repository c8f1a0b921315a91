"""Bookkeeping of a step run ahead of the host (`EngineConfig.async_decode`).

The engine queues step N+1 before it reads step N's sampled tokens. Meanwhile each sequence N sampled for holds
its place with a `PLACEHOLDER` output, and each decode of N+1 reads its input token from N's samples on the
device (the graph runner's `last_tokens`):

    Inflight.hold(rows, pending, max_model_len)   step N queued: a PLACEHOLDER output per sampled row
    inflight.source_row(chunk)                    the row of N's samples holding `chunk`'s input token, or -1
    take_tokens(input_ids, chunks, sources, last_tokens)   those tokens into a plain batch, on the device
    inflight.pending.result()                     N's tokens on the host; each replaces its placeholder at `at`

A sequence that N's token ends by length is `held` (never scheduled again) until that token is recorded. A step
whose sampling reads token histories on the host (`needs_history`) cannot run ahead: the engine collects N
first and replaces the placeholders in that step's chunks (`resolved`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

import torch

from loraledger.inference.batch import SeqChunk
from loraledger.inference.errors import EngineError
from loraledger.inference.sampling import PendingSample
from loraledger.inference.scheduler import token_ids_of
from loraledger.inference.sequence import Sequence, SequenceStatus
from loraledger.kernels import to_device

# An output token still on the device: it holds the sequence's place until its step is collected.
PLACEHOLDER = -1


class _HasSeq(Protocol):
    @property
    def seq(self) -> Sequence: ...


R = TypeVar("R", bound=_HasSeq)


@dataclass
class Inflight(Generic[R]):
    """A step run ahead: its sampled rows (each one's request state), each row's placeholder index in its
    sequence's output_ids (-1: none, it had finished), and the pending sample."""

    rows: list[R]
    at: list[int]
    pending: PendingSample
    _row_of: dict[int, int] = field(init=False, repr=False)  # seq_id -> its row of the pending sample

    def __post_init__(self) -> None:
        self._row_of = {r.seq.seq_id: j for j, r in enumerate(self.rows)}

    @classmethod
    def hold(cls, rows: list[R], pending: PendingSample, max_model_len: int) -> Inflight[R]:
        """A PLACEHOLDER output for each sampled sequence that has not finished. A sequence this token ends by
        length is held out of the next step (the scheduler skips it) until the token is recorded."""
        at: list[int] = []
        for r in rows:
            seq = r.seq
            if seq.status is SequenceStatus.FINISHED:
                at.append(-1)
                continue
            n = len(seq.output_ids)
            at.append(n)
            seq.output_ids.append(PLACEHOLDER)
            if seq.ends_by_length(n + 1, max_model_len):
                seq.held = True
        return cls(rows, at, pending)

    def source_row(self, chunk: SeqChunk) -> int:
        """The row of this step's samples holding `chunk`'s input token, or -1 when the chunk has its token."""
        if chunk.token_ids[-1] != PLACEHOLDER:  # a placeholder is always a sequence's last output
            return -1
        row = self._row_of.get(chunk.seq_id)
        if row is None or len(chunk.token_ids) != 1:  # only a decode reads the token its last step sampled
            raise EngineError(f"sequence {chunk.seq_id} waits on a token of no step in flight")
        return row


def needs_history(seqs: Iterable[Sequence]) -> bool:
    """Some sequence samples with a repetition penalty, which reads its token history on the host."""
    return any(s.params.repetition_penalty != 1.0 for s in seqs)


def resolved(seq: Sequence, chunk: SeqChunk) -> SeqChunk:
    """`chunk` with its placeholder token replaced by the recorded one (after the step ahead is collected)."""
    if PLACEHOLDER not in chunk.token_ids:
        return chunk
    return replace(chunk, token_ids=token_ids_of(seq, chunk.start_pos, len(chunk.token_ids)))


def take_tokens(
    input_ids: torch.Tensor, chunks: list[SeqChunk], sources: list[int], last_tokens: torch.Tensor
) -> None:
    """Put the step ahead's samples into a plain batch's flat input_ids, on the device:

        input_ids[first token of chunk i] = last_tokens[sources[i]]   for each chunk i with sources[i] >= 0

    (such a chunk is a decode: its one token). input_ids: [T] int64, last_tokens: [B] on the same device."""
    flat, src, start = [], [], 0
    for c, r in zip(chunks, sources, strict=True):
        if r >= 0:
            flat.append(start)
            src.append(r)
        start += len(c.token_ids)
    device = input_ids.device
    input_ids[to_device(flat, torch.int64, device)] = last_tokens[to_device(src, torch.int64, device)]


def recorded_outputs(seq: Sequence) -> tuple[int, ...]:
    """`seq`'s output ids less a placeholder (a token still on the device is no part of its answer)."""
    return tuple(i for i in seq.output_ids if i != PLACEHOLDER)
