"""Batched per-row sampling: greedy, penalty, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from loraledger.inference.errors import InvalidRequestError
from loraledger.inference.sampling import SampleRequest, _truncate, make_generator, sample
from loraledger.inference.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SampleRequest(GREEDY, []) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5 and out.top_logprobs == [None] * 5


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0, -5.0], [3.0, 2.0, -1.0, -5.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    out = sample(logits.clone(), [SampleRequest(p, [0, 0, 2]), SampleRequest(GREEDY, [0])])
    assert out.token_ids == [1, 0]  # row 0: 3/2 = 1.5 < 2; row 1 has no penalty
    # a negative logit moves further down: all-negative row, history holds the argmax
    neg = torch.tensor([[-1.0, -1.5, -4.0]])
    assert sample(neg, [SampleRequest(p, [0])]).token_ids == [1]  # -1 * 2 = -2 < -1.5


def test_truncate_top_k_and_top_p() -> None:
    z = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    out = _truncate(z, torch.tensor([0, 0, 2, 1]), torch.tensor([0.6, 0.5, 1.0, 1.0]))
    kept = torch.isfinite(out).tolist()
    assert kept == [[True, True, False], [True, False, False], [False, True, True], [False, True, False]]
    assert torch.equal(out[0, :2], z[0, :2])


def test_sampled_rows_follow_softmax_and_truncation() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = torch.log(probs).repeat(n, 1)
    g = torch.Generator().manual_seed(1)
    out = sample(logits, [SampleRequest(SamplingParams(temperature=1.0), []) for _ in range(n)], generator=g)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq
    # top_k=2 only ever yields the two most likely tokens; a tiny top_p only the most likely one
    out_k = sample(
        logits[:500], [SampleRequest(SamplingParams(top_k=2), []) for _ in range(500)], generator=g
    )
    assert set(out_k.token_ids) == {2, 3}
    out_p = sample(
        logits[:200], [SampleRequest(SamplingParams(top_p=0.1), []) for _ in range(200)], generator=g
    )
    assert set(out_p.token_ids) == {3}
    # a low temperature sharpens: the top token dominates
    out_t = sample(
        logits[:500], [SampleRequest(SamplingParams(temperature=0.05), []) for _ in range(500)], generator=g
    )
    assert out_t.token_ids.count(3) > 490


def test_seeded_rows_repeat_whatever_the_batch() -> None:
    v = 64
    target = torch.randn(v, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run(batch_rows: list[torch.Tensor], pos: int, steps: int = 6) -> list[int]:
        gen = make_generator(p.seed or 0, "cpu")
        toks = []
        for _ in range(steps):
            rows = list(batch_rows)
            rows.insert(pos, target)
            reqs = [SampleRequest(SamplingParams(temperature=1.3), []) for _ in batch_rows]
            reqs.insert(pos, SampleRequest(p, [], gen))
            toks.append(sample(torch.stack(rows), reqs).token_ids[pos])
        return toks

    alone = run([], 0)
    others = [torch.randn(v) for _ in range(5)]
    assert run(others, 3) == alone
    assert run(others[:2], 0) == alone
    assert len(set(alone)) > 1  # it really samples (not argmax every time)
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99)
    g2 = make_generator(99, "cpu")
    toks2 = [sample(target.unsqueeze(0), [SampleRequest(other_seed, [], g2)]).token_ids[0] for _ in range(6)]
    assert toks2 != alone


def test_logprobs_of_chosen_and_top_n() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    reqs = [
        SampleRequest(SamplingParams(temperature=0.0, logprobs=2), []),
        SampleRequest(SamplingParams(temperature=0.0, logprobs=0), []),
    ]
    out = sample(logits, reqs)
    lsm = torch.log_softmax(logits, -1)
    assert out.token_ids == [1, 2]
    assert out.logprobs[0] == pytest.approx(lsm[0, 1].item()) and out.logprobs[1] == pytest.approx(
        lsm[1, 2].item()
    )
    top0 = out.top_logprobs[0]
    assert top0 is not None and [t for t, _ in top0] == [1, 2]
    assert top0[1][1] == pytest.approx(lsm[0, 2].item())
    assert out.top_logprobs[1] == []
    assert math.fsum(math.exp(x) for x in lsm[0].tolist()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
        ({"stop_token_ids": (-3,)}, "stop token ids must be >= 0"),
        ({"logprobs": 21}, "logprobs must be between"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_params_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_params_checked_against_model() -> None:
    p = SamplingParams(max_tokens=10, stop_token_ids=[5])
    assert p.stop_token_ids == (5,)
    p.check_for_model(prompt_len=20, max_model_len=30, vocab_size=8)
    with pytest.raises(InvalidRequestError, match="at most 9 tokens can be generated"):
        p.check_for_model(prompt_len=21, max_model_len=30, vocab_size=8)
    with pytest.raises(InvalidRequestError, match="shorten the prompt"):
        p.check_for_model(prompt_len=30, max_model_len=30, vocab_size=8)
    with pytest.raises(InvalidRequestError, match="stop token id 5 is not in the vocabulary"):
        p.check_for_model(prompt_len=2, max_model_len=30, vocab_size=5)
