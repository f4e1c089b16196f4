"""Kernel handles and launches with arguments packed once, ahead of the hot path."""
from __future__ import annotations

import ctypes
from typing import Any, Sequence

from cuda.bindings import driver as cu

from ptxgen.builder import T
from ptxgen.hw import STATIC_SHARED_LIMIT
from ptxgen.spec import KernelSpec

from .driver import CudaError, call, device
from .memory import DeviceArray, Stream

_CTYPES = {T.U64: ctypes.c_uint64, T.S64: ctypes.c_int64, T.U32: ctypes.c_uint32,
           T.S32: ctypes.c_int32, T.F32: ctypes.c_float, T.F64: ctypes.c_double}
_cuLaunchKernel = cu.cuLaunchKernel  # bound once: the launch hot path does no attribute lookups


def _dims(d: int | Sequence[int]) -> tuple[int, int, int]:
    t = (d,) if isinstance(d, int) else tuple(d)
    if not 1 <= len(t) <= 3 or any(not isinstance(v, int) or v < 1 for v in t):
        raise ValueError(f"launch dimensions must be 1-3 positive ints, got {d!r}")
    return (t + (1, 1))[:3]


class Launch:
    """One prepared launch: calling it issues cuLaunchKernel with prepacked arguments."""

    __slots__ = ("_args", "_values", "_array", "kernel", "grid")

    def __init__(self, kernel: "Kernel", grid: tuple[int, int, int], block: tuple[int, int, int],
                 shared: int, stream: Any, values: list[Any]):
        self.kernel, self.grid = kernel, grid  # what it launches, on how many blocks (for a profile)
        fn = kernel.function
        self._values = values  # keeps the ctypes values alive while the pointer array points at them
        self._array = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        self._args = (fn, *grid, *block, shared, stream, ctypes.addressof(self._array), 0)

    def set_arg(self, position: int, value: float | int) -> None:
        """Change one scalar argument (say a learning rate) of this prepared launch in place."""
        self._values[position].value = value

    def __call__(self) -> None:
        err, = _cuLaunchKernel(*self._args)
        if err:  # CUresult is an int enum; CUDA_SUCCESS is 0
            raise CudaError("cuLaunchKernel", err, "launch failed")


class Kernel:
    """A loaded kernel function, known by its spec; obtain it only through ModuleCache.get."""

    def __init__(self, spec: KernelSpec, module: Any, function: Any):
        self.spec, self.module, self.function = spec, module, function
        self.params = spec.params()
        self._shared_limit = STATIC_SHARED_LIMIT

    def pack(self, args: Sequence[Any]) -> list[Any]:
        if len(args) != len(self.params):
            names = ", ".join(n for n, _ in self.params)
            raise TypeError(f"{self.spec.entry} takes {len(self.params)} arguments ({names}), got {len(args)}")
        values = []
        for (name, t), a in zip(self.params, args):
            if isinstance(a, DeviceArray):
                if t is not T.U64:
                    raise TypeError(f"{self.spec.entry}: {name} is .{t.value}, got a device array")
                a = a.ptr
            if t is T.U64 and int(a) % self.spec.pointer_alignment(name):
                raise ValueError(f"{self.spec.entry}: pointer {name}=0x{int(a):x} is not "
                                 f"{self.spec.pointer_alignment(name)}-byte aligned")
            values.append(_CTYPES[t](a))
        return values

    def bind(self, grid: int | Sequence[int], block: int | Sequence[int], *args: Any,
             shared: int | None = None, stream: Stream | None = None) -> Launch:
        """``shared``: dynamic shared bytes, by default what the spec says its kernel needs."""
        shared = self._allow_shared(self.spec.dynamic_shared_bytes() if shared is None else shared)
        handle = cu.CUstream(0) if stream is None else stream.handle
        return Launch(self, _dims(grid), _dims(block), shared, handle, self.pack(args))

    def __call__(self, grid: int | Sequence[int], block: int | Sequence[int], *args: Any,
                 shared: int | None = None, stream: Stream | None = None) -> None:
        self.bind(grid, block, *args, shared=shared, stream=stream)()

    def _allow_shared(self, shared: int) -> int:
        """Raise the function's dynamic shared memory limit to ``shared`` bytes when past the default."""
        if shared > self._shared_limit:
            call("cuFuncSetAttribute", self.function,
                 cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
            self._shared_limit = shared
        return shared

    def resident_blocks(self, threads: int) -> int:
        """Blocks of ``threads`` (with the spec's dynamic shared memory) the whole GPU runs at once:
        the occupancy per SM times the SM count, i.e. the blocks in one wave."""
        shared = self._allow_shared(self.spec.dynamic_shared_bytes())
        per_sm = call("cuOccupancyMaxActiveBlocksPerMultiprocessor", self.function, threads, shared)
        return per_sm * device().attribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)

    @property
    def registers(self) -> int:
        return call("cuFuncGetAttribute", cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS, self.function)
