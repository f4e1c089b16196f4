"""PTX -> cubin through nvJitLink (no GPU needed), with ptxas' resource figures parsed from its log."""
from __future__ import annotations

import re
from dataclasses import dataclass


class AssemblyError(RuntimeError):
    """ptxas rejected the PTX; the message carries its log."""


class AssemblerUnavailable(RuntimeError):
    """nvJitLink (pip package nvidia-nvjitlink, used via cuda-bindings) is not installed."""


@dataclass(frozen=True)
class Assembly:
    cubin: bytes
    log: str
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    stack_bytes: int | None


def _nvjitlink():
    try:
        from cuda.bindings import nvjitlink
        nvjitlink.version()
    except Exception as e:  # ImportError, or the shared library not found by cuda-pathfinder
        raise AssemblerUnavailable(f"nvJitLink is not available ({e}); pip install nvidia-nvjitlink") from None
    return nvjitlink


def _log(nvjitlink, handle, size_fn, get_fn) -> str:
    size = size_fn(handle)
    if size <= 1:
        return ""
    buf = bytearray(size)
    get_fn(handle, buf)
    return buf.rstrip(b"\0").decode(errors="replace")


def _figure(pattern: str, log: str) -> int | None:
    m = re.search(pattern, log)
    return int(m[1]) if m else None


def assemble(ptx: str, arch: str) -> Assembly:
    """Assemble one PTX module for ``arch`` (e.g. ``sm_90``) and return the cubin and ptxas figures."""
    nvjitlink = _nvjitlink()
    try:
        handle = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    except nvjitlink.nvJitLinkError as e:  # an architecture this nvJitLink does not know or serve
        raise AssemblyError(f"nvJitLink cannot assemble for {arch}: {e}") from None
    try:
        data = ptx.encode()
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as e:
            err = _log(nvjitlink, handle, nvjitlink.get_error_log_size, nvjitlink.get_error_log)
            raise AssemblyError(f"ptxas failed for {arch}: {e}\n{err}") from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        log = _log(nvjitlink, handle, nvjitlink.get_info_log_size, nvjitlink.get_info_log)
    finally:
        nvjitlink.destroy(handle)
    return Assembly(bytes(cubin), log,
                    registers=_figure(r"Used (\d+) registers", log),
                    spill_stores=_figure(r"(\d+) bytes spill stores", log),
                    spill_loads=_figure(r"(\d+) bytes spill loads", log),
                    stack_bytes=_figure(r"(\d+) bytes stack frame", log))
