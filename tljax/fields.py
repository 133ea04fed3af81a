"""Dataclasses from config dicts: unknown keys are errors that list the valid ones, never silently ignored."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def from_fields(cls, values: Mapping[str, Any], what: str):
    """`cls(**values)` after checking every key is a field of the dataclass `cls`.

    Args:
      what: how the error names the thing being configured, e.g. "engine config key", "phase field".
    """
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {sorted(valid)}")
    return cls(**values)
