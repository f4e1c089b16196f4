"""A made-up device memory for dry-device plans (tests/dry_device.py), whose kernel steps run in the
PTX interpreter (tests/ptxsim.py) on the CPU: a plan built exactly as the GPU runs it, with the
arithmetic of its kernels checked without a GPU; ``interpreted_device`` runs whole training steps so."""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator

import numpy as np
import pytest

from dry_device import dry_device
from ptxgen.builder import T
from ptxsim import launch
from runtime import memory as runtime_memory
from runtime.memory import DTYPES
from runtime.plan import Fill, Host, Plan, _resolve


class FakeMemory:
    """Every allocation of the dry device as bytes (0xFF, a NaN, until written)."""

    def __init__(self, allocations: list[tuple[int, int]]):
        self.allocations = allocations  # the dry device's list, read as it grows
        self.blocks: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def at(self, ptr: int) -> tuple[np.ndarray, int]:
        with self._lock:  # ranks as threads
            for base, n in self.allocations[len(self.blocks):]:
                self.blocks[base] = np.full(n, 0xFF, np.uint8)
            base = max(b for b in self.blocks if b <= ptr)
        assert ptr - base < self.blocks[base].size, f"address {ptr:#x} outside every allocation"
        return self.blocks[base], ptr - base

    def raw(self, view) -> np.ndarray:
        block, off = self.at(view.ptr)
        return block[off:off + view.nbytes]

    def get(self, view) -> np.ndarray:
        """A copy of ``view``'s elements (bf16 as its bits, uint16)."""
        return self.raw(view).copy().view(DTYPES[view.dtype]).reshape(view.shape)

    def put(self, view, array: np.ndarray) -> None:
        self.raw(view)[:] = np.ascontiguousarray(array, DTYPES[view.dtype]).view(np.uint8).ravel()

    def run(self, step, values: dict) -> None:
        """One plan step: a host step called, a kernel through the interpreter (each pointer
        argument as the bytes from it to its allocation's end)."""
        if isinstance(step, Host):
            step()
            return
        if isinstance(step, Fill):
            self.fill(step.target.ptr, step.bits, step.words)
            return
        args = []  # (name, its allocation's bytes or None, offset in them or the scalar, address)
        for name, t in step.spec.params():
            value = _resolve(step.args[name], values)
            args.append((name, *self.at(int(value)), int(value)) if t is T.U64 else (name, None, value, None))
        arrays = [block[off:].copy() if block is not None else off for _, block, off, _ in args]
        outs = iter(launch(step.spec, (step.launch.grid, step.launch.block), *arrays))
        extents = step.extents(values)
        for name, block, off, ptr in args:
            if block is not None:
                out = next(outs)
                if name in step.spec.outputs():
                    changed = np.nonzero(out != block[off:])[0] + ptr
                    inside = np.zeros(changed.size, bool)
                    for at, n in extents:
                        inside |= (changed >= at) & (changed < at + n)
                    assert inside.all(), f"{step.label}: {name} wrote outside the step's declared extents"
                    block[off:] = out

    def fill(self, ptr: int, bits: int, words: int) -> None:
        """A memset: ``words`` 32-bit words from ``ptr`` set to ``bits``."""
        block, off = self.at(ptr)
        block[off:off + 4 * words] = np.full(words, bits, np.uint32).view(np.uint8)


@contextlib.contextmanager
def interpreted_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMemory]:
    """The dry device with a memory: copies to and from the device and memsets land in a
    ``FakeMemory``, and a plan's run executes its steps there (kernels in the interpreter, host
    steps called), so a backend's ``train_step`` runs end to end on the CPU, its CUDA graphs
    replaced by launching the same steps in order."""
    with dry_device(monkeypatch) as allocations:
        memory, dry_call = FakeMemory(allocations), runtime_memory.call

        def call(name: str, *args):
            if name in ("cuMemcpyHtoD", "cuMemcpyHtoDAsync"):
                dst, src, n = args[:3]
                block, off = memory.at(dst)
                block[off:off + n] = np.frombuffer((ctypes.c_char * n).from_address(src), np.uint8)
                return None
            if name in ("cuMemcpyDtoH", "cuMemcpyDtoHAsync"):
                dst, src, n = args[:3]
                block, off = memory.at(src)
                ctypes.memmove(dst, block[off:off + n].ctypes.data, n)
                return None
            if name == "cuMemsetD32Async":
                memory.fill(*args[:3])
                return None
            return dry_call(name, *args)

        def run(plan: Plan, *sections: str, graph: bool = False) -> None:
            for step in plan.of(*sections):
                memory.run(step, plan._values)

        monkeypatch.setattr(runtime_memory, "call", call)
        monkeypatch.setattr(Plan, "run", run)
        yield memory
