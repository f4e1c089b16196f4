"""CUDA driver runtime: checked driver calls, device memory, the spec-keyed module cache, launches.

Knows kernels only as specs (``ModuleCache.get(spec)``), never by name.
"""
from .cache import CacheStats, KeyCollisionError, ModuleCache, StrictMissError
from .driver import CudaError, CudaUnavailable, available, device
from .launch import Kernel, Launch
from .memory import DeviceArray, Event, PinnedArray, Stream, View, fill_u32, from_bf16, to_bf16

__all__ = ["CacheStats", "CudaError", "CudaUnavailable", "DeviceArray", "Event", "PinnedArray", "Kernel",
           "KeyCollisionError", "Launch", "ModuleCache", "StrictMissError", "Stream", "available",
           "View", "device", "fill_u32", "from_bf16", "to_bf16"]
