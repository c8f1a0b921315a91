"""The `Engine`: requests in, streamed tokens and results out; one model, one paged KV cache, one scheduler.

    engine = Engine(EngineConfig(model_dir="..."))
    handle = engine.submit(GenerationRequest("Hello", SamplingParams(max_tokens=32)))   # validated here
    async for item in handle: ...          # TokenDelta, TokenDelta, ..., then one GenerationResult
    engine.generate(["a", "b"], params)    # synchronous, for scripts and tests

Requests, results and handles: `loraledger.inference.requests`; the configuration:
`loraledger.inference.engine_config`; a request's adapters arrive checked (`loraledger.inference.adapter_mix`).

One step (`step()`): take new requests and cancellations in; ask the scheduler for this step's chunks;
`build_batch` them (or fill the fixed-shape buffers a CUDA graph replays, `loraledger.inference.graph_runner`); one model
forward over the flat batch; logits at the sampled rows, `sample`, and each token is recorded on its sequence,
which ends at once when its ids say so (EOS, stop token ids, max_tokens, the context): it leaves the next step
and its KV blocks return to the pool. The text work of those tokens (detokenizing, stop strings, streaming,
final results; `loraledger.inference.text_stream`) runs in the next step: on CUDA while its kernels run (a stop
string is then found one step late, and the extra token computed for that sequence is dropped: its answer ends
at the token that completed the stop string); on the CPU before it is scheduled.

With `async_decode` (on with CUDA graphs) a step is not waited for: step N+1 is scheduled and built while the
device runs step N, its decodes read their input tokens from N's samples on the device, and N's tokens are
recorded after N+1 is queued (`Engine._run`, `loraledger.inference.async_decode`). Placeholders hold the
sequences' places meanwhile.

Threads: `start()` runs the step loop on a background thread (torch releases the GIL in the forward); every
public method is thread-safe. Handles deliver to the asyncio loop that iterates them, and to plain threads
through `handle.result()`. Without `start()` nothing runs unless someone calls `step()` (or `generate`, which
steps itself): the deterministic mode of the tests.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Self

import torch

from loraledger.inference.async_decode import Inflight, needs_history, recorded_outputs, resolved, take_tokens
from loraledger.inference.attention import get_attention_backend
from loraledger.inference.batch import build_batch
from loraledger.inference.block_manager import BlockManager
from loraledger.inference.config import ModelConfig, parse_dtype
from loraledger.inference.engine_config import EngineConfig, kv_cache_blocks
from loraledger.inference.errors import CapacityError, EngineError, InvalidRequestError
from loraledger.inference.graph_runner import DecodeGraphRunner
from loraledger.inference.kv_cache import PagedKVCache
from loraledger.inference.model import LlamaModel
from loraledger.inference.quant import load_model_quantized
from loraledger.inference.requests import (
    GenerationRequest,
    GenerationResult,
    RequestHandle,
    TokenDelta,
    Wakes,
    wake_all,
)
from loraledger.inference.sampling import (
    PendingSample,
    SampleOutput,
    SampleRequest,
    make_generator,
    sample_start,
)
from loraledger.inference.scheduler import AdapterSlots, Scheduler, SchedulerConfig, SchedulerOutput
from loraledger.inference.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from loraledger.inference.step_stats import StepStats
from loraledger.inference.text_stream import TextStream
from loraledger.inference.tokenizer import Tokenizer
from loraledger.kernels import to_device

log = logging.getLogger(__name__)

# Longest wait of an idle step for adapters the store is loading in the background (seconds).
ADAPTER_LOAD_POLL_S = 0.05


@dataclass(slots=True, eq=False)
class _Tracked:
    """Engine-side state of one live request: its sequence, handle, text, sampling generator and logprobs."""

    seq: Sequence
    handle: RequestHandle
    text: TextStream
    generator: torch.Generator | None
    logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Output:
    """One sampled token recorded on its sequence, waiting for its text work (`Engine._finish_outputs`)."""

    t: _Tracked
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    reason: FinishReason | None  # what its ids alone decided: "stop" (stop id / EOS), "length", or None


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

        num_blocks = kv_cache_blocks(config, self.model_config, self.max_model_len, dtype, self.device)
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
        self.scheduler = Scheduler(SchedulerConfig.from_engine(config), self.block_manager, adapter_slots)
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
        self._inflight: Inflight[_Tracked] | None = None  # the step run ahead, its tokens not yet recorded
        self._seq_ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = StepStats()

    def warm_up_graphs(self, merges: tuple[int, ...] = (0, 1)) -> int:
        """Capture the decode graphs of every batch bucket now (base-only steps, and steps with one adapter per
        sequence when the LoRA layers are installed) instead of on first use; returns how many were captured (0
        unless decode steps run as CUDA graphs). Call it after installing LoRA layers and before serving."""
        if self.graphs is None:
            return 0
        with self._lock:
            return self.graphs.warm_up(merges)

    # ---- submitting ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate `request` and queue it; returns its handle. Never waits for a running step.

        Raises `InvalidRequestError` (empty or too long prompt, max_tokens over the context room, stop token
        id outside the vocabulary, duplicate live request id, ...), `AdapterNotFoundError` (an adapter the
        engine does not know) or `CapacityError` when the queue is full. The request's `AdapterMix` is trusted
        as built. A refused request changes nothing for the others.
        """
        params = request.params
        prompt_ids = self._prompt_ids(request)
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
            adapters=request.adapters,
            priority=request.priority,
            arrival_time=time.monotonic(),
        )
        self.scheduler.check_fits(seq)  # reads only constants and the adapter registry
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        handle = RequestHandle(request_id, self.cancel)
        text = TextStream(self.tokenizer.detokenizer(prompt_ids), params.stop)
        tracked = _Tracked(seq, handle, text, generator)
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

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; `InvalidRequestError` unless they and the sampling params fit this model."""
        prompt, params = request.prompt, request.params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
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
        params.check_for_model(len(ids), self.max_model_len, self.vocab_size)
        return ids

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
            self._stats.totals["preemptions"] += len(out.preempted)
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

        With async_decode a step is not waited for (`loraledger.inference.async_decode`): its tokens stay on
        the device and each sampled sequence holds a placeholder output; the next step's decode rows read
        their input tokens on the device (`DecodeGraphRunner.run(token_sources=)`, or `take_tokens` into a
        plain batch), and only then is this step's result read and recorded (`_collect`). A step whose sampling reads token
        histories (repetition penalty) collects the step ahead first and runs with the real tokens."""
        inflight = self._inflight
        graph_step = self.graphs is not None and self.graphs.fits(out.chunks)
        history = needs_history(out.seqs)
        sources: list[int] | None = None
        if inflight is not None:
            if not history:
                sources = [inflight.source_row(c) for c in out.chunks]
            else:
                self._collect()
                inflight = None
                out.chunks = [resolved(s, c) for s, c in zip(out.seqs, out.chunks, strict=True)]
        rows = [i for i, c in enumerate(out.chunks) if c.sample]
        logits: torch.Tensor | None = None  # [R, V] float32 at the sampled rows
        if self.graphs is not None and graph_step:
            all_logits = self.graphs.run(out.chunks, sources)  # [B, V]: a fixed-shape step (a CUDA graph replay)
            if rows:
                logits = all_logits if len(rows) == len(out.chunks) else all_logits[rows]
        else:
            batch = build_batch(out.chunks, self.config.block_size, self.device)
            if sources is not None and self.graphs is not None and any(r >= 0 for r in sources):
                take_tokens(batch.input_ids, out.chunks, sources, self.graphs.last_tokens)
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
        self._stats.count_step(out.num_tokens - out.num_decodes, len(rows))
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
            self._inflight = Inflight.hold(tracked, pending, self.max_model_len)
            self._stats.totals["steps_ahead"] += 1
            return
        self._record_sampled(tracked, pending.result())

    def _collect(self) -> None:
        """Read the tokens of the step run ahead (waits for it on the device) and record them in place of
        their placeholders; a sequence finished since (cancel, stop string) drops its token."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        self._record_sampled(inflight.rows, inflight.pending.result(), inflight.at)

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
        elif seq.ends_by_length(n, self.max_model_len):
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
            wake_all(wakes)

    def _append(self, o: _Output, wakes: Wakes) -> None:
        """Stream one recorded token and finish its sequence if it ended (by its ids, or by a stop string)."""
        t, seq, reason, text = o.t, o.t.seq, o.reason, o.t.text
        if reason == "stop":  # a stop token or EOS: its own text is not part of the answer, the held-back text is
            text.flush()
        elif text.push(o.token):
            if reason is None:
                self.scheduler.finish(seq, "stop")  # it may be in the step now running: that token is void
            else:
                self.scheduler.mark_finished(seq, "stop")  # a stop string in its last token wins over length
            reason = "stop"
        elif reason == "length":
            text.flush()
        t.handle.push(TokenDelta(o.token, text.release(final=reason is not None), o.logprob, o.top), wakes)
        if reason is not None:
            self._emit_final(t, wakes)

    def _emit_final(self, t: _Tracked, wakes: Wakes | None = None) -> None:
        seq = t.seq
        assert seq.finish_reason is not None
        if seq.finish_reason in ("cancelled", "error"):
            t.text.drop_held()  # the answer is what was streamed: a held-back tail is dropped
        outputs = recorded_outputs(seq)  # a token still on the device is void
        with self._wakeup:
            self._live.pop(seq.request_id, None)
        t.handle.push(
            GenerationResult(
                request_id=seq.request_id,
                text=t.text.text,
                token_ids=outputs,
                finish_reason=seq.finish_reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(outputs),
                adapters=seq.adapters.pairs,
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
            self._prompt_ids(r)
        handles = [self.submit(r) for r in requests]
        if self._thread is None:
            while not all(h.done for h in handles):
                self.step()
        return [h.result() for h in handles]

    # ---- stats ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """running, waiting, kv_blocks_used/total, graph steps and captures, tokens/s over the last 10 s
        (prefill, generated), totals (`StepStats`)"""
        with self._wakeup:
            incoming = len(self._incoming)
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting + incoming,
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "graph_steps": self.graphs.steps if self.graphs is not None else 0,
            "graph_captures": self.graphs.captures if self.graphs is not None else 0,
            **self._stats.rates(),
            **self._stats.totals,
        }
