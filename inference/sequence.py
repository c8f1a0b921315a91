"""One generation request as the scheduler sees it: its tokens, its sampling parameters, its state.

A `Sequence` is host-side bookkeeping only (plain Python lists, no tensors):

    all_ids        = prompt_ids + output_ids                 the tokens of the sequence so far
    num_computed   = tokens of all_ids whose K/V sit in the paged cache
    num_uncomputed = len(all_ids) - num_computed             what the next step(s) must run
                     (1 for a decode, the prompt for a fresh prefill, prompt + outputs after a preemption)

Lifecycle: WAITING -> RUNNING -> FINISHED, with RUNNING -> WAITING on preemption (recompute: its blocks are
freed, `num_computed` drops to 0, the tokens already generated are kept and re-run as part of the prefill).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Literal

from loraledger.inference.adapter_mix import BASE_MODEL, AdapterMix
from loraledger.inference.errors import InvalidRequestError

FinishReason = Literal["stop", "length", "cancelled", "error"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request; checked on construction and against the model at submit.

    temperature         0 = greedy (argmax); else softmax(logits / temperature)
    top_k               keep the k most likely tokens; 0 = all
    top_p               keep the smallest set of tokens whose probability sums to >= top_p; 1 = all
    repetition_penalty  CTRL-style: a logit of a token already in prompt or output is divided by it when
                        positive, multiplied when negative; 1 = off
    max_tokens          most tokens to generate (at least 1; at most the context room left by the prompt)
    stop                text-level stop strings: generation ends when the text contains one; it is trimmed
    stop_token_ids      generation ends when one of these is sampled (besides EOS, unless ignore_eos)
    seed                a seeded request draws from its own generator: same seed, same tokens in any batch
    logprobs            None = none; n >= 0 = log-probability of each chosen token plus the n most likely
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or rp <= 0:
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0 (1 = off), got {rp!r}")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entry", t)
            if t < 0:
                raise InvalidRequestError(f"stop token ids must be >= 0, got {t}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not (0 <= self.seed < 2**63):
                raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not (0 <= self.logprobs <= self.MAX_LOGPROBS):
                raise InvalidRequestError(
                    f"logprobs must be between 0 and {self.MAX_LOGPROBS} (top alternatives per token), "
                    f"got {self.logprobs}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_for_model(self, prompt_len: int, max_model_len: int, vocab_size: int) -> None:
        """Raise `InvalidRequestError` unless the request fits the model: prompt + max_tokens within the
        context (max_model_len) and every stop token id below the vocabulary size."""
        room = max_model_len - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {prompt_len} tokens but the model context is {max_model_len}: "
                f"shorten the prompt to at most {max_model_len - 1} tokens"
            )
        if self.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={self.max_tokens} does not fit: the prompt has {prompt_len} tokens and the "
                f"context "
                f"is {max_model_len}, so at most {room} tokens can be generated; lower max_tokens"
            )
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise InvalidRequestError(
                    f"stop token id {t} is not in the vocabulary (size {vocab_size}); "
                    f"use ids below {vocab_size}"
                )


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, x: object) -> None:
    if not isinstance(x, int) or isinstance(x, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {x!r}")


@dataclass(eq=False)
class Sequence:
    """Scheduler state of one request. `arrival_index` is a global submit counter: the FCFS tie-break."""

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapters: AdapterMix = BASE_MODEL
    priority: int = 0  # smaller runs first (0 is the default; negative is more urgent)
    arrival_time: float = 0.0  # time.monotonic() at submit
    arrival_index: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None  # message when finish_reason == "error"
    num_computed: int = 0
    num_preemptions: int = 0
    adapter_slots: tuple[int, ...] = ()  # GPU slots while RUNNING with adapters, else ()
    held: bool = False  # its last output is a token still on the device that ends it: never scheduled again

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidRequestError(
                f"request {self.request_id!r}: the prompt is empty; send at least one token"
            )

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        return self.adapters.keys

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        return self.adapters.weights

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Order of service: priority first, then first come first served."""
        return (self.priority, self.arrival_index)

    def ends_by_length(self, num_outputs: int, max_model_len: int) -> bool:
        """With `num_outputs` generated tokens the sequence is done: max_tokens reached, or the context full."""
        return num_outputs >= self.params.max_tokens or len(self.prompt_ids) + num_outputs >= max_model_len

    def max_total_tokens(self) -> int:
        """Most tokens this sequence can ever hold in the KV cache: prompt + max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens
