"""Kernel handles and launches with arguments packed once, ahead of the hot path."""
from __future__ import annotations

import ctypes
import numbers
from typing import Any, Mapping, Sequence

from cuda.bindings import driver as cu

from ptxgen.builder import T
from ptxgen.hw import STATIC_SHARED_LIMIT
from ptxgen.spec import KernelSpec

from .driver import CudaError, call, device
from .memory import DeviceArray, Stream

_CTYPES = {T.U64: ctypes.c_uint64, T.S64: ctypes.c_int64, T.U32: ctypes.c_uint32,
           T.S32: ctypes.c_int32, T.F32: ctypes.c_float, T.F64: ctypes.c_double}
_FLOATS = (T.F32, T.F64)
_RANGES = {T.U64: (0, 2**64 - 1), T.S64: (-2**63, 2**63 - 1), T.U32: (0, 2**32 - 1), T.S32: (-2**31, 2**31 - 1)}
_cuLaunchKernel = cu.cuLaunchKernel  # bound once: the launch hot path does no attribute lookups


def _dims(d: int | Sequence[int]) -> tuple[int, int, int]:
    t = (d,) if isinstance(d, int) else tuple(d)
    if not 1 <= len(t) <= 3 or any(not isinstance(v, int) or v < 1 for v in t):
        raise ValueError(f"launch dimensions must be 1-3 positive ints, got {d!r}")
    return (t + (1, 1))[:3]


class Launch:
    """One prepared launch: calling it issues cuLaunchKernel with prepacked arguments, which stay at
    fixed addresses (``params_address``), so a CUDA graph node can read them too."""

    __slots__ = ("_args", "_values", "_array", "_positions", "kernel", "grid", "block", "shared", "stream")

    def __init__(self, kernel: "Kernel", grid: tuple[int, int, int], block: tuple[int, int, int],
                 shared: int, stream: Any, values: list[Any]):
        self.kernel, self.block, self.shared, self.stream = kernel, block, shared, stream
        self._positions = {name: i for i, (name, _) in enumerate(kernel.params)}
        self._values = values  # keeps the ctypes values alive while the pointer array points at them
        self._array = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        self.set_grid(grid)

    @property
    def params_address(self) -> int:
        """The address of the kernel's argument pointer array (cuLaunchKernel's kernelParams)."""
        return ctypes.addressof(self._array)

    def set(self, name: str, value: float | int) -> None:
        """Change the argument called ``name`` (say a learning rate) of this prepared launch in place."""
        if name not in self._positions:
            raise TypeError(f"{self.kernel.spec.entry} has no argument {name!r}")
        self._values[self._positions[name]].value = self.kernel.value(name, value).value

    def set_grid(self, grid: int | Sequence[int]) -> None:
        self.grid = _dims(grid)
        self._args = (self.kernel.function, *self.grid, *self.block, self.shared, self.stream,
                      ctypes.addressof(self._array), 0)

    def __call__(self) -> None:
        err, = _cuLaunchKernel(*self._args)
        if err:  # CUresult is an int enum; CUDA_SUCCESS is 0
            raise CudaError("cuLaunchKernel", err, "launch failed")


class Kernel:
    """A loaded kernel function, known by its spec; obtain it only through ModuleCache.get."""

    def __init__(self, spec: KernelSpec, module: Any, function: Any):
        self.spec, self.module, self.function = spec, module, function
        self.params = spec.params()
        self._types = dict(self.params)
        self._shared_limit = STATIC_SHARED_LIMIT

    def value(self, name: str, a: Any) -> Any:
        """Argument ``name`` as the ctypes value the launch passes, after refusing a value its
        parameter cannot hold (a float for an integer, an int out of range, a misaligned pointer)."""
        t = self._types[name]
        if isinstance(a, DeviceArray):
            if t is not T.U64:
                raise TypeError(f"{self.spec.entry}: {name} is .{t.value}, got a device array")
            a = a.ptr
        if isinstance(a, bool) or not isinstance(a, numbers.Real if t in _FLOATS else numbers.Integral):
            raise TypeError(f"{self.spec.entry}: {name} is .{t.value}, got {type(a).__name__} {a!r}")
        a = float(a) if t in _FLOATS else int(a)  # numpy scalars too
        if t not in _FLOATS and not _RANGES[t][0] <= a <= _RANGES[t][1]:
            raise ValueError(f"{self.spec.entry}: {name}={a} does not fit .{t.value}")
        if t is T.U64 and a % self.spec.pointer_alignment(name):
            raise ValueError(f"{self.spec.entry}: pointer {name}=0x{a:x} is not "
                             f"{self.spec.pointer_alignment(name)}-byte aligned")
        return _CTYPES[t](a)

    def pack(self, args: Sequence[Any]) -> list[Any]:
        if len(args) != len(self.params):
            names = ", ".join(n for n, _ in self.params)
            raise TypeError(f"{self.spec.entry} takes {len(self.params)} arguments ({names}), got {len(args)}")
        return [self.value(name, a) for (name, _), a in zip(self.params, args)]

    def pack_named(self, args: Mapping[str, Any]) -> list[Any]:
        """``args`` by parameter name: every one of the spec's parameters, nothing else."""
        missing = [n for n, _ in self.params if n not in args]
        extra = [n for n in args if n not in self._types]
        if missing or extra:
            raise TypeError(f"{self.spec.entry}: " + "; ".join(
                f"{what} argument{'s' if len(names) > 1 else ''} {', '.join(names)}"
                for what, names in (("missing", missing), ("unknown", extra)) if names))
        return [self.value(name, args[name]) for name, _ in self.params]

    def bind(self, grid: int | Sequence[int], block: int | Sequence[int], *args: Any,
             shared: int | None = None, stream: Stream | None = None) -> Launch:
        """``shared``: dynamic shared bytes, by default what the spec says its kernel needs."""
        shared = self._allow_shared(self.spec.dynamic_shared_bytes() if shared is None else shared)
        handle = cu.CUstream(0) if stream is None else stream.handle
        return Launch(self, _dims(grid), _dims(block), shared, handle, self.pack(args))

    def bind_named(self, grid: int | Sequence[int], block: int | Sequence[int], args: Mapping[str, Any], *,
                   shared: int | None = None, stream: Stream | None = None) -> Launch:
        """``bind`` with the arguments by the spec's parameter names (checked: none missing, none extra)."""
        shared = self._allow_shared(self.spec.dynamic_shared_bytes() if shared is None else shared)
        handle = cu.CUstream(0) if stream is None else stream.handle
        return Launch(self, _dims(grid), _dims(block), shared, handle, self.pack_named(args))

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
