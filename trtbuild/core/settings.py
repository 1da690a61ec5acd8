"""The one way a stage's settings object takes keyword overrides (export, quantize, profile settings)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

S = TypeVar("S")


def with_overrides(cls: type[S], base: S | None, overrides: Mapping[str, Any], stage: str) -> S:
    """``base`` (or ``cls``'s defaults) with ``overrides`` applied, validated again by ``cls``; an unknown
    name is a programming error (TypeError), like an unknown keyword argument."""
    if base is not None and not overrides:
        return base  # already made, so already validated
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown {stage} setting(s): {', '.join(unknown)}")
    values = {name: getattr(base, name) for name in names} if base is not None else {}
    return cls(**{**values, **overrides})
