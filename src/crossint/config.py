"""Validated dataclass configs that round-trip through JSON.

Configs check themselves on construction (``__post_init__``) and fail with a message naming the
setting, the value and what is allowed, before any tensor is allocated or file written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NoReturn, TypeVar

from crossint.errors import CrossintError

C = TypeVar("C", bound="JsonConfig")


def invalid(kind: str, name: str, value: Any, allowed: str) -> NoReturn:
    raise CrossintError(f"invalid {kind} setting {name}={value!r}: {allowed}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class JsonConfig:
    """Mixin for config dataclasses: ``to_dict``, ``from_dict`` (strict), ``replace``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Any, where: str = "config") -> C:
        if not isinstance(data, dict):
            raise CrossintError(f"{where} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CrossintError(
                f"{where} has unknown settings {unknown}; known settings are {sorted(known)}"
            )
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise CrossintError(f"{where} lacks required settings {missing}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)
