"""Device arrays, streams and events on the primary context."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from cuda.bindings import driver as cu

from ptxgen.vecio import from_bf16, to_bf16  # noqa: F401 (the host's bf16 conversions, re-exported)

from .driver import call, device

# dtype name -> host numpy dtype. bf16 has no numpy dtype: on the host it is its uint16 bit pattern.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16),
    "i32": np.dtype(np.int32), "i64": np.dtype(np.int64), "u8": np.dtype(np.uint8),
}
_FROM_NUMPY = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.int32): "i32",
               np.dtype(np.int64): "i64", np.dtype(np.uint8): "u8",
               np.dtype(np.uint16): "bf16"}  # uint16 on the host is bf16 bits (see to_bf16)


class Stream:
    """A CUDA stream. ``Stream.null()`` is the legacy default stream."""

    def __init__(self, handle: Any = None, urgent: bool = False):
        """A new non-blocking stream (or a wrapper of ``handle``). ``urgent``: the device's greatest
        priority, whose blocks the scheduler starts before any waiting block of a normal stream
        (communication that must keep pace with a compute stream)."""
        if handle is None:
            device()
            flags = cu.CUstream_flags.CU_STREAM_NON_BLOCKING
            if urgent:
                _, greatest = call("cuCtxGetStreamPriorityRange")
                handle = call("cuStreamCreateWithPriority", flags, greatest)
            else:
                handle = call("cuStreamCreate", flags)
            self._owned = True
        else:
            self._owned = False
        self.handle = handle
        self._keepalive: list[np.ndarray] = []  # host buffers of async copies still in flight

    @classmethod
    def null(cls) -> "Stream":
        return cls(cu.CUstream(0))

    def synchronize(self) -> None:
        call("cuStreamSynchronize", self.handle)
        self._keepalive.clear()

    def destroy(self) -> None:
        if self._owned and self.handle is not None:
            self.synchronize()
            call("cuStreamDestroy", self.handle)
        self.handle = None


def _stream_handle(stream: Stream | None) -> Any:
    return cu.CUstream(0) if stream is None else stream.handle


class Event:
    def __init__(self) -> None:
        device()
        self.handle = call("cuEventCreate", cu.CUevent_flags.CU_EVENT_DEFAULT)

    def record(self, stream: Stream | None = None) -> "Event":
        call("cuEventRecord", self.handle, _stream_handle(stream))
        return self

    def synchronize(self) -> None:
        call("cuEventSynchronize", self.handle)

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to ``end`` (both recorded; waits for ``end``)."""
        end.synchronize()
        return call("cuEventElapsedTime", self.handle, end.handle)

    def destroy(self) -> None:
        if self.handle is not None:
            call("cuEventDestroy", self.handle)
            self.handle = None


class PinnedArray:
    """Page-locked host memory of a shape and dtype, as a numpy array (``array``): the device copies
    to and from it asynchronously, where a pageable buffer's copy may wait for the stream's earlier
    work (a step's inputs staged while the GPU still runs, its results read back in one wait)."""

    def __init__(self, shape: int | Sequence[int], dtype: str = "f32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        device()
        self.ptr: int | None = int(call("cuMemHostAlloc", max(nbytes, 1), 0))
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(self.ptr))[:nbytes] \
            .view(DTYPES[dtype]).reshape(shape)

    def free(self) -> None:
        """Give the memory back; views of ``array`` taken before are the owner's to drop first."""
        if self.ptr is not None:
            self.array = None  # type: ignore[assignment]
            call("cuMemFreeHost", self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # interpreter shutdown: the context may already be gone
            pass


def fill_u32(ptr: int, bits: int, count: int, stream: Stream | None = None) -> None:
    """Set ``count`` 32-bit words from device address ``ptr`` (a region inside a larger array)."""
    call("cuMemsetD32Async", ptr, bits, count, _stream_handle(stream))


@dataclass(frozen=True)
class View:
    """A named region of device memory: a parameter inside a flat buffer, an activation, some rows."""

    name: str
    ptr: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype].itemsize

    def shifted(self, byte_offset: int) -> "View":
        """The same name and shape ``byte_offset`` bytes on (say, the rows a decoding step writes)."""
        return self if not byte_offset else View(f"{self.name}+{byte_offset}", self.ptr + byte_offset,
                                                 self.shape, self.dtype)

    def upload(self, host: np.ndarray, stream: Stream | None = None) -> None:
        """Host -> device; ``host`` must fill the view exactly. Synchronous, unless a ``stream`` is
        given: then the copy runs in the stream's order, and ``host`` (page-locked: a PinnedArray's,
        or the copy may wait for the stream's earlier work) must stay unchanged until it has."""
        if stream is None:
            host = np.ascontiguousarray(host, dtype=DTYPES[self.dtype])
        elif not (host.flags.c_contiguous and host.dtype == DTYPES[self.dtype]):
            raise ValueError(f"an asynchronous copy to {self.name} needs a contiguous {self.dtype} array as it is")
        if host.nbytes != self.nbytes:
            raise ValueError(f"host array of {host.nbytes} bytes for {self.name} of {self.nbytes}")
        if stream is None:
            call("cuMemcpyHtoD", self.ptr, host.ctypes.data, self.nbytes)
        else:
            call("cuMemcpyHtoDAsync", self.ptr, host.ctypes.data, self.nbytes, stream.handle)

    def download(self, out: np.ndarray, stream: Stream) -> np.ndarray:
        """Device -> ``out`` (page-locked) in ``stream``'s order: synchronize it before reading ``out``."""
        if not (out.flags.c_contiguous and out.dtype == DTYPES[self.dtype] and out.nbytes == self.nbytes):
            raise ValueError(f"{self.name} downloads into a contiguous {self.dtype} array of {self.nbytes} bytes")
        call("cuMemcpyDtoHAsync", out.ctypes.data, self.ptr, self.nbytes, stream.handle)
        return out

    def to_numpy(self) -> np.ndarray:
        out = np.empty(self.shape, DTYPES[self.dtype])
        call("cuMemcpyDtoH", out.ctypes.data, self.ptr, self.nbytes)
        return out

    def rows(self, start: int, count: int) -> "View":
        """Rows [start, start + count) of a view of rows."""
        row = math.prod(self.shape[1:]) * DTYPES[self.dtype].itemsize
        return View(f"{self.name}[{start}:{start + count}]", self.ptr + start * row, (count, *self.shape[1:]),
                    self.dtype)


class DeviceArray:
    """A device allocation with a shape and dtype. Free it with ``free()`` or a ``with`` block."""

    def __init__(self, shape: int | Sequence[int], dtype: str = "f32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        self.dtype = dtype
        self.nbytes = math.prod(self.shape) * DTYPES[dtype].itemsize
        device()
        self.ptr = int(call("cuMemAlloc", max(self.nbytes, 1)))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_numpy(cls, host: np.ndarray, dtype: str | None = None) -> "DeviceArray":
        """Copy ``host`` to a new device array (bf16 arrays are given as uint16 bits)."""
        host = np.ascontiguousarray(host)
        if dtype is None:
            if host.dtype not in _FROM_NUMPY:
                raise ValueError(f"no device dtype for numpy {host.dtype}; pass dtype=")
            dtype = _FROM_NUMPY[host.dtype]
        arr = cls(host.shape, dtype)
        arr.upload(host)
        return arr

    def _checked_host(self, host: np.ndarray) -> np.ndarray:
        host = np.ascontiguousarray(host, dtype=DTYPES[self.dtype])
        if host.nbytes != self.nbytes:
            raise ValueError(f"host array of {host.nbytes} bytes for a device array of {self.nbytes}")
        return host

    def upload(self, host: np.ndarray, stream: Stream | None = None) -> None:
        """Host -> device; synchronous unless a stream is given (then keep host alive: we do)."""
        host = self._checked_host(host)
        if stream is None:
            call("cuMemcpyHtoD", self.ptr, host.ctypes.data, self.nbytes)
        else:
            stream._keepalive.append(host)
            call("cuMemcpyHtoDAsync", self.ptr, host.ctypes.data, self.nbytes, stream.handle)

    def download(self, out: np.ndarray | None = None, stream: Stream | None = None) -> np.ndarray:
        """Device -> host. With a stream the copy is async: synchronize before reading ``out``."""
        out = np.empty(self.shape, DTYPES[self.dtype]) if out is None else out
        if not (out.flags.c_contiguous and out.nbytes == self.nbytes):
            raise ValueError("download target must be contiguous and the same size")
        if stream is None:
            call("cuMemcpyDtoH", out.ctypes.data, self.ptr, self.nbytes)
        else:
            call("cuMemcpyDtoHAsync", out.ctypes.data, self.ptr, self.nbytes, stream.handle)
        return out

    def to_numpy(self) -> np.ndarray:
        return self.download()

    def fill_u32(self, bits: int, stream: Stream | None = None) -> None:
        """Set every 32-bit word (e.g. 0x7FC00000 = NaN to poison an output before a test)."""
        if self.nbytes % 4:
            raise ValueError("fill_u32 needs a size that is a multiple of 4 bytes")
        fill_u32(self.ptr, bits, self.nbytes // 4, stream)

    def view(self, name: str, element_offset: int = 0, shape: tuple[int, ...] | None = None) -> View:
        """A named view of this array: all of it, or ``shape`` elements from ``element_offset``."""
        shape = self.shape if shape is None else shape
        if element_offset < 0 or element_offset + math.prod(shape) > self.size:
            raise ValueError(f"view {name} of {shape} at {element_offset} is outside an array of {self.size}")
        return View(name, self.ptr + element_offset * DTYPES[self.dtype].itemsize, tuple(shape), self.dtype)

    def free(self) -> None:
        if self.ptr:
            call("cuMemFree", self.ptr)
            self.ptr = 0

    def __enter__(self) -> "DeviceArray":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # interpreter shutdown: the context may already be gone
            pass

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype!r}, ptr=0x{self.ptr:x})"
