"""The interval dict every statistic of the study returns (`stats`, `meta_analysis`).

`{"mean", "lo", "hi", "n", "method"}`: a two-sided `LEVEL` interval around `mean`, over `n`
units, and the words naming how it was computed. A statistic that cannot be computed (too
few values) has None for the numbers it lacks and a `"reason"`, so results files stay strict
JSON.
"""

from __future__ import annotations

LEVEL = 0.95


def no_interval(n: int, method: str, reason: str, mean: float | None = None) -> dict:
    """The dict of a statistic without an interval: `mean` (None when not even it could be
    computed) and `reason`, why there is no interval."""
    return {"mean": mean, "lo": None, "hi": None, "n": int(n), "method": method, "reason": reason}
