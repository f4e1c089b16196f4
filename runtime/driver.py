"""The CUDA driver API through cuda-python: every call checked, one primary context per process.

Importing this module needs no GPU; the first call that needs the driver raises CudaUnavailable
with the reason when there is none.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver as cu


class CudaError(RuntimeError):
    """A driver call failed: names the call, the CUresult and the driver's message."""

    def __init__(self, call: str, result: Any, message: str):
        self.call, self.result = call, result
        name = getattr(result, "name", str(result))
        super().__init__(f"{call} failed: {name}: {message}")


class CudaUnavailable(CudaError):
    """No usable driver or device on this machine."""


def _describe(result: Any) -> str:
    err, text = cu.cuGetErrorString(result)
    return text.decode() if err == cu.CUresult.CUDA_SUCCESS and text else "no description"


def check(call: str, ret: Any) -> Any:
    """Unpack a ``cuda.bindings`` return tuple, raising CudaError unless it is CUDA_SUCCESS."""
    result, *values = ret if isinstance(ret, tuple) else (ret,)
    if result != cu.CUresult.CUDA_SUCCESS:
        raise CudaError(call, result, _describe(result))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def call(name: str, *args: Any) -> Any:
    """``check(name, cu.<name>(*args))``: the call is named in any error."""
    return check(name, getattr(cu, name)(*args))


@dataclass(frozen=True)
class Device:
    ordinal: int
    handle: Any
    context: Any
    name: str
    compute_capability: tuple[int, int]
    driver_version: int

    @property
    def arch(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    def attribute(self, attr: cu.CUdevice_attribute) -> int:
        return call("cuDeviceGetAttribute", attr, self.handle)


_retained: list[Any] = []  # every primary-context retain of device(), for release()


@functools.cache
def device(ordinal: int = 0) -> Device:
    """Initialise the driver, retain device ``ordinal``'s primary context and make it current."""
    try:
        result = cu.cuInit(0)
    except Exception as e:  # the driver library itself is missing (cuda-pathfinder raises)
        raise CudaUnavailable("cuInit", "CUDA_ERROR_NO_DRIVER", f"no CUDA driver found: {e}") from None
    if result[0] != cu.CUresult.CUDA_SUCCESS:
        raise CudaUnavailable("cuInit", result[0], _describe(result[0]))
    count = call("cuDeviceGetCount")
    if ordinal >= count:
        raise CudaUnavailable("cuDeviceGet", "CUDA_ERROR_INVALID_DEVICE",
                              f"device {ordinal} requested, {count} present")
    handle = call("cuDeviceGet", ordinal)
    ctx = call("cuDevicePrimaryCtxRetain", handle)
    _retained.append(handle)
    call("cuCtxSetCurrent", ctx)
    raw = call("cuDeviceGetName", 256, handle)
    name = raw.split(b"\0", 1)[0].decode()
    a = cu.CUdevice_attribute
    cc = (call("cuDeviceGetAttribute", a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle),
          call("cuDeviceGetAttribute", a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle))
    return Device(ordinal, handle, ctx, name, cc, call("cuDriverGetVersion"))


def release() -> None:
    """Give back the primary context ``device`` retained (its memory on the GPU goes with it once
    nothing else holds it): for a process done with the GPU, such as the parent of ``--gpus N``,
    whose ranks need the memory. A later ``device()`` retains it anew."""
    while _retained:  # device() and device(0) are two cache entries, each a retain
        call("cuDevicePrimaryCtxRelease", _retained.pop())
    device.cache_clear()


def device_count() -> int:
    """How many CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied); 0 without a
    driver or a device."""
    try:
        device()
    except CudaError:
        return 0
    return call("cuDeviceGetCount")


def available() -> tuple[bool, str]:
    """(True, device description) or (False, why not): for skipping GPU tests with a reason."""
    try:
        d = device()
    except CudaError as e:
        return False, str(e)
    return True, f"{d.name} ({d.arch}, driver {d.driver_version})"


def synchronize() -> None:
    device()
    call("cuCtxSynchronize")
