"""ModuleCache: the only way to obtain a kernel. Memory map + on-disk cubins, keyed by spec digest.

What guards the in-memory map, whose hit is one dict lookup with no PTX hashing:
- the key cannot disagree with the spec's fields (``KernelSpec.key`` re-keys a spec whose fields
  changed, and classes outside the generator have their source in the key);
- a hit checks that the loaded kernel's spec is of the asking spec's class (one identity test), so
  two classes under one key are a loud ``KeyCollisionError``, never the other class's kernel;
- every first load of a key in this process emits the PTX, and its text digest is recorded per
  process (across every cache): another text under a key seen before, in memory or on disk, is a
  ``KeyCollisionError``. The golden PTX digests (``tests/golden``) pin the text across hosts.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cuda.bindings import driver as cu

from ptxgen.assemble import AssemblerUnavailable, AssemblyError, assemble
from ptxgen.files import write_atomic
from ptxgen.spec import KernelSpec, Target, sha256_hex
from ptxgen.specdiff import explain_miss

from . import entry
from .driver import CudaError, Device, call, device
from .launch import Kernel

log = logging.getLogger(__name__)


class StrictMissError(RuntimeError):
    """A kernel was asked for in strict mode that was not pre-warmed."""


class KeyCollisionError(RuntimeError):
    """Two different PTX texts under one key: the key or an emitter is broken. Never loaded."""


class JitError(RuntimeError):
    """The driver rejected the PTX of a spec."""


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    jit_compiles: int = 0
    rejected: int = 0


# key -> sha256 of the PTX text first loaded under it in this process, by any ModuleCache
_TEXTS: dict[str, str] = {}


def record_text(key: str, ptx_sha256: str, spec: KernelSpec) -> None:
    """Remember the text digest of a key's first load; another text under the key is a collision."""
    seen = _TEXTS.setdefault(key, ptx_sha256)
    if seen != ptx_sha256:
        raise KeyCollisionError(f"key {key} was loaded with PTX {seen[:16]} in this process, and {spec!r} "
                                f"now emits {ptx_sha256[:16]}: an emitter is impure or the key misses a parameter")


def default_cache_dir() -> Path:
    env = os.environ.get("PTXGEN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ptxgen"


def toolchain_of(dev: Device) -> dict[str, Any]:
    """What a cubin depends on beyond the PTX: the device's compute capability and the driver."""
    return {"compute_capability": list(dev.compute_capability), "driver_version": dev.driver_version}


def toolchain_dir(root: Path, toolchain: dict[str, Any]) -> Path:
    major, minor = toolchain["compute_capability"]
    return root / entry.LAYOUT / f"cc{major}{minor}-driver{toolchain['driver_version']}"


def link_options(arch: str) -> dict[str, int | str]:
    """What ``jit_link`` gives cuLinkCreate for PTX of ``arch``, by ``CUjit_option`` name (a value
    named by its enum's member name): none, so the context's device is the target at the driver's
    default optimization, except that an architecture-specific ``arch`` (sm_90a: wgmma) is asked
    for by name. A disk entry records them and is a miss under any others: the cubin depends on
    them, and neither the key nor the toolchain names them."""
    return {"CU_JIT_TARGET": f"CU_TARGET_COMPUTE_{arch[3:-1]}A"} if arch.endswith("a") else {}


_OPTION_ENUMS = {"CU_JIT_TARGET": cu.CUjit_target}  # the enum of an option whose value is named


def jit_link(ptx: str, arch: str) -> bytes:
    """PTX -> cubin with the driver's own JIT linker (the cubin is what goes to disk), given exactly
    ``link_options(arch)``, which the entry records."""
    options = link_options(arch)
    values = [getattr(_OPTION_ENUMS[k], v) if isinstance(v, str) else v for k, v in options.items()]
    state = call("cuLinkCreate", len(options), [getattr(cu.CUjit_option, k) for k in options], values)
    try:
        data = ptx.encode() + b"\0"
        call("cuLinkAddData", state, cu.CUjitInputType.CU_JIT_INPUT_PTX, data, len(data),
             b"kernel.ptx", 0, [], [])
        image, size = call("cuLinkComplete", state)
        return ctypes.string_at(int(image), size)
    finally:
        call("cuLinkDestroy", state)


class ModuleCache:
    """Kernels by spec. Miss: emit, JIT, load, keep, write the cubin; hit: one dict lookup.

    ``directory=None`` uses $PTXGEN_CACHE_DIR or the XDG cache dir; ``use_disk=False`` keeps
    modules in memory only.
    """

    def __init__(self, directory: str | Path | None = None, *, target: Target | None = None,
                 use_disk: bool = True, strict: bool = False, device_ordinal: int = 0):
        self.device = device(device_ordinal)
        self.target = target or Target(self.device.arch)
        self.toolchain = toolchain_of(self.device)
        self.root = Path(directory) if directory is not None else default_cache_dir()
        self.use_disk = use_disk
        self.strict = strict
        self.stats = CacheStats()
        self.rejections: list[tuple[Path, str]] = []
        self._kernels: dict[str, Kernel] = {}

    @property
    def directory(self) -> Path:
        return toolchain_dir(self.root, self.toolchain)

    def entry_path(self, key: str) -> Path:
        return self.directory / key[:2] / (key + entry.SUFFIX)

    def get(self, spec: KernelSpec) -> Kernel:
        key = spec.key(self.target)
        kernel = self._kernels.get(key)
        if kernel is not None:
            if type(kernel.spec) is not type(spec):
                raise KeyCollisionError(f"key {key} holds a {type(kernel.spec).__qualname__} kernel; "
                                        f"{spec!r} is a {type(spec).__qualname__}")
            self.stats.memory_hits += 1
            return kernel
        if self.strict or _strict_depth().get(id(self), 0):
            raise StrictMissError(f"strict mode: {spec!r} was not pre-warmed; "
                                  f"{explain_miss(spec, (k.spec for k in self._kernels.values()))}")
        kernel = self._kernels[key] = self._load(spec, key)
        return kernel

    def prewarm(self, specs: Iterable[KernelSpec]) -> list[Kernel]:
        """Load every spec through ``get`` (so by key: specs Python calls equal but whose bits differ,
        0.0 and -0.0, are both loaded); follow with ``strict_mode()`` to prove nothing else runs."""
        return [self.get(s) for s in specs]

    @contextlib.contextmanager
    def strict_mode(self) -> Iterator["ModuleCache"]:
        """Misses are errors inside this block, on this thread (ranks as threads share a cache)."""
        depth = _strict_depth()
        depth[id(self)] = depth.get(id(self), 0) + 1
        try:
            yield self
        finally:
            depth[id(self)] -= 1

    def __contains__(self, spec: KernelSpec) -> bool:
        return spec.key(self.target) in self._kernels

    # -- miss path ---------------------------------------------------------------------------
    def _load(self, spec: KernelSpec, key: str) -> Kernel:
        ptx = spec.emit(self.target)
        record_text(key, sha256_hex(ptx), spec)
        cubin = self._read_disk(spec, key, ptx) if self.use_disk else None
        compile_ms = None
        if cubin is None:
            start = time.perf_counter()
            cubin = self._compile(spec, ptx)
            compile_ms = (time.perf_counter() - start) * 1e3
            self.stats.jit_compiles += 1
        else:
            self.stats.disk_hits += 1
        module = call("cuModuleLoadData", cubin)
        function = call("cuModuleGetFunction", module, spec.entry.encode())
        kernel = Kernel(spec, module, function)
        if compile_ms is not None and self.use_disk:  # written once it has loaded, with what ls shows
            local = call("cuFuncGetAttribute", cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, function)
            self._write_disk(spec, key, ptx, cubin, created=round(time.time(), 3), compile_ms=round(compile_ms, 3),
                             registers=int(kernel.registers), local_bytes=int(local))
        return kernel

    def _compile(self, spec: KernelSpec, ptx: str) -> bytes:
        try:
            return jit_link(ptx, spec.arch(self.target))
        except CudaError as e:
            detail = ""
            try:
                assemble(ptx, spec.arch(self.target))
            except AssemblyError as ae:
                detail = "; " + " ".join(str(ae).split())[:2000]
            except AssemblerUnavailable:
                pass
            raise JitError(f"{spec!r}: {e}{detail}") from e

    def _reject(self, path: Path, reason: str) -> None:
        self.stats.rejected += 1
        self.rejections.append((path, reason))
        log.warning("ptxgen cache: rejected %s: %s; rebuilding", path, reason)

    def _read_disk(self, spec: KernelSpec, key: str, ptx: str) -> bytes | None:
        """The entry's cubin; None on a miss: no entry, or (reported, then rebuilt and replaced) one
        that is damaged (``entry.read``) or built for another spec, generator, toolchain or link
        options. An intact entry of this spec whose PTX is not the text emitted now is a second
        text under one key: a KeyCollisionError (its checksum rules out damage)."""
        path = self.entry_path(key)
        try:
            meta, cubin = entry.read(path, self.root / entry.LAYOUT)
        except FileNotFoundError:
            return None
        except entry.EntryError as e:
            self._reject(path, str(e))
            return None
        why = entry.mismatch(meta, spec, self.target, key, self.toolchain, link_options(spec.arch(self.target)))
        if why is not None:
            self._reject(path, why)
            return None
        if meta["ptx_sha256"] != sha256_hex(ptx):
            raise KeyCollisionError(f"{path}: key {key} holds PTX {meta['ptx_sha256']} but {spec!r} emits "
                                    f"{sha256_hex(ptx)}: an emitter is impure or the key misses a parameter")
        return cubin

    def _write_disk(self, spec: KernelSpec, key: str, ptx: str, cubin: bytes, **info: Any) -> None:
        meta = entry.metadata(spec, self.target, key, ptx, cubin, self.toolchain, link_options(spec.arch(self.target)),
                              **info)
        try:
            write_atomic(self.entry_path(key), entry.encode(meta, cubin))
        except OSError as e:  # a read-only or full cache directory must not stop the program
            log.warning("ptxgen cache: could not write %s: %s", self.entry_path(key), e)


_THREAD = threading.local()


def _strict_depth() -> dict[int, int]:
    """This thread's open ``strict_mode`` blocks, by cache."""
    if not hasattr(_THREAD, "strict"):
        _THREAD.strict = {}
    return _THREAD.strict
