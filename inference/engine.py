"""The `Engine`: requests in, streamed tokens and results out; one model, one paged KV cache, one scheduler.

    engine = Engine(EngineConfig(model_dir="..."))
    handle = engine.submit(GenerationRequest("Hello", SamplingParams(max_tokens=32)))   # validated here
    async for item in handle: ...          # TokenDelta, TokenDelta, ..., then one GenerationResult
    engine.generate(["a", "b"], params)    # synchronous, for scripts and tests

One step (`step()`): take new requests and cancellations in; ask the scheduler for this step's chunks;
`build_batch` them (or fill the fixed-shape buffers a CUDA graph replays, `loraledger.inference.graph_runner`); one model
forward over the flat batch; logits at the sampled rows, `sample`, and each token is recorded on its sequence,
which ends at once when its ids say so (EOS, stop token ids, max_tokens, the context): it leaves the next step
and its KV blocks return to the pool. The text work of those tokens (detokenizing, stop strings, streaming,
final results) runs in the next step: on CUDA while its kernels run (a stop string is then found one step late,
and the extra token computed for that sequence is dropped: its answer ends at the token that completed the stop
string); on the CPU before it is scheduled.

With `async_decode` (on with CUDA graphs) a step is not waited for: step N+1 is scheduled and built while the
device runs step N, its decodes read their input tokens from N's samples on the device, and N's tokens are
recorded after N+1 is queued (`Engine._run`). Placeholders hold the sequences' places meanwhile.

Threads: `start()` runs the step loop on a background thread (torch releases the GIL in the forward); every
public method is thread-safe. Handles deliver to the asyncio loop that iterates them through
`loop.call_soon_threadsafe`, and to plain threads through `handle.result()`. Without `start()` nothing runs
unless someone calls `step()` (or `generate`, which steps itself): the deterministic mode of the tests.

Text. `TokenDelta.text_delta` never holds half a UTF-8 character nor text that might become part of a stop
string; concatenated, the deltas equal `GenerationResult.text` (for a cancelled request, text held back
at that moment is dropped). `token_ids` hold every sampled token,
including the EOS / stop token / the token that completed a stop string; `text` leaves out special tokens,
the text of a stop token id, and everything from a stop string on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

import torch

from loraledger.inference.attention import get_attention_backend
from loraledger.inference.batch import SeqChunk, build_batch
from loraledger.inference.block_manager import BlockManager
from loraledger.inference.config import ModelConfig, parse_dtype
from loraledger.inference.errors import CapacityError, EngineConfigError, EngineError, InvalidRequestError
from loraledger.inference.graph_runner import GRAPH_MODES, DecodeGraphRunner
from loraledger.inference.kv_cache import PagedKVCache, bytes_per_block, num_blocks_for_budget
from loraledger.inference.model import LlamaModel
from loraledger.inference.quant import check_quantize_mode, load_model_quantized
from loraledger.inference.sampling import PendingSample, SampleOutput, SampleRequest, make_generator, sample_start
from loraledger.inference.scheduler import AdapterSlots, Scheduler, SchedulerConfig, SchedulerOutput, token_ids_of
from loraledger.inference.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from loraledger.inference.tokenizer import IncrementalDetokenizer, Tokenizer
from loraledger.kernels import to_device

log = logging.getLogger(__name__)

# ---- configuration and request / result types ----------------------------------------------------------


# Merge weights of one request must sum to 1 within this tolerance (they arrive as floats over gRPC).
MERGE_WEIGHT_TOLERANCE = 1e-6
# Longest wait of an idle step for adapters the store is loading in the background (seconds).
ADAPTER_LOAD_POLL_S = 0.05
# An output token still on the device (async_decode): it holds the sequence's place until its step is collected.
PLACEHOLDER = -1

@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs at start-up; validated once here.

    KV cache size: `num_blocks` if given, else `kv_cache_bytes`, else a default: on CUDA 80% of the memory
    free after loading the model; on CPU room for `max_num_seqs` full contexts, capped at 1 GiB.
    `max_model_len` caps the context below the model's own (None = the model's).
    """

    model_dir: str | Path
    dtype: str = "float32"
    device: str = "cpu"
    quantize: str = "none"  # "none" | "nf4": the base's projections in bitsandbytes 4-bit (QLoRA serving)
    block_size: int = 16
    kv_cache_bytes: int | None = None
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_tokens_per_step: int = 512
    attention_backend: str | None = None  # "torch" | "triton" | None = the device's default
    max_queue: int = 1024
    max_model_len: int | None = None
    seed: int = 0  # generator of unseeded sampled requests
    # "auto" | "off" | "static" | "graphs" (`loraledger.inference.graph_runner`): "auto" replays decode steps as CUDA
    # graphs on CUDA (unquantized base) and runs the plain step elsewhere; "static" is the same padded
    # fixed-shape step without capture (the CPU check of what a graph replays)
    decode_graphs: str = "auto"
    # intra-op threads torch uses on the background step thread (`start()`) on CPU. 1 by default: once another
    # thread (the one that loaded the model) has run a parallel torch op, every parallel region started from a
    # second thread pays a worker wake-up; measured on a 2-core machine, a small linear + silu took 155 us with
    # 2 threads against 9 us with 1, and a 20M model's decode step 20.0 ms against 17.4 ms (100M: equal)
    loop_cpu_threads: int = 1
    # when a step's text work (detokenizing, stop strings, streaming) runs: None = while the next step's kernels
    # run on CUDA, before the next step is scheduled on the CPU (see the module docstring); True / False force one
    overlap_text_work: bool | None = None
    # run each step before the previous step's tokens reach the host: the host schedules and builds step N+1
    # while the device runs step N, and each decode of N+1 takes its input token from N's samples on the
    # device. A row whose sequence ended at N (EOS, a stop id) is computed once more and dropped. None = on with
    # CUDA graphs, off elsewhere; True needs decode_graphs "static" or "graphs" (the graph runner keeps the
    # samples on the device), see `Engine._run`
    async_decode: bool | None = None

    def __post_init__(self) -> None:
        try:
            check_quantize_mode(self.quantize)
        except ValueError as e:
            raise EngineConfigError(f"EngineConfig.quantize: {e}") from e
        for name in ("block_size", "max_num_seqs", "max_tokens_per_step", "max_queue", "loop_cpu_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        for name in ("kv_cache_bytes", "num_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EngineConfigError(
                    f"EngineConfig.{name} must be a positive integer or None, got {value!r}"
                )
        if self.async_decode is not None and not isinstance(self.async_decode, bool):
            raise EngineConfigError(f"EngineConfig.async_decode must be True, False or None, got {self.async_decode!r}")
        if self.async_decode and self.graph_mode == "off":
            raise EngineConfigError(
                "EngineConfig.async_decode=True runs fixed-shape decode steps ahead; it needs decode_graphs 'static' "
                f"or 'graphs' (or 'auto' on CUDA), got decode_graphs={self.decode_graphs!r} on {self.device!r}"
            )
        if self.overlap_text_work is not None and not isinstance(self.overlap_text_work, bool):
            raise EngineConfigError(
                f"EngineConfig.overlap_text_work must be True, False or None, got {self.overlap_text_work!r}"
            )
        if self.decode_graphs not in ("auto", *GRAPH_MODES):
            raise EngineConfigError(
                f"EngineConfig.decode_graphs must be one of auto, {', '.join(GRAPH_MODES)}; got {self.decode_graphs!r}"
            )
        if self.decode_graphs == "graphs" and not self.device.startswith("cuda"):
            raise EngineConfigError(
                f"EngineConfig.decode_graphs='graphs' needs a CUDA device, got device={self.device!r}; use 'static' "
                "for the same fixed-shape step without capture, or 'auto'"
            )
        if self.decode_graphs == "graphs" and self.quantize != "none":
            raise EngineConfigError(
                f"CUDA graphs are not supported over a {self.quantize} base yet; use decode_graphs='auto' or 'off'"
            )
        if self.max_tokens_per_step < self.max_num_seqs:
            raise EngineConfigError(
                f"EngineConfig.max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running sequence can decode in every step"
            )

    @property
    def graph_mode(self) -> str:
        """`decode_graphs` with "auto" resolved: "graphs" on CUDA over an unquantized base, else "off"."""
        if self.decode_graphs != "auto":
            return self.decode_graphs
        return "graphs" if self.device.startswith("cuda") and self.quantize == "none" else "off"


@dataclass
class GenerationRequest:
    """One request: a prompt (text, or token ids), how to sample, which adapters (key, merge weight) to apply.

    `priority`: smaller is served first (default 0). `request_id`: unique among live requests; None = a uuid.
    """

    prompt: str | Seq[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    adapters: Seq[tuple[str, float]] = ()
    priority: int = 0


@dataclass(frozen=True)
class TokenDelta:
    """One generated token as streamed: its id, the new text it makes visible (may be ""), its logprob and
    top alternatives when the request asked for logprobs."""

    token_id: int
    text_delta: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The final word on one request."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapters: tuple[tuple[str, float], ...] = ()
    logprobs: tuple[float, ...] | None = None
    error: str | None = None  # why, when finish_reason == "error"


HandleItem = TokenDelta | GenerationResult
Wakes = dict[asyncio.AbstractEventLoop, list[asyncio.Event]]  # consumers to wake at the end of a step, by loop


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def _wake_all(wakes: Wakes) -> None:
    """One `call_soon_threadsafe` per consumer loop, setting every event queued for it this step."""
    for loop, events in wakes.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_set_all, events)


class RequestHandle:
    """The consumer's side of one request: an async iterator of `TokenDelta`s ending with one
    `GenerationResult`, or `result()` to block a plain thread until done. Filled by the engine thread."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.request_id = request_id
        self._engine = engine
        self._lock = threading.Lock()
        self._items: collections.deque[HandleItem] = collections.deque()
        self._final: GenerationResult | None = None
        self._done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._consumed_final = False
        self._wake_scheduled = False  # a wake.set is on its way to the consumer's loop

    # engine side
    def _push(self, item: HandleItem, wakes: Wakes | None = None) -> None:
        """Queue `item` for the consumer. Its loop is woken now, or, given `wakes`, once per loop for the whole
        step by `_wake_all(wakes)` (a cross-thread wake-up is a syscall and a GIL hand-over: one per step, not
        one per stream)."""
        with self._lock:
            self._items.append(item)
            if isinstance(item, GenerationResult):
                self._final = item
            loop, wake = self._loop, self._wake
            notify = not self._wake_scheduled  # one cross-thread wake-up per batch the consumer has not seen
            if loop is not None and notify:
                self._wake_scheduled = True
        if isinstance(item, GenerationResult):
            self._done.set()
        if loop is not None and wake is not None and notify and not loop.is_closed():
            if wakes is None:
                loop.call_soon_threadsafe(wake.set)
            else:
                wakes.setdefault(loop, []).append(wake)

    # consumer side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; return its result (needs the engine loop or someone stepping)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} not finished after {timeout} s")
        assert self._final is not None
        return self._final

    def cancel(self) -> bool:
        return self._engine.cancel(self.request_id)

    def drain_deltas_nowait(self) -> list[TokenDelta]:
        """The `TokenDelta`s already produced and not yet consumed, without waiting (the final result, if
        queued, stays for the next `__anext__`). Lets a streaming consumer send what piled up in one message."""
        out: list[TokenDelta] = []
        with self._lock:
            while self._items and isinstance(self._items[0], TokenDelta):
                out.append(self._items.popleft())  # type: ignore[arg-type]
        return out

    def __aiter__(self) -> AsyncIterator[HandleItem]:
        return self

    async def __anext__(self) -> HandleItem:
        if self._wake is None:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._wake = asyncio.Event()
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if isinstance(item, GenerationResult):
                        self._consumed_final = True
                    return item
                if self._consumed_final:
                    raise StopAsyncIteration
                self._wake.clear()
                self._wake_scheduled = False
            await self._wake.wait()


# ---- per-request engine state ----------------------------------------------------------------------------


class _Tracked:
    """Engine-side state of one live request: its sequence, handle, generator, text and stop tracking."""

    def __init__(
        self,
        seq: Sequence,
        handle: RequestHandle,
        detok: IncrementalDetokenizer,
        generator: torch.Generator | None,
    ) -> None:
        self.seq = seq
        self.handle = handle
        self.detok = detok
        self.generator = generator
        self.text = ""  # visible text so far (stop string trimmed)
        self.emitted = 0  # chars of self.text already streamed
        self.logprobs: list[float] = []
        self.max_stop = max((len(s) for s in seq.params.stop), default=0)

    def add_text(self, delta: str) -> bool:
        """Append decoded text; True if a stop string now appears (the text is cut just before it)."""
        if not delta:
            return False
        if not self.max_stop:  # no stop strings: nothing to search
            self.text += delta
            return False
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.seq.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def releasable(self, final: bool) -> str:
        """Text that can be streamed now: all of it when final, else all but a tail that could still grow
        into a stop string."""
        end = len(self.text)
        if not final:
            for k in range(min(self.max_stop - 1, end), 0, -1):
                tail = self.text[end - k :]
                if any(s.startswith(tail) for s in self.seq.params.stop):
                    end -= k
                    break
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


@dataclass(slots=True)
class _Output:
    """One sampled token recorded on its sequence, waiting for its text work (`Engine._finish_outputs`)."""

    t: _Tracked
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    reason: FinishReason | None  # what its ids alone decided: "stop" (stop id / EOS), "length", or None


@dataclass
class _Inflight:
    """A step run ahead (async_decode): its sampled rows' requests, each one's placeholder index in its
    sequence's output_ids (-1: none, it had finished), and the pending sample."""

    tracked: list[_Tracked]
    at: list[int]
    pending: PendingSample
    rows: dict[int, int] = field(init=False)  # seq_id -> its row of the pending sample

    def __post_init__(self) -> None:
        self.rows = {t.seq.seq_id: j for j, t in enumerate(self.tracked)}

    def source_row(self, chunk: SeqChunk) -> int:
        """The row of this step's samples holding `chunk`'s input token, or -1 when the chunk has its token."""
        if chunk.token_ids[-1] != PLACEHOLDER:  # a placeholder is always a sequence's last output
            return -1
        row = self.rows.get(chunk.seq_id)
        if row is None or len(chunk.token_ids) != 1:  # only a decode reads the token its last step sampled
            raise EngineError(f"sequence {chunk.seq_id} waits on a token of no step in flight")
        return row


def _needs_history(seqs: Iterable[Sequence]) -> bool:
    """Some sequence samples with a repetition penalty, which reads its token history on the host."""
    return any(s.params.repetition_penalty != 1.0 for s in seqs)


def _resolved(seq: Sequence, chunk: SeqChunk) -> SeqChunk:
    """`chunk` with its placeholder token replaced by the recorded one (after `Engine._collect`)."""
    if PLACEHOLDER not in chunk.token_ids:
        return chunk
    return replace(chunk, token_ids=token_ids_of(seq, chunk.start_pos, len(chunk.token_ids)))


# ---- the engine ------------------------------------------------------------------------------------------


class Engine:
    """Continuous-batching generation over one Llama-family model (see module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        adapter_slots: AdapterSlots | None = None,
        model: LlamaModel | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """Load model and tokenizer from `config.model_dir` (or take them ready-made); size the KV cache.

        `adapter_slots` is the adapter store's slot hook (None = base model only); install LoRA layers on
        `engine.model` before serving adapters.
        """
        self.config = config
        self.device = torch.device(config.device)
        dtype = parse_dtype(config.dtype)
        attention = get_attention_backend(config.attention_backend, self.device)
        self.model = (
            model if model is not None else load_model_quantized(config.model_dir, config.quantize, dtype, self.device, attention)
        )
        if model is not None and config.attention_backend is not None:
            self.model.set_attention_backend(config.attention_backend)
        self.model_config: ModelConfig = self.model.config
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_pretrained(config.model_dir)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.model_config.eos_token_ids
        )
        self.vocab_size = self.model_config.vocab_size
        self.max_model_len = self.model_config.max_context_len
        if config.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, config.max_model_len)

        num_blocks = self._num_blocks(dtype)
        graph_mode = config.graph_mode
        # fixed-shape decode steps pad with rows that write to a scratch block outside the pool
        extra = 0 if graph_mode == "off" else 1
        self.kv_cache = PagedKVCache.for_model(
            self.model_config, num_blocks + extra, config.block_size, dtype, self.device
        )
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.graphs: DecodeGraphRunner | None = None
        if graph_mode != "off":
            self.graphs = DecodeGraphRunner(
                self.model, self.kv_cache, scratch_block=num_blocks, max_batch=config.max_num_seqs,
                max_model_len=self.max_model_len, mode=graph_mode,
            )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_tokens_per_step),
            self.block_manager,
            adapter_slots,
        )
        self._generator = make_generator(config.seed, self.device)

        self._lock = threading.RLock()  # guards scheduler, cache and _live; held for a whole step
        self._wakeup = threading.Condition(threading.Lock())  # the loop sleeps here when idle
        self._incoming: collections.deque[_Tracked] = collections.deque()
        self._cancels: collections.deque[str] = collections.deque()
        self._live: dict[str, _Tracked] = {}  # request_id -> state, from submit until finished
        self._pending: list[_Output] = []  # the last step's tokens, streamed while the next step runs
        # Where that text work runs: on CUDA after the next step's kernels are queued (it overlaps them); on the
        # CPU, where the forward runs in this thread with the GIL released, before the next step is scheduled,
        # so that the consumers it wakes run during the forward rather than compete with the step's Python
        overlap = config.overlap_text_work
        self._overlap_outputs = self.device.type == "cuda" if overlap is None else bool(overlap)
        self._async = graph_mode == "graphs" if config.async_decode is None else config.async_decode
        self._inflight: _Inflight | None = None  # the step run ahead of the host, tokens not yet recorded
        self._seq_ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started_at = time.monotonic()
        self._recent: collections.deque[tuple[float, int, int]] = (
            collections.deque()
        )  # (time, prefill, decode)
        self._totals = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0, "steps_ahead": 0}

    def warm_up_graphs(self, merges: tuple[int, ...] = (0, 1)) -> int:
        """Capture the decode graphs of every batch bucket now (base-only steps, and steps with one adapter per
        sequence when the LoRA layers are installed) instead of on first use; returns how many were captured (0
        unless decode steps run as CUDA graphs). Call it after installing LoRA layers and before serving."""
        if self.graphs is None:
            return 0
        with self._lock:
            return self.graphs.warm_up(merges)

    def _num_blocks(self, dtype: torch.dtype) -> int:
        cfg = self.config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        budget = cfg.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.8)
            else:
                blocks_per_seq = -(-self.max_model_len // cfg.block_size)
                per_block = bytes_per_block(self.model_config, cfg.block_size, dtype)
                budget = min(cfg.max_num_seqs * blocks_per_seq * per_block, 1 << 30)
        return num_blocks_for_budget(self.model_config, cfg.block_size, budget, dtype)

    # ---- submitting ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate `request` and queue it; returns its handle. Never waits for a running step.

        Raises `InvalidRequestError` (empty or too long prompt, max_tokens over the context room, stop token
        id outside the vocabulary, unknown adapter, duplicate live request id, ...) or `CapacityError` when
        the queue is full. A refused request changes nothing for the others.
        """
        params = request.params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids = self._prompt_ids(request.prompt)
        params.check_for_model(len(prompt_ids), self.max_model_len, self.vocab_size)
        adapters = self._adapters(request.adapters)
        if not isinstance(request.priority, int) or isinstance(request.priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {request.priority!r}")
        request_id = request.request_id if request.request_id is not None else uuid.uuid4().hex
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            adapters=adapters,
            priority=request.priority,
            arrival_time=time.monotonic(),
        )
        self.scheduler.check_fits(seq)  # reads only constants and the adapter registry
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        handle = RequestHandle(self, request_id)
        tracked = _Tracked(seq, handle, self.tokenizer.detokenizer(prompt_ids), generator)
        with self._wakeup:
            if request_id in self._live:
                raise InvalidRequestError(f"request id {request_id!r} is already in flight; use a unique id")
            if len(self._live) >= self.config.max_queue + self.config.max_num_seqs:
                raise CapacityError(
                    f"the engine holds {len(self._live)} requests "
                    f"(max_queue={self.config.max_queue}); retry later"
                )
            self._live[request_id] = tracked
            self._incoming.append(tracked)
            self._wakeup.notify()
        return handle

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; send some text or token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                    raise InvalidRequestError(
                        f"prompt token {t!r} is not a token id of this model (0 <= id < {self.vocab_size})"
                    )
        if not ids:
            raise InvalidRequestError("the prompt is empty; send some text or token ids")
        return ids

    @staticmethod
    def _adapters(adapters: Seq[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        out = []
        for entry in adapters:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise InvalidRequestError(f"adapters must be (key, weight) pairs, got {entry!r}")
            key, weight = entry
            if not isinstance(key, str) or not key:
                raise InvalidRequestError(f"adapter key must be a non-empty string, got {key!r}")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InvalidRequestError(f"adapter {key!r}: weight must be a finite number, got {weight!r}")
            if weight <= 0:
                raise InvalidRequestError(f"adapter {key!r}: merge weight must be positive, got {weight!r}")
            out.append((key, float(weight)))
        keys = [k for k, _ in out]
        if len(set(keys)) != len(keys):
            raise InvalidRequestError(f"an adapter is named twice in {keys}; name each adapter once")
        total = sum(w for _, w in out)
        if out and abs(total - 1.0) > MERGE_WEIGHT_TOLERANCE:
            raise InvalidRequestError(
                f"adapter merge weights must sum to 1, got {total:.6g} for {keys}; "
                "normalise them (a single adapter takes weight 1)"
            )
        return tuple(out)

    def cancel(self, request_id: str) -> bool:
        """Finish `request_id` with reason "cancelled" and free its KV blocks: now when no step runs, else as
        soon as the running step ends. False if no such request is live."""
        with self._wakeup:
            if request_id not in self._live:
                return False
            self._cancels.append(request_id)
            self._wakeup.notify()
        if self._lock.acquire(blocking=False):
            try:
                self._take_inputs()
            finally:
                self._lock.release()
        return True

    def _take_inputs(self) -> None:
        """Move submitted requests into the scheduler and apply cancellations (under `_lock`)."""
        with self._wakeup:
            incoming = list(self._incoming)
            self._incoming.clear()
            cancels = list(self._cancels)
            self._cancels.clear()
        for tracked in incoming:
            try:
                self.scheduler.add(tracked.seq)
            except EngineError as e:  # e.g. its adapter was unloaded since submit: this request fails alone
                self.scheduler.mark_finished(tracked.seq, "error", str(e))
                self._emit_final(tracked)
        for request_id in cancels:
            victim = self._live.get(request_id)
            if victim is not None:
                self.scheduler.finish(victim.seq, "cancelled")
                self._emit_final(victim)

    # ---- stepping ------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._wakeup:
            return bool(self._live)

    def step(self) -> int:
        """Run one engine step; returns the number of tokens it ran through the model (0 = nothing to do)."""
        with self._lock:
            self._take_inputs()
            if not self._overlap_outputs:
                self._finish_outputs()  # before scheduling: a stop string found now spares its sequence a step
            out = self.scheduler.schedule()
            for seq in out.failed:
                self._emit_final(self._live[seq.request_id])
            self._totals["preemptions"] += len(out.preempted)
            if out.is_empty:
                if self._inflight is not None:  # every running sequence waits on it (each ends with it)
                    self._collect()
                self._finish_outputs()  # the last step's text work, with no step to overlap it with
                self._wait_for_adapter_loads()
                return 0
            self._run(out)
            return out.num_tokens

    def _wait_for_adapter_loads(self) -> None:
        """Nothing could run: when waiting requests only wait for adapters a background loader is reading,
        block briefly on those loads instead of spinning the step loop."""
        wait = getattr(self.scheduler.adapter_slots, "wait_for_loads", None)
        if wait is not None and self.scheduler.waiting:
            wait(ADAPTER_LOAD_POLL_S)

    def _run(self, out: SchedulerOutput) -> None:
        """Run one scheduled step: forward, sampling, and the tokens recorded on their sequences.

        With async_decode a step is not waited for: its tokens stay on the device (`_Inflight`) and each
        sampled sequence gets a PLACEHOLDER output, so that the next step can be scheduled and built while
        this one runs; that next step's decode rows read their input tokens on the device (the graph runner's
        `last_tokens`: `DecodeGraphRunner.run(token_sources=)`, or a gather into a plain batch's input_ids),
        and only then is this step's result read and recorded (`_collect`). A step whose sampling reads token
        histories (repetition penalty) collects the step ahead first and runs with the real tokens."""
        inflight = self._inflight
        graph_step = self.graphs is not None and self.graphs.fits(out.chunks)
        history = _needs_history(out.seqs)
        sources: list[int] | None = None
        if inflight is not None:
            if not history:
                sources = [inflight.source_row(c) for c in out.chunks]
            else:
                self._collect()
                inflight = None
                out.chunks = [_resolved(s, c) for s, c in zip(out.seqs, out.chunks, strict=True)]
        rows = [i for i, c in enumerate(out.chunks) if c.sample]
        logits: torch.Tensor | None = None  # [R, V] float32 at the sampled rows
        if self.graphs is not None and graph_step:
            all_logits = self.graphs.run(out.chunks, sources)  # [B, V]: a fixed-shape step (a CUDA graph replay)
            if rows:
                logits = all_logits if len(rows) == len(out.chunks) else all_logits[rows]
        else:
            batch = build_batch(out.chunks, self.config.block_size, self.device)
            if sources is not None and self.graphs is not None and any(r >= 0 for r in sources):
                self._take_tokens(batch.input_ids, out.chunks, sources, self.graphs.last_tokens)
            hidden = self.model(batch, self.kv_cache)  # [T, H]
            if rows:
                row_idx = batch.logits_indices[to_device(rows, torch.int64, self.device)]
                logits = self.model.compute_logits(hidden[row_idx])  # [R, V] float32
        tracked = [self._live[out.seqs[i].request_id] for i in rows]  # before a stop string may end some
        if self._overlap_outputs and inflight is None:
            # the step's kernels are queued on the GPU and run until `sample` reads the logits: meanwhile the
            # previous step's tokens get their text work and are streamed
            self._finish_outputs()
        self.scheduler.advance(out)
        self._count(out.num_tokens - out.num_decodes, len(rows))
        pending: PendingSample | None = None
        if logits is not None:
            requests = [
                SampleRequest(
                    t.seq.params, t.seq.all_ids if t.seq.params.repetition_penalty != 1.0 else [], t.generator
                )
                for t in tracked
            ]
            pending = sample_start(logits, requests, self._generator)
        ahead = pending is not None and self._async and not history
        if ahead and self.graphs is not None and pending is not None:
            self.graphs.keep_tokens(pending.chosen)  # where the next step's rows find their input tokens
        if inflight is not None:
            self._collect()  # the previous step's tokens: done on the device, or about to (this step queues behind)
            if self._overlap_outputs:
                self._finish_outputs()
        if pending is None:
            return
        if ahead:
            self._inflight = self._hold_places(tracked, pending)
            self._totals["steps_ahead"] += 1
            return
        self._record_sampled(tracked, pending.result())

    def _take_tokens(self, input_ids: torch.Tensor, chunks: list[SeqChunk], sources: list[int],
                     last_tokens: torch.Tensor) -> None:
        """Put the step ahead's samples into a plain batch's flat input_ids, on the device: chunk i with
        sources[i] >= 0 is a decode whose one token is last_tokens[sources[i]]."""
        flat, src, start = [], [], 0
        for c, r in zip(chunks, sources, strict=True):
            if r >= 0:
                flat.append(start)
                src.append(r)
            start += len(c.token_ids)
        input_ids[to_device(flat, torch.int64, self.device)] = last_tokens[to_device(src, torch.int64, self.device)]

    def _hold_places(self, tracked: list[_Tracked], pending: PendingSample) -> _Inflight:
        """A PLACEHOLDER output for each sampled sequence of a step run ahead. A sequence this token ends by
        length is held out of the next step (the scheduler skips it) until `_collect` finishes it."""
        at: list[int] = []
        for t in tracked:
            seq = t.seq
            if seq.status is SequenceStatus.FINISHED:
                at.append(-1)
                continue
            n = len(seq.output_ids)
            at.append(n)
            seq.output_ids.append(PLACEHOLDER)
            if n + 1 >= seq.params.max_tokens or len(seq.prompt_ids) + n + 1 >= self.max_model_len:
                seq.held = True
        return _Inflight(tracked, at, pending)

    def _collect(self) -> None:
        """Read the tokens of the step run ahead (waits for it on the device) and record them in place of
        their placeholders; a sequence finished since (cancel, stop string) drops its token."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        self._record_sampled(inflight.tracked, inflight.pending.result(), inflight.at)

    def _record_sampled(self, tracked: list[_Tracked], result: SampleOutput, at: list[int] | None = None) -> None:
        """`_record` each row's token (at its placeholder `at[j]` when given; -1: none). A sequence finished
        meanwhile (a stop string of its previous token, a cancel) drops it: that token is void."""
        for j, t in enumerate(tracked):
            if t.seq.status is SequenceStatus.FINISHED or (at is not None and at[j] < 0):
                continue
            top = result.top_logprobs[j]
            self._record(t, result.token_ids[j], result.logprobs[j], tuple(top) if top is not None else None,
                         at=None if at is None else at[j])

    def _record(
        self, t: _Tracked, token: int, logprob: float | None, top: tuple[tuple[int, float], ...] | None,
        at: int | None = None,
    ) -> None:
        """Add one sampled token to its sequence (or put it at output index `at`, its placeholder) and end the
        sequence now if its ids say so (a stop token id, EOS, max_tokens, the context): the next step is
        scheduled without it and its KV blocks are free. The text work (detokenizing, stop strings,
        streaming) waits in `_pending` for `_finish_outputs`."""
        seq, params = t.seq, t.seq.params
        if at is None:
            seq.output_ids.append(token)
            n = len(seq.output_ids)
        else:
            seq.output_ids[at] = token
            n = at + 1
        if logprob is not None:
            t.logprobs.append(logprob)
        reason: FinishReason | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif n >= params.max_tokens or len(seq.prompt_ids) + n >= self.max_model_len:
            reason = "length"
        if reason is not None:
            del seq.output_ids[n:]  # the placeholder of a step run after this one: that token is void
            self.scheduler.finish(seq, reason)
        self._pending.append(_Output(t, token, logprob, top, reason))

    def _finish_outputs(self) -> None:
        """The text work of the tokens `_record` left in `_pending`, in order; one wake-up per consumer loop."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        wakes: Wakes = {}
        try:
            for o in pending:
                if o.t.handle.done:
                    continue  # cancelled or failed since: its answer is what was streamed
                self._append(o, wakes)
        finally:
            _wake_all(wakes)

    def _append(self, o: _Output, wakes: Wakes) -> None:
        """Stream one recorded token and finish its sequence if it ended (by its ids, or by a stop string)."""
        t, seq, reason = o.t, o.t.seq, o.reason
        if reason == "stop":  # a stop token or EOS: its own text is not part of the answer, the held-back text is
            t.add_text(t.detok.flush())
        elif t.add_text(t.detok.push(o.token)):
            if reason is None:
                self.scheduler.finish(seq, "stop")  # it may be in the step now running: that token is void
            else:
                self.scheduler.mark_finished(seq, "stop")  # a stop string in its last token wins over length
            reason = "stop"
        elif reason == "length":
            t.add_text(t.detok.flush())
        t.handle._push(TokenDelta(o.token, t.releasable(final=reason is not None), o.logprob, o.top), wakes)
        if reason is not None:
            self._emit_final(t, wakes)

    def _emit_final(self, t: _Tracked, wakes: Wakes | None = None) -> None:
        seq = t.seq
        assert seq.finish_reason is not None
        if seq.finish_reason in ("cancelled", "error"):
            t.text = t.text[: t.emitted]  # the answer is what was streamed: a held-back tail is dropped
        outputs = tuple(i for i in seq.output_ids if i != PLACEHOLDER)  # a token still on the device is void
        with self._wakeup:
            self._live.pop(seq.request_id, None)
        t.handle._push(
            GenerationResult(
                request_id=seq.request_id,
                text=t.text,
                token_ids=outputs,
                finish_reason=seq.finish_reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(outputs),
                adapters=seq.adapters,
                logprobs=tuple(t.logprobs) if seq.params.logprobs is not None else None,
                error=seq.error,
            ),
            wakes,
        )

    def _fail_all(self, message: str) -> None:
        """After a failed step: finish every live request with reason "error" (their cache state is lost)."""
        with self._lock:
            self._pending.clear()
            self._inflight = None
            self._take_inputs()
            for t in list(self._live.values()):
                self.scheduler.finish(t.seq, "error", message)
                self._emit_final(t)

    # ---- background loop -----------------------------------------------------------------------------
    def start(self) -> None:
        """Run the step loop on a daemon thread until `shutdown()`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="loraledger-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.config.loop_cpu_threads)  # this thread's parallel regions only
        while True:
            with self._wakeup:
                while not self._stopping and not self._live:
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except (EngineError, RuntimeError, ValueError) as e:  # a broken step must not hang every client
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")

    def shutdown(self) -> None:
        """Stop the loop (the step in progress completes); live requests are cancelled."""
        thread = self._thread
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if thread is not None:
            thread.join()
        self._thread = None
        with self._lock:
            self._collect()  # a step run ahead: its tokens are decided, so they are delivered too
            self._finish_outputs()  # what the last step decided is delivered; the rest is cancelled
            self._take_inputs()
            for t in list(self._live.values()):
                self.scheduler.finish(t.seq, "cancelled")
                self._emit_final(t)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- synchronous use -----------------------------------------------------------------------------
    def generate(
        self, prompts: Iterable[str | Seq[int] | GenerationRequest], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """Run the given prompts or requests to completion and return their results in order.

        Every request is validated before any is queued (a bad one raises and none runs). Steps the engine
        itself unless the background loop runs.
        """
        requests = [
            p if isinstance(p, GenerationRequest) else GenerationRequest(p, params or SamplingParams())
            for p in prompts
        ]
        for r in requests:  # validate all first
            ids = self._prompt_ids(r.prompt)
            r.params.check_for_model(len(ids), self.max_model_len, self.vocab_size)
        handles = [self.submit(r) for r in requests]
        if self._thread is None:
            while not all(h.done for h in handles):
                self.step()
        return [h.result() for h in handles]

    # ---- stats ---------------------------------------------------------------------------------------
    def _count(self, prefill: int, decode: int) -> None:
        now = time.monotonic()
        self._totals["steps"] += 1
        self._totals["prompt_tokens"] += prefill
        self._totals["generated_tokens"] += decode
        self._recent.append((now, prefill, decode))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()

    def stats(self) -> dict[str, float | int]:
        """running, waiting, kv_blocks_used/total, tokens/s over the last 10 s (prefill, generated), totals"""
        with self._wakeup:
            incoming = len(self._incoming)
            recent = list(self._recent)
        window = (recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0.0
        window = max(window, 1e-9)
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting + incoming,
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "graph_steps": self.graphs.steps if self.graphs is not None else 0,
            "graph_captures": self.graphs.captures if self.graphs is not None else 0,
            "prefill_tokens_per_s": sum(r[1] for r in recent[1:]) / window if len(recent) > 1 else 0.0,
            "generated_tokens_per_s": sum(r[2] for r in recent[1:]) / window if len(recent) > 1 else 0.0,
            **self._totals,
        }
