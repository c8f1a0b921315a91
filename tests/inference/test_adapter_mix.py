"""`AdapterMix`: a request's adapters and merge weights, checked once when built; refusals name what to fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loraledger.inference.adapter_mix import BASE_MODEL, MERGE_WEIGHT_TOLERANCE, AdapterMix
from loraledger.inference.errors import AdapterMixError, EngineError, InvalidRequestError
from loraledger.inference.requests import GenerationRequest


def test_pairs_in_request_order() -> None:
    mix = AdapterMix.of([("law", 0.7), ("med", 0.3)])
    assert mix.keys == ("law", "med") and mix.weights == (0.7, 0.3)
    assert mix.pairs == (("law", 0.7), ("med", 0.3)) == tuple(mix) and len(mix) == 2 and mix


def test_empty_is_the_base_model_and_falsy() -> None:
    assert AdapterMix.of([]) == BASE_MODEL == AdapterMix() and not BASE_MODEL and BASE_MODEL.pairs == ()


def test_lone_adapter_with_weight_zero_takes_weight_one() -> None:
    assert AdapterMix.of([("law", 0.0)]).pairs == (("law", 1.0),)
    with pytest.raises(AdapterMixError, match="must be > 0"):
        AdapterMix.of([("law", 0.0), ("med", 1.0)])  # only a lone adapter


def test_weights_within_tolerance_are_accepted_and_stored_as_floats() -> None:
    mix = AdapterMix.of([("a", 0.1), ("b", 0.2), ("c", 0.7 + MERGE_WEIGHT_TOLERANCE / 2)])
    assert sum(mix.weights) != 1.0 and len(mix) == 3
    assert AdapterMix.of([("a", np.float32(0.5)), ("b", 0.5)]).weights == (0.5, 0.5)
    assert all(type(w) is float for w in AdapterMix.of([("a", 1)]).weights)


@pytest.mark.parametrize(
    ("pairs", "words"),
    [
        ([("a", 0.5), ("b", 0.4)], "sum to 0.9"),
        ([("a", 1.5), ("b", -0.5)], "must be > 0"),
        ([("a", 0.5), ("a", 0.5)], "appears twice"),
        ([("a", 0.5), ("a", 0.5)], "names an adapter twice"),
        ([("a", math.nan)], "finite"),
        ([("a", math.inf)], "finite"),
        ([("a", "1")], "finite"),
        ([("", 1.0)], "non-empty string"),
        ([(7, 1.0)], "non-empty string"),
        (["a"], r"\(key, weight\) pairs"),
    ],
    ids=["sum", "negative", "duplicate", "duplicate-words", "nan", "inf", "str-weight", "empty-key", "int-key",
         "not-a-pair"],
)
def test_malformed_mixes_are_refused_with_what_to_fix(pairs: list[object], words: str) -> None:
    with pytest.raises(AdapterMixError, match=words) as info:
        AdapterMix.of(pairs)  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidRequestError | EngineError) and isinstance(info.value, ValueError)


def test_built_directly_it_is_checked_too() -> None:
    with pytest.raises(AdapterMixError, match="sum to"):
        AdapterMix(("a", "b"), (0.5, 0.6))
    with pytest.raises(AdapterMixError, match="one weight per key"):
        AdapterMix(("a", "b"), (1.0,))


def test_rekeyed_keeps_weights_and_refuses_two_names_of_one_adapter() -> None:
    mix = AdapterMix.of([("alias-a", 0.25), ("alias-b", 0.75)])
    assert mix.rekeyed(["k1", "k2"]).pairs == (("k1", 0.25), ("k2", 0.75))
    with pytest.raises(AdapterMixError, match="appears twice"):
        mix.rekeyed(["k1", "k1"])


def test_generation_request_carries_a_mix_built_from_pairs() -> None:
    request = GenerationRequest("hi", adapters=[("a", 0.5), ("b", 0.5)])
    assert isinstance(request.adapters, AdapterMix) and request.adapters.keys == ("a", "b")
    mix = AdapterMix.of([("a", 1.0)])
    assert GenerationRequest("hi", adapters=mix).adapters is mix
    assert GenerationRequest("hi").adapters == BASE_MODEL
    with pytest.raises(AdapterMixError, match="sum to 1"):
        GenerationRequest("hi", adapters=[("a", 0.5)])
