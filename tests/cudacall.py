"""Test helper: run a kernel from the cache on numpy arrays and get every array back."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ptxgen.hw import MmaType
from ptxgen.vecio import from_bf16, to_bf16
from runtime import DeviceArray, ModuleCache
from runtime.driver import synchronize


def call(cache: ModuleCache, spec: Any, dims: tuple, *args: Any) -> list[np.ndarray]:
    """Upload array args (uint16 = bf16 bits), pass scalars through, launch, download the arrays."""
    grid, block = dims
    device = [DeviceArray.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
    try:
        cache.get(spec)(grid, block, *device)
        synchronize()
        return [d.to_numpy() for d in device if isinstance(d, DeviceArray)]
    finally:
        for d in device:
            if isinstance(d, DeviceArray):
                d.free()


def poison(shape: Sequence[int] | int, dtype=np.float32) -> np.ndarray:
    """An output buffer full of NaN (bf16 NaN bits for uint16): unwritten elements stay NaN."""
    return np.full(shape, 0x7FC0 if dtype == np.uint16 else np.nan, dtype=dtype)


def sixteen(x: np.ndarray, dtype: MmaType) -> tuple[np.ndarray, np.ndarray]:
    """(device bits of x rounded to the 16-bit ``dtype``, the float64 values they hold)."""
    if dtype is MmaType.F16:
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    bits = to_bf16(x.astype(np.float32))
    return bits, from_bf16(bits).astype(np.float64)


def values(bits: np.ndarray, dtype: MmaType) -> np.ndarray:
    """The float64 values of 16-bit ``dtype`` device bits."""
    return bits.view(np.float16).astype(np.float64) if dtype is MmaType.F16 else from_bf16(bits).astype(np.float64)
