"""Frozen config dataclasses as JSON: one helper shared by schemes and other versioned configs."""

from __future__ import annotations

import dataclasses
from typing import Any


def fields_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a JSON-ready dict (tuples become lists)."""
    return {
        f.name: list(value) if isinstance(value := getattr(obj, f.name), tuple) else value
        for f in dataclasses.fields(obj)
    }
