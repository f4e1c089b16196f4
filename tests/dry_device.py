"""Plans built on a machine without a GPU: device memory as made-up addresses, kernels unloaded.

Building a plan checks every argument by name against its kernel's parameters, so the whole
model's plan can be built, and read, in CI. Nothing is launched: ``allocations`` records what was
allocated; a launch does nothing and a download is an error. Pass a ``DryCache()`` where a ModuleCache goes.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator

import pytest

from ptxgen.hw import SHARED_LIMIT
from runtime import launch, memory
from runtime.launch import Kernel

WAVE = 264  # resident blocks of any kernel on the made-up GPU (two per SM on 132 SMs)


class DryCache:
    """ModuleCache's interface without a device: kernels by spec, unloaded, strict mode enforced."""

    def __init__(self) -> None:
        self.strict = False
        self._kernels: dict[object, DryKernel] = {}

    def get(self, spec):
        if spec not in self._kernels:
            if self.strict:
                raise AssertionError(f"strict mode: {spec!r} was not pre-warmed")
            self._kernels[spec] = DryKernel(spec, None, None)
        return self._kernels[spec]

    def prewarm(self, specs) -> list:
        return [self.get(s) for s in specs]

    @contextlib.contextmanager
    def strict_mode(self):
        saved, self.strict = self.strict, True
        try:
            yield self
        finally:
            self.strict = saved


class DryKernel(Kernel):
    def resident_blocks(self, threads: int) -> int:
        """Two blocks an SM, but one where the spec's shared memory is more than half an SM's."""
        return WAVE // 2 if 2 * self.spec.dynamic_shared_bytes() > SHARED_LIMIT else WAVE

    def _allow_shared(self, shared: int) -> int:
        return shared


@contextlib.contextmanager
def dry_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    allocations: list[tuple[int, int]] = []  # (address, bytes)
    next_free = [1 << 32]
    lock = threading.Lock()  # ranks as threads allocate at once
    pinned: dict[int, ctypes.Array] = {}  # address -> its buffer, alive until freed

    def call(name: str, *args):
        if name == "cuMemAlloc":
            with lock:
                ptr = next_free[0]
                next_free[0] += -(-args[0] // 256) * 256
                allocations.append((ptr, args[0]))
            return ptr
        if name == "cuMemHostAlloc":  # page-locked host memory: plain host memory here
            buf = ctypes.create_string_buffer(args[0])
            with lock:
                pinned[ctypes.addressof(buf)] = buf
            return ctypes.addressof(buf)
        if name == "cuMemFreeHost":
            with lock:
                del pinned[args[0]]
            return None
        if name in ("cuMemFree", "cuMemcpyHtoD", "cuMemcpyHtoDAsync", "cuMemsetD32Async", "cuStreamSynchronize",
                    "cuEventDestroy"):
            return None
        if name == "cuEventCreate":  # a plan's events (a data-parallel rank's): never recorded here
            return object()
        raise AssertionError(f"{name} on a machine without a GPU")

    monkeypatch.setattr(memory, "device", lambda *a: None)
    monkeypatch.setattr(memory, "call", call)
    monkeypatch.setattr(launch, "_cuLaunchKernel", lambda *args: (0,))  # launched: nothing runs
    monkeypatch.setattr("model.cuda_ops.gemm_tensor_maps",
                        lambda spec, a, b, *rest: (memory.DeviceArray(128, "u8"), memory.DeviceArray(128, "u8")))
    monkeypatch.setattr("model.cuda_ops.gemm_c_tensor_map", lambda spec, c, *rest, **kw: memory.DeviceArray(128, "u8"))
    yield allocations
