"""Validation shared by the kernel specs: a value passes only if the PTX means what the field says."""
from __future__ import annotations

from fractions import Fraction

from .. import exact
from ..spec import SpecError

MAX_GRID_YZ = 65535       # gridDim.y and gridDim.z limit
MAX_ROW_ELEMENTS = 2**28  # a row's byte offset (elements x up to 16 bytes) stays in the kernels' 32-bit math
MAX_LOOP_BOUND = 65535    # a baked trip count or group size: far beyond any useful value, inside 32-bit math


def check_block_size(block_size: int) -> None:
    if block_size % 32 or not 32 <= block_size <= 1024:
        raise SpecError(f"block_size must be a multiple of 32 in [32, 1024], got {block_size}")


def check_positive(name: str, value: float | int) -> None:
    if not value > 0:
        raise SpecError(f"{name} must be > 0, got {value!r}")


def check_at_most(name: str, value: int, limit: int, why: str) -> None:
    if value > limit:
        raise SpecError(f"{name} must be <= {limit} ({why}), got {value!r}")


def check_f32(name: str, value: float, positive: bool = False) -> float:
    """``value`` as the f32 immediate the kernel bakes in; refused where that f32 would not mean the
    field: overflow, a nonzero value flushed to zero or to a subnormal, or <= 0 when > 0 is required."""
    if positive:
        check_positive(name, value)
    try:
        as_f32 = exact.f32(Fraction(value))
    except OverflowError:
        raise SpecError(f"{name} {value!r} overflows f32, the type the kernel computes in") from None
    if value != 0 and abs(as_f32) < exact.F32_MIN_NORMAL:
        raise SpecError(f"{name} {value!r} is below the smallest normal f32 ({exact.F32_MIN_NORMAL!r}): the "
                        f"kernel would compute with {as_f32!r}")
    return as_f32
