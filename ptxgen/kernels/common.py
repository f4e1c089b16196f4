"""Validation shared by the kernel specs."""
from __future__ import annotations

from ..spec import SpecError


def check_block_size(block_size: int) -> None:
    if block_size % 32 or not 32 <= block_size <= 1024:
        raise SpecError(f"block_size must be a multiple of 32 in [32, 1024], got {block_size}")


def check_positive(name: str, value: float | int) -> None:
    if not value > 0:
        raise SpecError(f"{name} must be > 0, got {value!r}")
