"""Steps run ahead of the host (`EngineConfig.async_decode`): step N+1 is scheduled and built before step N's
tokens are read, its decode rows taking their input tokens from N's samples on the device. On the CPU this
runs over the "static" fixed-shape steps (what CUDA graphs replay); every answer must equal the one of the
plain synchronous engine: tokens, text, finish reasons, logprobs, with seeded sampling, EOS and stop ids,
stop strings, max_tokens, the context limit, staggered arrivals, cancellation and preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraledger.inference.engine import Engine
from loraledger.inference.engine_config import EngineConfig
from loraledger.inference.errors import EngineConfigError
from loraledger.inference.model import LlamaModel
from loraledger.inference.requests import GenerationRequest, GenerationResult
from loraledger.inference.sequence import SamplingParams


def engine(model_dir: Path, model: LlamaModel, mode: str, ahead: bool, **kw: object) -> Engine:
    cfg = {"block_size": 4, "max_num_seqs": 8, "max_tokens_per_step": 64, "num_blocks": 160, **kw}
    return Engine(EngineConfig(model_dir=model_dir, decode_graphs=mode, async_decode=ahead, **cfg),  # type: ignore[arg-type]
                  model=model)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 512, (2 + 3 * i,), generator=g).tolist() for i in range(n)]


def same(a: GenerationResult, b: GenerationResult, what: str) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.completion_tokens) == (
        b.token_ids, b.text, b.finish_reason, b.completion_tokens), what
    if a.logprobs is not None or b.logprobs is not None:
        assert a.logprobs is not None and b.logprobs is not None, what
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def assert_clean(eng: Engine) -> None:
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.block_manager.check_invariants()
    assert not eng.has_work()
    assert eng._inflight is None


def mixed_requests(model_dir: Path, model: LlamaModel, **kw: object) -> list[GenerationRequest]:
    """Greedy and seeded sampled requests, some ending by max_tokens, by a stop id, by EOS, by a stop string
    or by the context, chosen from what a first synchronous run generates (so that each really triggers)."""
    ps = prompts(7)
    probe = engine(model_dir, model, "off", False, **kw).generate(
        ps, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stop_id = probe[1].token_ids[4]  # request 1 stops on its 5th token
    text3 = probe[3].text
    stop_str = text3[len(text3) // 2 : len(text3) // 2 + 2] if len(text3) >= 4 else "zz"
    eos = next(iter(model_dir_eos(model_dir)))
    params = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop_id,)),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=(stop_str,)),
        SamplingParams(temperature=1.0, seed=3, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=11, max_tokens=30, stop_token_ids=(eos,)),
        SamplingParams(temperature=0.0, max_tokens=48 - len(ps[6]), ignore_eos=True),  # fills the context (48)
    ]
    return [GenerationRequest(p, q) for p, q in zip(ps, params, strict=True)]


def model_dir_eos(model_dir: Path) -> set[int]:
    from loraledger.inference.tokenizer import Tokenizer

    return set(Tokenizer.from_pretrained(model_dir).eos_token_ids)


def test_run_ahead_steps_equal_synchronous_steps(tiny_model_dir: Path, tiny_model: LlamaModel) -> None:
    reqs = mixed_requests(tiny_model_dir, tiny_model)
    sync_static = engine(tiny_model_dir, tiny_model, "static", False, max_model_len=48)
    ahead = engine(tiny_model_dir, tiny_model, "static", True, max_model_len=48)
    plain = engine(tiny_model_dir, tiny_model, "off", False, max_model_len=48)
    want = sync_static.generate(reqs)
    got = ahead.generate(reqs)
    base = plain.generate(reqs)
    reasons = {r.finish_reason for r in want}
    assert reasons == {"length", "stop"}, reasons
    assert want[6].finish_reason == "length" and len(reqs[6].prompt) + want[6].completion_tokens == 48
    assert want[1].finish_reason == "stop" and want[3].finish_reason == "stop"
    for i, (w, g, b) in enumerate(zip(want, got, base, strict=True)):
        same(w, g, f"request {i}: run ahead vs synchronous")
        assert w.token_ids == b.token_ids, f"request {i}: static vs plain"
    stats = ahead.stats()
    assert stats["steps_ahead"] > stats["graph_steps"] > 10  # the prefill steps ran ahead too
    assert stats["steps_ahead"] <= stats["steps"]
    assert sync_static.stats()["steps_ahead"] == 0
    for eng in (sync_static, ahead, plain):
        assert_clean(eng)


def test_run_ahead_with_staggered_arrivals_cancel_and_preemption(
    tiny_model_dir: Path, tiny_model: LlamaModel
) -> None:
    """Requests joining between steps (mixed prefill + decode steps, whose decodes take their tokens from the
    step ahead on the device too), one cancelled while its token is on the device, a pool small enough to
    preempt: each finished answer equals its synchronous run alone, and nothing leaks."""
    ps = prompts(6, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    alone = [engine(tiny_model_dir, tiny_model, "off", False).generate([p], params)[0] for p in ps]
    eng = engine(tiny_model_dir, tiny_model, "static", True, num_blocks=14, max_num_seqs=6)
    handles = [eng.submit(GenerationRequest(ps[0], params))]
    cancelled = None
    steps = 0
    while eng.has_work() or len(handles) < len(ps):
        if len(handles) < len(ps) and steps % 3 == 2:
            handles.append(eng.submit(GenerationRequest(ps[len(handles)], params)))
        if steps == 7:
            assert eng._inflight is not None, "the cancel is meant to land while a step runs ahead"
            cancelled = handles[1]
            assert cancelled.cancel()
        eng.step()
        steps += 1
    stats = eng.stats()
    assert stats["preemptions"] > 0, "the pool was meant to force preemption"
    assert stats["steps_ahead"] > 0
    for i, h in enumerate(handles):
        res = h.result(timeout=0)
        if h is cancelled:
            assert res.finish_reason == "cancelled"
            assert list(res.token_ids) == list(alone[i].token_ids[: len(res.token_ids)])  # no placeholder
            continue
        same(alone[i], res, f"request {i}")
    assert_clean(eng)


def test_async_decode_config_is_checked(tiny_model_dir: Path) -> None:
    with pytest.raises(EngineConfigError, match="async_decode=True .* needs decode_graphs"):
        EngineConfig(model_dir=tiny_model_dir, decode_graphs="off", async_decode=True)
    with pytest.raises(EngineConfigError, match="async_decode must be True, False or None"):
        EngineConfig(model_dir=tiny_model_dir, decode_graphs="static", async_decode="yes")  # type: ignore[arg-type]
    assert EngineConfig(model_dir=tiny_model_dir, async_decode=None).async_decode is None  # auto: CUDA graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_ahead_graph_replays_equal_synchronous_replays(tiny_model_dir: Path, dtype: str) -> None:
    """On a GPU: the captured graphs run ahead (pinned copies, device-side input tokens, samples read behind
    an event) give exactly the answers of the same graphs run synchronously."""
    from loraledger.inference.loader import load_model

    model = load_model(tiny_model_dir, dtype=dtype, device="cuda")
    kw: dict[str, object] = {"device": "cuda", "dtype": dtype, "max_model_len": 48}
    reqs = mixed_requests(tiny_model_dir, model, **kw)
    sync = engine(tiny_model_dir, model, "graphs", False, **kw)
    ahead = engine(tiny_model_dir, model, "graphs", True, **kw)
    want, got = sync.generate(reqs), ahead.generate(reqs)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        same(w, g, f"request {i}")
    assert ahead.stats()["steps_ahead"] > 10
    assert_clean(sync)
    assert_clean(ahead)


def test_run_ahead_on_the_background_thread_streams_what_synchronous_steps_give(
    tiny_model_dir: Path, tiny_model: LlamaModel
) -> None:
    """The node's mode: the step loop on its thread, asyncio consumers streaming deltas. Every stream's deltas
    add up to its final text, and each answer equals the synchronous engine's; a shutdown right after a
    step ran ahead delivers that step's tokens and cancels the rest cleanly."""
    import asyncio

    from loraledger.inference.requests import TokenDelta

    ps = prompts(6, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    want = engine(tiny_model_dir, tiny_model, "off", False).generate(ps, params)
    eng = engine(tiny_model_dir, tiny_model, "static", True)

    async def consume(p: list[int]) -> tuple[str, GenerationResult]:
        text, final = "", None
        async for item in eng.submit(GenerationRequest(p, params)):
            if isinstance(item, TokenDelta):
                text += item.text_delta
            else:
                final = item
        assert final is not None
        return text, final

    async def main() -> list[tuple[str, GenerationResult]]:
        return await asyncio.gather(*(consume(p) for p in ps))

    with eng:
        outs = asyncio.run(main())
    for i, ((streamed, res), w) in enumerate(zip(outs, want, strict=True)):
        assert streamed == res.text, f"request {i}"
        same(w, res, f"request {i}")
    assert eng.stats()["steps_ahead"] > 0
    assert_clean(eng)

    # shut down while a step is ahead: its tokens land, then the requests are cancelled
    handles = [eng.submit(GenerationRequest(p, params)) for p in ps[:3]]
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    eng.shutdown()
    for h, w in zip(handles, want[:3], strict=True):
        res = h.result(timeout=0)
        assert res.finish_reason == "cancelled"
        assert 0 < len(res.token_ids) < 12 and list(res.token_ids) == list(w.token_ids[: len(res.token_ids)])
    assert_clean(eng)
