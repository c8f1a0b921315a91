"""`AdapterMix`: the adapters one request applies and their merge weights, checked once where a request enters.

    AdapterMix.of([("law", 0.7), ("med", 0.3)])   # two adapters merged: y = base(x) + sum_i w_i * lora_i(x)
    AdapterMix.of([("law", 0.0)])                 # a lone adapter given weight 0 takes weight 1
    AdapterMix.of([]) == BASE_MODEL               # no adapter: the base model alone

Every mix holds distinct non-empty keys and finite weights > 0 that sum to 1 within `MERGE_WEIGHT_TOLERANCE`
(weights arrive as floats over gRPC); a mix that breaks this cannot be built (`AdapterMixError`). Whoever
holds a mix trusts it: the engine, the scheduler and the adapter store check only what depends on them (a key
they know, enough adapter slots).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from loraledger.inference.errors import AdapterMixError

# |sum(weights) - 1| allowed: the weights of one request are floats chosen by a client.
MERGE_WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class AdapterMix:
    """Adapter keys and their merge weights, in request order (`keys[i]` takes `weights[i]`); () = base model.

    Built by `AdapterMix.of(pairs)`, or directly from keys and weights; both check the mix (module docstring).
    Iterating yields (key, weight) pairs; an empty mix is falsy.
    """

    keys: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        keys, weights = tuple(self.keys), tuple(self.weights)
        if len(keys) != len(weights):
            raise AdapterMixError(
                f"{len(keys)} adapter keys but {len(weights)} weights; give one weight per key"
            )
        seen: set[str] = set()
        for key, weight in zip(keys, weights, strict=True):
            if not isinstance(key, str) or not key:
                raise AdapterMixError(
                    f"adapter key must be a non-empty string, got {key!r}; "
                    "give an adapter key, on-chain id or alias"
                )
            if key in seen:
                raise AdapterMixError(
                    f"adapter {key!r} appears twice: the mix names an adapter twice in {list(keys)}; "
                    "list each adapter once with its weight"
                )
            seen.add(key)
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise AdapterMixError(f"adapter {key!r}: weight must be a finite number, got {weight!r}")
            if weight <= 0:
                raise AdapterMixError(
                    f"adapter {key!r} has weight {weight}; weights must be > 0 (positive) and sum to 1 "
                    "across the adapters"
                )
        floats = tuple(float(w) for w in weights)
        total = sum(floats)
        if keys and abs(total - 1.0) > MERGE_WEIGHT_TOLERANCE:
            raise AdapterMixError(
                f"adapter merge weights {list(floats)} sum to {total:.9g} for {list(keys)}; they must sum to 1 "
                f"(within {MERGE_WEIGHT_TOLERANCE}): normalise them, e.g. 0.7 and 0.3 "
                "(a lone adapter takes weight 1)"
            )
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "weights", floats)

    @classmethod
    def of(cls, pairs: AdapterMix | Iterable[tuple[str, float]]) -> AdapterMix:
        """The mix of (key, weight) pairs; a lone pair with weight 0 takes weight 1. A mix is returned as is."""
        if isinstance(pairs, AdapterMix):
            return pairs
        entries = list(pairs)
        for entry in entries:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise AdapterMixError(f"adapters must be (key, weight) pairs, got {entry!r}")
        if len(entries) == 1 and isinstance(entries[0][1], numbers.Real) and entries[0][1] == 0:
            entries = [(entries[0][0], 1.0)]
        return cls(tuple(k for k, _ in entries), tuple(w for _, w in entries))

    def rekeyed(self, keys: Sequence[str]) -> AdapterMix:
        """The same weights under other keys, in order (names resolved to store keys); checked again, so two
        names of one adapter are refused as a repeated key."""
        if len(keys) != len(self.keys):
            raise AdapterMixError(f"{len(keys)} keys given for a mix of {len(self.keys)} adapters")
        return AdapterMix(tuple(keys), self.weights)

    @property
    def pairs(self) -> tuple[tuple[str, float], ...]:
        """((key, weight), ...) in request order."""
        return tuple(zip(self.keys, self.weights, strict=True))

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.keys)


BASE_MODEL = AdapterMix()
