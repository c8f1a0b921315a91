"""`StepStats`: an engine's step counters, totals since start and token rates over a recent window.

    stats.count_step(prefill, decode)   one step ran `prefill` prompt tokens and sampled `decode` tokens
    stats.totals                        steps, prompt_tokens, generated_tokens, preemptions, steps_ahead
    stats.rates()                       prefill / generated tokens per second over the last WINDOW_S seconds

Written by the engine's step thread only; `rates()` reads a snapshot, so any thread may call it.
"""

from __future__ import annotations

import collections
import time


class StepStats:
    """Totals since start and (time, prefill, decode) of the steps of the last `WINDOW_S` seconds."""

    WINDOW_S = 10.0

    def __init__(self) -> None:
        self.totals = dict.fromkeys(("steps", "prompt_tokens", "generated_tokens", "preemptions", "steps_ahead"), 0)
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, prefill, decode)

    def count_step(self, prefill: int, decode: int) -> None:
        now = time.monotonic()
        self.totals["steps"] += 1
        self.totals["prompt_tokens"] += prefill
        self.totals["generated_tokens"] += decode
        self._recent.append((now, prefill, decode))
        while self._recent and now - self._recent[0][0] > self.WINDOW_S:
            self._recent.popleft()

    def rates(self) -> dict[str, float]:
        """prefill_tokens_per_s, generated_tokens_per_s: the tokens of the window's steps after its first, over
        the time from its first step to its last (0 with fewer than two steps)."""
        recent = list(self._recent)
        if len(recent) < 2:
            return {"prefill_tokens_per_s": 0.0, "generated_tokens_per_s": 0.0}
        window = max(recent[-1][0] - recent[0][0], 1e-9)
        return {
            "prefill_tokens_per_s": sum(r[1] for r in recent[1:]) / window,
            "generated_tokens_per_s": sum(r[2] for r in recent[1:]) / window,
        }
