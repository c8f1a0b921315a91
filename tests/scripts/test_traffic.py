"""The benchmarks' traffic generators (scripts/traffic.py): S-LoRA's power choice, Punica's popularity modes,
Poisson arrivals, lengths."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from loraledger.inference.errors import EngineError

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as the module `name` (the scripts folder is no package); put in sys.modules before it
    runs, where dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


traffic = load_script("traffic")
BenchmarkConfigError = traffic.BenchmarkConfigError
TrafficSpec = traffic.TrafficSpec
distinct_per_window = traffic.distinct_per_window
make_traffic = traffic.make_traffic
power_adapters = traffic.power_adapters
punica_segment_lengths = traffic.punica_segment_lengths


def test_same_seed_same_trace_and_streams_are_independent() -> None:
    spec = TrafficSpec(num_requests=200, num_adapters=32, alpha=0.3, rate=5.0, seed=7)
    a, b = make_traffic(spec), make_traffic(spec)
    assert a == b
    other = make_traffic(replace(spec, seed=8))
    assert [r.adapter for r in other] != [r.adapter for r in a]
    # a different rate changes arrivals only: adapters and lengths of every request stay
    faster = make_traffic(replace(spec, rate=50.0))
    assert [(r.adapter, r.input_len, r.output_len) for r in faster] == [(r.adapter, r.input_len, r.output_len) for r in a]
    assert faster[-1].arrival_s < a[-1].arrival_s


def test_poisson_arrivals_have_the_asked_rate() -> None:
    trace = make_traffic(TrafficSpec(num_requests=4000, num_adapters=1, rate=20.0, seed=1))
    t = np.array([r.arrival_s for r in trace])
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps > 0).all()
    assert abs(gaps.mean() - 1 / 20) < 0.1 / 20  # mean gap 1/rate, within 10% at n = 4000
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: coefficient of variation 1


def test_closed_loop_has_no_arrival_times() -> None:
    trace = make_traffic(TrafficSpec(num_requests=5, num_adapters=2, rate=None))
    assert all(r.arrival_s is None for r in trace)


def test_power_alpha_one_is_uniform_and_small_alpha_is_skewed() -> None:
    rng = np.random.default_rng(0)
    n_ad = 10
    uniform = np.bincount(power_adapters(20000, n_ad, 1.0, rng), minlength=n_ad) / 20000
    assert np.abs(uniform - 0.1).max() < 0.015
    skewed = np.bincount(power_adapters(20000, n_ad, 0.3, rng), minlength=n_ad) / 20000
    # P(id = 0) = P(u < 1/10) = 0.1^0.3 = 0.501
    assert abs(skewed[0] - 0.1**0.3) < 0.02
    assert (np.diff(skewed) < 0).all()  # popularity falls with the id
    ids = power_adapters(1000, 1000, 0.3, rng)
    assert ids.min() >= 0 and ids.max() < 1000


@pytest.mark.parametrize("batch", [1, 7, 32, 133])
def test_punica_segments_sum_to_the_batch(batch: int) -> None:
    assert punica_segment_lengths(batch, "identical") == [batch]
    assert punica_segment_lengths(batch, "distinct") == [1] * batch
    uniform = punica_segment_lengths(batch, "uniform")
    assert sum(uniform) == batch and len(uniform) == math.ceil(math.sqrt(batch))
    assert max(uniform) - min(uniform) <= 1
    zipf = punica_segment_lengths(batch, "zipf", 1.5)
    assert sum(zipf) == batch and zipf == sorted(zipf, reverse=True)


def test_punica_zipf_grows_geometrically() -> None:
    # floors of 1.5^k: 1, 1, 2, 3, 5, 7, 11 sum to 30 (the next, 17, does not fit); the remainder 2 closes 32
    assert punica_segment_lengths(32, "zipf", 1.5) == [11, 7, 5, 3, 2, 2, 1, 1]


@pytest.mark.parametrize(("mode", "distinct"), [("identical", 1), ("distinct", 32), ("uniform", 6), ("zipf", 8)])
def test_punica_modes_set_distinct_adapters_per_batch(mode: str, distinct: int) -> None:
    trace = make_traffic(TrafficSpec(num_requests=96, num_adapters=100, distribution=mode, alpha=1.5, batch=32))
    assert distinct_per_window(trace, 32) == [distinct] * 3
    assert all(0 <= r.adapter < 100 for r in trace if r.adapter is not None)


def test_punica_distinct_is_capped_by_the_number_of_adapters() -> None:
    trace = make_traffic(TrafficSpec(num_requests=32, num_adapters=8, distribution="distinct", batch=32))
    assert distinct_per_window(trace, 32) == [8]


def test_lengths_are_uniform_in_the_half_open_range() -> None:
    trace = make_traffic(TrafficSpec(num_requests=5000, num_adapters=0, input_len=(8, 512), output_len=(4, 9)))
    inputs = np.array([r.input_len for r in trace])
    outputs = np.array([r.output_len for r in trace])
    assert inputs.min() >= 8 and inputs.max() <= 511 and abs(inputs.mean() - (8 + 511) / 2) < 8
    assert set(outputs.tolist()) == {4, 5, 6, 7, 8}
    assert all(r.adapter is None for r in trace)  # num_adapters = 0: the base model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distribution": "pareto"}, "unknown distribution"),
        ({"distribution": "zipf", "alpha": 1.0}, "alpha > 1"),
        ({"alpha": 0.0}, "alpha > 0"),
        ({"rate": -1.0}, "rate"),
        ({"input_len": (8, 8)}, "input_len"),
        ({"num_adapters": -1}, "num_adapters"),
    ],
)
def test_bad_specs_are_refused_with_the_setting_named(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BenchmarkConfigError, match=match) as info:
        TrafficSpec(**{"num_requests": 4, "num_adapters": 4, **kwargs})  # type: ignore[arg-type]
    assert isinstance(info.value, EngineError) and isinstance(info.value, ValueError)
