"""The engine end to end on the tiny fp32 model: greedy tokens equal transformers' and do not depend on the
batch, seeds repeat, stop strings/ids, cancel, preemption, bad requests, async streaming, no KV leak."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.errors import (
    AdapterMismatchError,
    AdapterNotFoundError,
    CapacityError,
    EngineConfigError,
    InvalidRequestError,
)
from loraledger.inference.loader import load_model
from loraledger.inference.model import LlamaModel
from loraledger.inference.requests import GenerationRequest, GenerationResult, TokenDelta
from loraledger.inference.sequence import SamplingParams
from loraledger.inference.tokenizer import Tokenizer

PROMPTS = [
    "Hello",
    "The ledger pays the contributors behind each answer",
    "a",
    "LoRA adapters are small and many of them share one GPU",
    "Every record is provable against a root on chain, and every contributor can withdraw",
    "tokens",
    "One forward over a flat batch of tokens from many sequences",
    "The scheduler admits new requests between steps while others decode",
]
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def make_engine(model_dir: Path, model: LlamaModel, tok: Tokenizer, **kw: object) -> Engine:
    cfg = {"block_size": 4, "max_num_seqs": 8, "max_tokens_per_step": 64, "num_blocks": 256, **kw}
    return Engine(EngineConfig(model_dir=model_dir, **cfg), model=model, tokenizer=tok)  # type: ignore[arg-type]


@pytest.fixture(params=[False, True], ids=["text-work-before-step", "text-work-overlapped"])
def engine(tiny_model_dir: Path, tiny_model: LlamaModel, tokenizer: Tokenizer,
           request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The engine with its text work before each step is scheduled (the CPU default) and overlapped with the
    step's forward (the CUDA default), so both orders are held to the same results."""
    eng = make_engine(tiny_model_dir, tiny_model, tokenizer, overlap_text_work=request.param)
    yield eng
    assert_clean(eng)


def assert_clean(eng: Engine) -> None:
    """Every KV block back in the pool, nothing left in the scheduler."""
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.block_manager.check_invariants()
    assert not eng.scheduler.has_work() and not eng.has_work()


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir: Path, tokenizer: Tokenizer) -> list[list[int]]:
    """transformers' greedy continuation of each prompt run alone (no padding), MAX_NEW tokens, no EOS."""
    from transformers import GenerationConfig, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gc = GenerationConfig(
        max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    out = []
    for p in PROMPTS:
        ids = torch.tensor([tokenizer.encode(p)])
        with torch.no_grad():
            gen = hf.generate(ids, generation_config=gc)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def tokens(results: list[GenerationResult]) -> list[list[int]]:
    return [list(r.token_ids) for r in results]


def test_greedy_equals_transformers_run_together(engine: Engine, hf_greedy: list[list[int]]) -> None:
    assert len({len(engine.tokenizer.encode(p)) for p in PROMPTS}) >= 6  # really different lengths
    results = engine.generate(PROMPTS, GREEDY)
    assert tokens(results) == hf_greedy
    for r, p in zip(results, PROMPTS):
        assert r.finish_reason == "length" and r.completion_tokens == MAX_NEW
        assert r.prompt_tokens == len(engine.tokenizer.encode(p))
        assert r.text == engine.tokenizer.decode(r.token_ids)


def test_greedy_same_alone_and_staggered_with_chunked_prefill(
    tiny_model_dir: Path, tiny_model: LlamaModel, tokenizer: Tokenizer, hf_greedy: list[list[int]]
) -> None:
    eng = make_engine(tiny_model_dir, tiny_model, tokenizer, max_tokens_per_step=9)  # forces prompt chunks
    alone = [tokens(eng.generate([p], GREEDY))[0] for p in PROMPTS]
    assert alone == hf_greedy
    handles = []
    chunked = False
    for i, p in enumerate(PROMPTS):  # two new requests arrive every step
        handles.append(eng.submit(GenerationRequest(p, GREEDY, request_id=f"s{i}")))
        if i % 2 == 1:
            eng.step()
            chunked |= any(s.num_computed < len(s.prompt_ids) for s in eng.scheduler.running)
    while eng.has_work():
        eng.step()
    assert chunked
    assert [list(h.result().token_ids) for h in handles] == hf_greedy
    assert_clean(eng)


def test_seeded_sampling_repeats_in_any_batch(engine: Engine) -> None:
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    alone = engine.generate([PROMPTS[1]], seeded)[0]
    noisy = SamplingParams(temperature=1.2, max_tokens=12, ignore_eos=True)
    mixed = engine.generate(
        [
            GenerationRequest(PROMPTS[0], noisy),
            GenerationRequest(PROMPTS[1], seeded),
            GenerationRequest(PROMPTS[3], noisy),
        ]
    )
    assert mixed[1].token_ids == alone.token_ids and mixed[1].text == alone.text
    other = engine.generate(
        [PROMPTS[1]],
        SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=8, max_tokens=12, ignore_eos=True),
    )[0]
    assert other.token_ids != alone.token_ids


def test_stop_string_and_stop_token(engine: Engine) -> None:
    full = engine.generate([PROMPTS[4]], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    text = full.text
    k = len(text) // 2
    stop = text[k : k + 2]
    cut = text.find(stop)
    handle = engine.submit(
        GenerationRequest(
            PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00zz"])
        )
    )
    while engine.has_work():
        engine.step()
    res = handle.result()
    assert res.finish_reason == "stop" and res.text == text[:cut]
    assert res.token_ids == full.token_ids[: len(res.token_ids)] and len(res.token_ids) < 24
    streamed = "".join(i.text_delta for i in handle._items if isinstance(i, TokenDelta))
    assert streamed == res.text

    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    res2 = engine.generate(
        [PROMPTS[4]],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id]),
    )[0]
    assert res2.finish_reason == "stop" and res2.token_ids == full.token_ids[: first + 1]


def test_eos_stops_unless_ignored(engine: Engine) -> None:
    full = engine.generate([PROMPTS[6]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    eos = full.token_ids[4]  # declare a token the model surely emits as this engine's EOS
    first = full.token_ids.index(eos)
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({eos})
    try:
        res = engine.generate([PROMPTS[6]], SamplingParams(temperature=0.0, max_tokens=20))[0]
        ignored = engine.generate(
            [PROMPTS[6]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        )[0]
    finally:
        engine.eos_token_ids = saved
    assert res.finish_reason == "stop" and res.token_ids == full.token_ids[: first + 1]
    assert res.text == engine.tokenizer.decode(full.token_ids[:first])  # the EOS text is not in the answer
    assert ignored.finish_reason == "length" and ignored.token_ids == full.token_ids


def test_cancel_midway_frees_blocks_and_others_finish(engine: Engine, hf_greedy: list[list[int]]) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    h_cancel = engine.submit(GenerationRequest(PROMPTS[3], long, request_id="victim"))
    others = [engine.submit(GenerationRequest(p, GREEDY)) for p in PROMPTS[:3]]
    for _ in range(3):
        engine.step()
    used_before = engine.block_manager.num_used_blocks
    victim_blocks = len(
        engine.block_manager.block_table(
            next(s.seq_id for s in engine.scheduler.running if s.request_id == "victim")
        )
    )
    assert engine.cancel("victim")
    assert engine.block_manager.num_used_blocks == used_before - victim_blocks  # freed at once
    res = h_cancel.result(timeout=0)
    assert res.finish_reason == "cancelled" and 0 < res.completion_tokens < 40
    assert not engine.cancel("victim")
    while engine.has_work():
        engine.step()
    assert [list(h.result().token_ids) for h in others] == hf_greedy[:3]


def test_preemption_in_a_tiny_pool_keeps_greedy_output(
    tiny_model_dir: Path, tiny_model: LlamaModel, tokenizer: Tokenizer, hf_greedy: list[list[int]]
) -> None:
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS) + MAX_NEW
    eng = make_engine(tiny_model_dir, tiny_model, tokenizer, num_blocks=-(-longest // 4) + 2)
    results = eng.generate(PROMPTS, GREEDY)
    assert eng.stats()["preemptions"] > 0
    assert tokens(results) == hf_greedy
    assert_clean(eng)


def test_bad_requests_fail_clearly_and_others_finish(engine: Engine, hf_greedy: list[list[int]]) -> None:
    good = [engine.submit(GenerationRequest(p, GREEDY)) for p in PROMPTS[:2]]
    bad: list[tuple[object, type[Exception], str]] = [
        (lambda: GenerationRequest(""), InvalidRequestError, "prompt is empty"),
        (lambda: GenerationRequest([]), InvalidRequestError, "prompt is empty"),
        (lambda: GenerationRequest([5] * 600), InvalidRequestError, "shorten the prompt"),
        (
            lambda: GenerationRequest([5] * 500, SamplingParams(max_tokens=100)),
            InvalidRequestError,
            "lower max_tokens",
        ),
        (
            lambda: GenerationRequest("hi", SamplingParams(max_tokens=0)),
            InvalidRequestError,
            "max_tokens must be",
        ),
        (
            lambda: GenerationRequest("hi", SamplingParams(temperature=-1.0)),
            InvalidRequestError,
            "temperature",
        ),
        (lambda: GenerationRequest("hi", SamplingParams(top_p=0.0)), InvalidRequestError, "top_p must be in"),
        (
            lambda: GenerationRequest("hi", SamplingParams(stop_token_ids=[99999])),
            InvalidRequestError,
            "stop token id 99999 is not in the vocabulary",
        ),
        (lambda: GenerationRequest([1, 100000]), InvalidRequestError, "not a token id"),
        (lambda: GenerationRequest("hi", adapters=[("ghost", 1.0)]), AdapterNotFoundError, "base model only"),
        (lambda: GenerationRequest("hi", adapters=[("ghost", float("nan"))]), InvalidRequestError, "finite"),
        (lambda: GenerationRequest("hi", adapters=[("a", 0.5), ("b", -0.5)]), InvalidRequestError, "positive"),
        (lambda: GenerationRequest("hi", adapters=[("a", 0.5), ("b", 0.4)]), InvalidRequestError, "sum to 1"),
        (lambda: GenerationRequest("hi", adapters=[("a", 0.5), ("a", 0.5)]), InvalidRequestError, "twice"),
    ]
    for make, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            engine.submit(make())  # type: ignore[operator]
    with pytest.raises(InvalidRequestError, match="already in flight"):
        engine.submit(GenerationRequest("x", GREEDY, request_id=good[0].request_id))
    while engine.has_work():
        engine.step()
    assert [list(h.result().token_ids) for h in good] == hf_greedy[:2]


def test_queue_limit_and_config_errors(
    tiny_model_dir: Path, tiny_model: LlamaModel, tokenizer: Tokenizer
) -> None:
    eng = make_engine(
        tiny_model_dir, tiny_model, tokenizer, max_queue=1, max_num_seqs=1, max_tokens_per_step=8
    )
    eng.submit(GenerationRequest("a", GREEDY))
    eng.submit(GenerationRequest("b", GREEDY))
    with pytest.raises(CapacityError, match="retry later"):
        eng.submit(GenerationRequest("c", GREEDY))
    while eng.has_work():
        eng.step()
    assert_clean(eng)
    with pytest.raises(EngineConfigError, match="max_tokens_per_step"):
        EngineConfig(model_dir=tiny_model_dir, max_num_seqs=8, max_tokens_per_step=4)
    with pytest.raises(EngineConfigError, match="block_size"):
        EngineConfig(model_dir=tiny_model_dir, block_size=0)


def test_async_streaming_on_background_thread(engine: Engine, hf_greedy: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)

    async def consume(prompt: str) -> tuple[list[TokenDelta], GenerationResult]:
        deltas: list[TokenDelta] = []
        final = None
        async for item in engine.submit(GenerationRequest(prompt, params)):
            if isinstance(item, TokenDelta):
                deltas.append(item)
            else:
                final = item
        assert final is not None
        return deltas, final

    async def main() -> list[tuple[list[TokenDelta], GenerationResult]]:
        return await asyncio.gather(*(consume(p) for p in PROMPTS[:4]))

    engine.start()
    try:
        outs = asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.shutdown()
    for (deltas, final), ref in zip(outs, hf_greedy):
        assert list(final.token_ids) == ref == [d.token_id for d in deltas]
        assert "".join(d.text_delta for d in deltas) == final.text
        assert final.logprobs is not None and len(final.logprobs) == MAX_NEW
        assert all(d.top_logprobs is not None and len(d.top_logprobs) == 2 for d in deltas)
        assert all(lp <= 0 for lp in final.logprobs)
    assert stats["generated_tokens"] >= 4 * MAX_NEW and stats["kv_blocks_total"] == 256


class OneBrokenAdapter:
    """AdapterSlots with one known adapter, "broken", whose load fails (as a hash mismatch would)."""

    @property
    def num_slots(self) -> int:
        return 1

    def validate(self, keys: Sequence[str]) -> None:
        if any(k != "broken" for k in keys):
            raise AdapterNotFoundError(f"unknown adapters in {list(keys)}")

    def acquire(self, keys: Sequence[str]) -> tuple[int, ...] | None:
        raise AdapterMismatchError("adapter 'broken': weights hash 0x00.. is not the registered one")

    def release(self, keys: Sequence[str]) -> None:
        raise AssertionError("never acquired, so never released")

    def prefetch(self, keys: Sequence[str]) -> None:
        return None


def test_adapter_load_failure_fails_that_request_only(
    tiny_model_dir: Path, tiny_model: LlamaModel, tokenizer: Tokenizer, hf_greedy: list[list[int]]
) -> None:
    eng = Engine(
        EngineConfig(
            model_dir=tiny_model_dir, block_size=4, num_blocks=64, max_num_seqs=4, max_tokens_per_step=64
        ),
        adapter_slots=OneBrokenAdapter(),
        model=tiny_model,
        tokenizer=tokenizer,
    )
    with pytest.raises(AdapterNotFoundError, match="unknown adapters"):
        eng.submit(GenerationRequest("hi", GREEDY, adapters=[("other", 1.0)]))
    results = eng.generate(
        [GenerationRequest(PROMPTS[0], GREEDY), GenerationRequest("hi", GREEDY, adapters=[("broken", 1.0)])]
    )
    assert list(results[0].token_ids) == hf_greedy[0] and results[0].finish_reason == "length"
    assert results[1].finish_reason == "error" and "not the registered one" in (results[1].error or "")
    assert results[1].completion_tokens == 0 and results[1].adapters == (("broken", 1.0),)
    assert_clean(eng)


@pytest.mark.parametrize("threads", [1, 2])
def test_background_loop_runs_with_its_own_cpu_threads(
    tiny_model_dir: Path, tokenizer: Tokenizer, hf_greedy: list[list[int]], threads: int
) -> None:
    """The step thread sets its intra-op threads (`loop_cpu_threads`) without touching the caller's."""
    model = load_model(tiny_model_dir, dtype="fp32", device="cpu")  # its own: a hook goes on it
    seen: set[int] = set()
    model.register_forward_pre_hook(lambda _m, _a: seen.add(torch.get_num_threads()))
    before = torch.get_num_threads()
    eng = make_engine(tiny_model_dir, model, tokenizer, loop_cpu_threads=threads)
    with eng:
        result = eng.submit(GenerationRequest(PROMPTS[1], GREEDY)).result(timeout=60)
    assert list(result.token_ids) == hf_greedy[1]
    assert seen == {threads}
    assert torch.get_num_threads() == before
    with pytest.raises(EngineConfigError, match="loop_cpu_threads must be a positive integer"):
        EngineConfig(model_dir=tiny_model_dir, loop_cpu_threads=0)


def test_stop_string_ends_at_the_token_completing_it(engine: Engine, tokenizer: Tokenizer) -> None:
    """Text work runs while the next step computes, so a sequence ended by a stop string has already been given
    one more token: that token is void. The answer ends exactly at the token that completed the stop string,
    in a batch where another request goes on."""
    full = engine.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 3 :][:3]
    n = next(i for i in range(1, len(full.token_ids) + 1) if stop in tokenizer.decode(full.token_ids[:i]))
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    stopped, other = engine.generate([GenerationRequest(PROMPTS[3], params), GenerationRequest(PROMPTS[0], GREEDY)])
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:n]
    assert stopped.completion_tokens == n and stopped.text == full.text[: full.text.find(stop)]
    assert other.finish_reason == "length" and other.completion_tokens == MAX_NEW
