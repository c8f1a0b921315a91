"""Synthetic multi-LoRA traffic for the benchmarks, as in the S-LoRA and Punica papers: who asks, when, how much.
Imported by the benchmark scripts beside it (`bench_lora.py`).

A trace is a list of `TrafficRequest(index, arrival_s, adapter, input_len, output_len)` drawn from a `TrafficSpec`:

arrivals   open loop, Poisson at `rate` req/s:  arrival[i] = sum_{j<=i} gap[j],  gap ~ Exponential(1 / rate)
           closed loop (`rate=None`): arrival_s is None; the driver keeps `concurrency` requests in flight
adapters   "power" (S-LoRA):  adapter = floor(u * N), u ~ Power(alpha) on [0, 1], density alpha * u^(alpha - 1);
                              alpha = 1 is uniform over N, alpha < 1 (0.3) piles the load on the low ids
           Punica's popularity modes shape each window of `batch` consecutive requests into segments that share
           one adapter (different adapters per segment; at most N distinct, ids drawn at random from [0, N)):
             "identical"  one segment of `batch`                      (1 adapter per batch)
             "distinct"   `batch` segments of 1                        (every request its own adapter)
             "uniform"    ceil(sqrt(batch)) segments of equal size     (sizes differ by at most 1)
             "zipf"       sizes 1, a, a^2, ... (floored, a = `alpha`, Punica uses 1.5) until the window is full,
                          the remainder as the last segment, largest first
           N = 0 means no adapters at all (the base model: the throughput ceiling)
lengths    input_len ~ U[lo, hi), output_len ~ U[lo, hi)  (integers; S-LoRA and Punica use [8, 512))

Arrivals, adapters and lengths come from three independent streams spawned from `seed`, so the same seed gives
the same trace, and changing e.g. the rate keeps the adapters and lengths of every request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loraledger.inference.errors import EngineError


class BenchmarkConfigError(EngineError, ValueError):
    """A benchmark traffic or run setting is out of range; the message names it and the accepted values."""


ADAPTER_DISTRIBUTIONS: tuple[str, ...] = ("power", "identical", "distinct", "uniform", "zipf")
PUNICA_MODES: tuple[str, ...] = ("identical", "distinct", "uniform", "zipf")


@dataclass(frozen=True)
class TrafficSpec:
    """What to draw (see module docstring). `alpha`: power exponent ("power") or growth factor ("zipf", > 1)."""

    num_requests: int
    num_adapters: int
    distribution: str = "power"
    alpha: float = 1.0
    batch: int = 32
    rate: float | None = None
    concurrency: int = 8
    input_len: tuple[int, int] = (8, 512)
    output_len: tuple[int, int] = (8, 512)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> BenchmarkConfigError:
            return BenchmarkConfigError(f"TrafficSpec: {msg}")

        if self.num_requests < 0:
            raise bad(f"num_requests must be >= 0, got {self.num_requests}")
        if self.num_adapters < 0:
            raise bad(f"num_adapters must be >= 0 (0 = base model only), got {self.num_adapters}")
        if self.distribution not in ADAPTER_DISTRIBUTIONS:
            raise bad(f"unknown distribution {self.distribution!r}; choose one of {', '.join(ADAPTER_DISTRIBUTIONS)}")
        if self.distribution == "power" and not self.alpha > 0:
            raise bad(f"the power distribution needs alpha > 0 (1 = uniform, 0.3 = skewed), got {self.alpha}")
        if self.distribution == "zipf" and not self.alpha > 1:
            raise bad(f"Punica's zipf mode needs a growth factor alpha > 1 (e.g. 1.5), got {self.alpha}")
        if self.batch < 1:
            raise bad(f"batch must be >= 1, got {self.batch}")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise bad(f"rate must be a positive number of requests/s or None (closed loop), got {self.rate}")
        if self.concurrency < 1:
            raise bad(f"concurrency must be >= 1, got {self.concurrency}")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo < hi:
                raise bad(f"{name} must be a range [lo, hi) with 1 <= lo < hi, got [{lo}, {hi})")


@dataclass(frozen=True)
class TrafficRequest:
    """One request of a trace. arrival_s: seconds from the start (None in a closed loop); adapter: None = base."""

    index: int
    arrival_s: float | None
    adapter: int | None
    input_len: int
    output_len: int


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times [n] of a Poisson process at `rate` per second: cumulative Exponential(1/rate) gaps."""
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def power_adapters(n: int, num_adapters: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """S-LoRA's choice [n]: floor(Power(alpha) * num_adapters), clipped into [0, num_adapters)."""
    ids = np.floor(rng.power(alpha, size=n) * num_adapters).astype(np.int64)
    return np.minimum(ids, num_adapters - 1)


def punica_segment_lengths(batch: int, mode: str, growth: float = 1.5) -> list[int]:
    """How many requests of a batch of `batch` share each adapter under Punica's popularity `mode`.

    identical [batch]; distinct [1] * batch; uniform ceil(sqrt(batch)) near-equal parts;
    zipf [1, floor(g), floor(g^2), ...] while they fit, then the remainder; sorted largest first.
    The lengths always sum to `batch`.
    """
    if batch < 1:
        raise BenchmarkConfigError(f"batch must be >= 1, got {batch}")
    if mode == "identical":
        return [batch]
    if mode == "distinct":
        return [1] * batch
    if mode == "uniform":
        parts = math.ceil(math.sqrt(batch))
        base, extra = divmod(batch, parts)
        return [base + 1] * extra + [base] * (parts - extra)
    if mode == "zipf":
        if not growth > 1:
            raise BenchmarkConfigError(f"zipf growth factor must be > 1, got {growth}")
        lens: list[int] = []
        a = 1.0
        while sum(lens) + math.floor(a) < batch:
            lens.append(math.floor(a))
            a *= growth
        lens.append(batch - sum(lens))
        return sorted(lens, reverse=True)
    raise BenchmarkConfigError(f"unknown Punica mode {mode!r}; choose one of {', '.join(PUNICA_MODES)}")


def punica_adapters(
    n: int, num_adapters: int, mode: str, batch: int, growth: float, rng: np.random.Generator
) -> np.ndarray:
    """Adapter ids [n]: each window of `batch` requests split into `punica_segment_lengths` segments, each segment
    one adapter; a window's adapters are distinct while num_adapters allows (a fresh random draw per window)."""
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        lens = punica_segment_lengths(size, mode, growth)
        picks = rng.permutation(num_adapters)
        ids = np.concatenate([np.full(k, picks[j % num_adapters]) for j, k in enumerate(lens)])
        out[start : start + size] = ids
    return out


def make_traffic(spec: TrafficSpec) -> list[TrafficRequest]:
    """The trace of `spec` (see module docstring); same spec -> same trace."""
    arrival_rng, adapter_rng, length_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))
    n = spec.num_requests
    arrivals = poisson_arrivals(n, spec.rate, arrival_rng) if spec.rate is not None else None
    adapters: np.ndarray | None = None
    if spec.num_adapters > 0:
        if spec.distribution == "power":
            adapters = power_adapters(n, spec.num_adapters, spec.alpha, adapter_rng)
        else:
            adapters = punica_adapters(n, spec.num_adapters, spec.distribution, spec.batch, spec.alpha, adapter_rng)
    inputs = length_rng.integers(spec.input_len[0], spec.input_len[1], size=n)
    outputs = length_rng.integers(spec.output_len[0], spec.output_len[1], size=n)
    return [
        TrafficRequest(
            index=i,
            arrival_s=float(arrivals[i]) if arrivals is not None else None,
            adapter=int(adapters[i]) if adapters is not None else None,
            input_len=int(inputs[i]),
            output_len=int(outputs[i]),
        )
        for i in range(n)
    ]


def distinct_per_window(trace: list[TrafficRequest], window: int) -> list[int]:
    """Distinct adapters in each window of `window` consecutive requests (a proxy for distinct adapters per step)."""
    return [
        len({r.adapter for r in trace[i : i + window] if r.adapter is not None}) for i in range(0, len(trace), window)
    ]
