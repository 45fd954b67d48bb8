"""Strict JSON for every file the project writes: no NaN or infinity, ever.

`json.dumps` writes NaN and Infinity by default, which strict parsers (and `json.loads` with
`parse_constant` raising) reject. Every stage writes with `allow_nan=False` (whole files
through `fileio.atomic_write_json`, which refuses them too), so a non-finite number that
slipped through fails loudly at write time instead of corrupting a results file; a value
that cannot be computed is written as None (with a "reason" where it is a statistic).
"""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps that refuses NaN and infinity (ValueError)."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None, recursively (dicts, lists, tuples).

    For metrics that may legitimately be undefined (FVE of a constant model) and for values
    copied from files written elsewhere; a computed statistic says why it is None instead.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def has_nonfinite(obj: Any) -> bool:
    """Whether `obj` is, or holds in nested dicts, lists and tuples, a NaN/inf float."""
    if isinstance(obj, dict):
        return any(has_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_nonfinite(v) for v in obj)
    return isinstance(obj, float) and not math.isfinite(obj)
