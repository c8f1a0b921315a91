"""Next-token choice for a whole batch in one pass, each row with its own sampling parameters.

For row b of logits [B, V] (float32) with parameters p_b and token history h_b (prompt + output so far):

    z      = logits[b]
    z[h_b] = z / rp  where z > 0, z * rp elsewhere              (repetition penalty rp, skipped when rp == 1)
    greedy (temperature 0):   token = argmax z
    else:                     z = z / temperature
                              drop all but the top_k largest (top_k > 0)
                              drop the tail outside the smallest set with probability mass >= top_p
                              probs = softmax(z)
                              token = argmax(probs / q),  q ~ Exponential(1)^V   (exactly a draw from probs)

The exponential noise q of a seeded row comes from that row's own `torch.Generator`, so its tokens depend
only on its seed and its logits, never on which other rows share the batch; unseeded rows share one
generator. Log-probabilities, when asked, are those of the model's distribution (log_softmax of the raw
logits, before penalty, temperature and truncation): of the chosen token and of the n most likely tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraledger.inference.sequence import SamplingParams
from loraledger.kernels import to_device


@dataclass
class SampleRequest:
    """One row of the batch: its parameters, its token history (for the penalty) and, if seeded, its
    generator (on the logits' device, created once per sequence with `make_generator`)."""

    params: SamplingParams
    history: list[int]
    generator: torch.Generator | None = None


@dataclass
class SampleOutput:
    """Per row: the chosen token; its logprob and top-n (token, logprob) when the row asked for logprobs."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded sequence: the same seed gives the same stream."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def apply_repetition_penalty(
    logits: torch.Tensor, histories: list[list[int]], penalties: list[float]
) -> None:
    """In place on rows whose penalty != 1: z[b, h] = z / rp if z > 0 else z * rp for every token h seen."""
    rows = [b for b, rp in enumerate(penalties) if rp != 1.0]
    if not rows:
        return
    device = logits.device
    width = max(len(histories[b]) for b in rows)
    if width == 0:
        return
    ids = torch.zeros((len(rows), width), dtype=torch.int64)  # [R, W], padded with the row's first token
    for i, b in enumerate(rows):
        h = histories[b]
        if h:
            ids[i, : len(h)] = torch.tensor(h, dtype=torch.int64)
            ids[i, len(h) :] = h[0]
    ids = ids.to(device)
    row_idx = torch.tensor(rows, dtype=torch.int64, device=device)
    rp = torch.tensor([penalties[b] for b in rows], dtype=logits.dtype, device=device).unsqueeze(1)  # [R, 1]
    z = logits[row_idx].gather(1, ids)  # [R, W]
    z = torch.where(z > 0, z / rp, z * rp)
    sub = logits[row_idx]
    sub.scatter_(1, ids, z)
    logits[row_idx] = sub


def _truncate(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf the tokens outside top-k and outside the top-p nucleus; z: [R, V], top_k: [R] (0 = all),
    top_p: [R]. The most likely token always stays."""
    sorted_z, order = z.sort(dim=-1, descending=True)  # [R, V]
    v = z.shape[-1]
    rank = torch.arange(v, device=z.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v)).unsqueeze(1)  # [R, 1]
    drop = rank >= k
    probs = torch.softmax(sorted_z.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop |= mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_z = sorted_z.masked_fill(drop, float("-inf"))
    return torch.empty_like(z).scatter_(1, order, sorted_z)


class PendingSample:
    """The device side of one `sample_start`: the chosen tokens (and logprobs) are computed or queued on the
    device and being copied to host memory; `result()` waits for that copy only (on CUDA an event recorded
    after it), not for work queued later, then builds the `SampleOutput`."""

    def __init__(self, chosen: torch.Tensor, chosen_lp: torch.Tensor | None, top: torch.Tensor | None,
                 top_ids: torch.Tensor | None, want_logprobs: list[int | None]) -> None:
        self.chosen = chosen  # [B] int64 on the logits' device (a CUDA-graph step reads its next input here)
        self.want_logprobs = want_logprobs
        device_side = [chosen, chosen_lp, top, top_ids]
        self._event: torch.cuda.Event | None = None
        if chosen.device.type == "cuda":
            host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device_side]
            for h, t in zip(host, device_side, strict=True):
                if h is not None and t is not None:
                    h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = host
        else:
            self._host = device_side
        self._result: SampleOutput | None = None

    def result(self) -> SampleOutput:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            chosen, chosen_lp, top_vals, top_ids = self._host
            assert chosen is not None
            b = chosen.shape[0]
            logprobs: list[float | None] = [None] * b
            top: list[list[tuple[int, float]] | None] = [None] * b
            if chosen_lp is not None:
                lp = chosen_lp.tolist()
                for i, n in enumerate(self.want_logprobs):
                    if n is None:
                        continue
                    logprobs[i] = lp[i]
                    if n > 0 and top_vals is not None and top_ids is not None:
                        top[i] = list(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist()))
                    else:
                        top[i] = []
            self._result = SampleOutput(token_ids=chosen.tolist(), logprobs=logprobs, top_logprobs=top)
        return self._result


def sample(
    logits: torch.Tensor,
    requests: list[SampleRequest],
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Choose one token per row of `logits` [B, V] (float32) following `requests[b]` (see module docstring).

    `generator` draws the noise of unseeded rows (None = torch's default generator).
    """
    return sample_start(logits, requests, generator).result()


def sample_start(
    logits: torch.Tensor,
    requests: list[SampleRequest],
    generator: torch.Generator | None = None,
) -> PendingSample:
    """`sample` without waiting for the device: the choice is queued, its result read by `.result()`."""
    b, v = logits.shape
    if len(requests) != b:
        raise ValueError(f"sample got {b} rows of logits but {len(requests)} requests")
    device = logits.device
    want_logprobs = [r.params.logprobs for r in requests]
    raw_logprobs = (
        torch.log_softmax(logits.float(), dim=-1) if any(n is not None for n in want_logprobs) else None
    )

    z = logits.float()  # [B, V]; copied only when the penalty below writes into it
    penalties = [r.params.repetition_penalty for r in requests]
    if any(rp != 1.0 for rp in penalties):
        z = z.clone()
        apply_repetition_penalty(z, [r.history for r in requests], penalties)
    chosen = z.argmax(dim=-1)  # [B], the greedy answer; sampled rows overwrite theirs

    rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if rows:
        row_idx = to_device(rows, torch.int64, device)
        temp = to_device([requests[i].params.temperature for i in rows], torch.float32, device)
        zs = z[row_idx] / temp.unsqueeze(1)  # [R, V]
        need_trunc = [requests[i].params.top_k > 0 or requests[i].params.top_p < 1.0 for i in rows]
        if any(need_trunc):
            top_k = to_device([requests[i].params.top_k for i in rows], torch.int64, device)
            top_p = to_device([requests[i].params.top_p for i in rows], torch.float32, device)
            zs = _truncate(zs, top_k, top_p)
        probs = torch.softmax(zs, dim=-1)  # [R, V]
        q = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(rows) if requests[i].generator is None]
        if len(unseeded) == len(rows):
            q.exponential_(generator=generator)
        elif unseeded:
            q[to_device(unseeded, torch.int64, device)] = torch.empty(
                (len(unseeded), v), device=device).exponential_(generator=generator)
        for j, i in enumerate(rows):
            g = requests[i].generator
            if g is not None:
                q[j].exponential_(generator=g)
        q.clamp_(min=torch.finfo(q.dtype).tiny)  # an exact 0 draw would turn 0 / 0 into nan
        chosen[row_idx] = (probs / q).argmax(dim=-1)

    chosen_lp = top_vals = top_ids = None
    if raw_logprobs is not None:
        n_max = max(n for n in want_logprobs if n is not None)
        if n_max > 0:
            top_vals, top_ids = raw_logprobs.topk(n_max, dim=-1)
        chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    return PendingSample(chosen, chosen_lp, top_vals, top_ids, want_logprobs)
