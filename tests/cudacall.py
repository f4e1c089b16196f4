"""Test helper: run a kernel from the cache on numpy arrays and get every array back."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

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
