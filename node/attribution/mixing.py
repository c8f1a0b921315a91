"""Mix lineage weights with token-level attribution into the contributor split of one record's data share.

    share[a] = (1 - lam) * lineage[a] / sum(lineage) + lam * token[a] / sum(token)
    out[a]   = floor(share[a] * WEIGHT_SCALE), then the units left over go one each to the largest remainders
               (ties by address), so sum(out) == WEIGHT_SCALE exactly

All arithmetic is on exact fractions (a float is converted to the exact binary value it holds), so the result is
deterministic across machines. Contributors never matched keep (1 - lam) of their lineage share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

from loraledger.node.errors import AttributionError

WEIGHT_SCALE = 10**18
"""Mixed weights are parts per 10**18 (they sum to exactly this)."""


def _fraction(x: float | Fraction, what: str) -> Fraction:
    if isinstance(x, float) and not math.isfinite(x):
        raise AttributionError(f"{what} must be finite, got {x}")
    try:
        return Fraction(x)
    except (TypeError, ValueError) as e:
        raise AttributionError(f"{what} must be a number, got {x!r}") from e


def mix_weights(
    lineage: Mapping[str, int], token_level: Mapping[str, float], lam: float | Fraction
) -> dict[str, int]:
    """The per-record contributor weights: lineage re-weighted by token-level attribution (module docstring).

    lineage: address -> lineage weight (tokens the adapter was trained on), ints >= 0 with a positive sum.
    token_level: address -> token-level weight (any non-negative scale; normalised here); every address must have
    a lineage weight. lam in [0, 1].
    Returns `dict(lineage)` unchanged when lam == 0 or token_level is empty or all zero (the answer matched
    nothing: lineage shares); else address -> parts per WEIGHT_SCALE, over every lineage address, summing to
    WEIGHT_SCALE. Weights are proportional in both cases, which is all the reward split needs.
    """
    lam_f = _fraction(lam, "lambda")
    if not 0 <= lam_f <= 1:
        raise AttributionError(f"lambda must be in [0, 1], got {lam}")
    for a, w in lineage.items():
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise AttributionError(f"lineage weight of {a} must be a non-negative int, got {w!r}")
    lineage_total = sum(lineage.values())
    if lineage_total <= 0:
        raise AttributionError("lineage weights sum to 0: the adapter's datanets credit nobody")
    token = {a: _fraction(w, f"token-level weight of {a}") for a, w in token_level.items()}
    for a, t in token.items():
        if t < 0:
            raise AttributionError(f"token-level weight of {a} is negative ({token_level[a]})")
        if a not in lineage:
            raise AttributionError(
                f"token-level weight for {a}, who has no lineage weight: attribute answers only against the "
                "datanets the adapter was trained on"
            )
    token_total: Fraction = sum(token.values(), Fraction(0))
    if lam_f == 0 or token_total == 0:
        return dict(lineage)
    shares = {
        a: ((1 - lam_f) * Fraction(w, lineage_total) + lam_f * token.get(a, Fraction(0)) / token_total) * WEIGHT_SCALE
        for a, w in lineage.items()
    }
    out = {a: math.floor(s) for a, s in shares.items()}
    left = WEIGHT_SCALE - sum(out.values())
    # shares sum to exactly WEIGHT_SCALE, so 0 <= left < len(shares)
    assert 0 <= left < max(1, len(shares)), left
    by_remainder = sorted(shares, key=lambda a: (-(shares[a] - out[a]), a))
    for a in by_remainder[:left]:
        out[a] += 1
    return out
