"""Typed vector I/O and the two indexing shapes every memory-bound kernel uses.

* ``load_f32`` / ``store_f32``: n contiguous elements of a storage dtype (f32 or bf16) as f32
  registers, in accesses of up to 16 bytes; bf16 is unpacked/packed two to a 32-bit word.
* ``RowSlices``: a block owns a row of baked width; each thread owns ``count`` slices of ``vec``
  elements, strided by the block; only the last slice can pass the row end, so only it is guarded.
* ``flat_elementwise``: one thread per ``vec`` elements of a flat range of runtime length ``n``,
  with a scalar tail for the last partial vector.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Sequence

import numpy as np

from .builder import Addr, GuardLike, KernelBuilder, Reg, T


class DType(enum.Enum):
    """Storage type of a tensor in device memory; arithmetic is always f32."""

    F32 = T.F32.value
    BF16 = T.BF16.value

    @property
    def size(self) -> int:
        return T(self.value).bits // 8


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even (as ``cvt.rn.bf16.f32``); NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """The values ``x`` takes when stored as ``dtype`` (through f32, as the kernels store them), float64."""
    x32 = np.asarray(x, np.float32)
    return (from_bf16(to_bf16(x32)) if dtype is DType.BF16 else x32).astype(np.float64)


def vector_width(n: int, dtype: DType) -> int:
    """Elements per access: the largest power of two dividing ``n`` that fits in 16 bytes."""
    w = 16 // dtype.size
    while n % w:
        w //= 2
    return w


def _split(addr: Addr, n: int, dtype: DType) -> list[tuple[Addr, int]]:
    """Accesses of at most 16 bytes covering ``n`` elements from ``addr``."""
    per = min(n, 16 // dtype.size)
    return [(Addr(addr.base, addr.offset + k * dtype.size), per) for k in range(0, n, per)]


def load_f32(b: KernelBuilder, dtype: DType, addr: Addr, n: int, *, guard: GuardLike = None,
             nc: bool = False) -> list[Reg]:
    """Load ``n`` contiguous ``dtype`` elements as f32; guarded-off lanes read as 0."""
    if n * dtype.size > 16:
        return [v for a, m in _split(addr, n, dtype) for v in load_f32(b, dtype, a, m, guard=guard, nc=nc)]
    if dtype is DType.F32:
        out = [b.mov(0.0, T.F32) for _ in range(n)] if guard is not None else None
        v = b.ld("global", T.F32, addr, n, nc=nc, out=out, guard=guard)
        return [v] if n == 1 else list(v)
    if n == 1:
        out = [b.mov(0, T.B16)] if guard is not None else None
        return [b.cvt(T.F32, b.ld("global", T.B16, addr, nc=nc, out=out, guard=guard), src=T.BF16)]
    words = n // 2
    out = [b.mov(0, T.B32) for _ in range(words)] if guard is not None else None
    w = b.ld("global", T.B32, addr, words, nc=nc, out=out, guard=guard)
    return [v for word in ([w] if words == 1 else w) for v in bf16x2_f32(b, word)]


def bf16x2_f32(b: KernelBuilder, word: Reg) -> list[Reg]:
    """The two bf16 of a 32-bit ``word`` as f32: [low half, high half] (exact)."""
    return [b.cvt(T.F32, half, src=T.BF16) for half in b.unpack(word)]


def as_bf16_pair(b: KernelBuilder, lo: Reg, hi: Reg) -> list[Reg]:
    """f32 ``lo`` and ``hi`` as a bf16 pair store holds them: each rounded to nearest even, as f32."""
    return bf16x2_f32(b, b.cvt_bf16x2(hi, lo))


def store_f32(b: KernelBuilder, dtype: DType, addr: Addr, vals: Sequence[Reg], *,
              guard: GuardLike = None) -> None:
    """Store f32 registers as ``dtype`` (bf16: round to nearest even)."""
    if len(vals) * dtype.size > 16:
        for k, (a, m) in enumerate(_split(addr, len(vals), dtype)):
            store_f32(b, dtype, a, vals[k * m:(k + 1) * m], guard=guard)
        return
    if dtype is DType.F32:
        b.st("global", addr, list(vals), guard=guard)
    elif len(vals) == 1:
        b.st("global", addr, b.cvt(T.BF16, vals[0]), t=T.B16, guard=guard)
    else:
        words = [b.cvt_bf16x2(vals[k + 1], vals[k]) for k in range(0, len(vals), 2)]
        b.st("global", addr, words, t=T.B32, guard=guard)


def offset(b: KernelBuilder, ptr: Reg, index: Reg, scale: int) -> Reg:
    """``ptr + index * scale`` with a 64-bit product (indices are u32)."""
    return b.add(ptr, b.mul_wide(index, scale))


class RowSlices:
    """A thread's share of a ``width``-element row handled by a ``block``-thread block."""

    def __init__(self, b: KernelBuilder, width: int, vec: int, block: int, tid: Reg):
        self.width, self.vec, self.block, self.tid = width, vec, block, tid
        nvec = width // vec
        self.count = math.ceil(nvec / block)
        self.guards = [b.setp("lt", tid, nvec - j * block) if (j + 1) * block > nvec else None
                       for j in range(self.count)]

    @staticmethod
    def values_per_thread(width: int, vec: int, block: int) -> int:
        return math.ceil(width // vec / block) * vec

    def base(self, b: KernelBuilder, ptr: Reg, row: Reg | None, size: int) -> Reg:
        """Pointer to this thread's first slice of ``row`` (``None``: a single row, e.g. gamma)."""
        if row is not None:
            ptr = offset(b, ptr, row, self.width * size)
        return offset(b, ptr, self.tid, self.vec * size)

    def addr(self, base: Reg, j: int, size: int) -> Addr:
        return Addr(base, j * self.block * self.vec * size)

    def load(self, b: KernelBuilder, dtype: DType, base: Reg, *, nc: bool = False) -> list[list[Reg]]:
        return [load_f32(b, dtype, self.addr(base, j, dtype.size), self.vec, guard=g, nc=nc)
                for j, g in enumerate(self.guards)]

    def store(self, b: KernelBuilder, dtype: DType, base: Reg, slices: Sequence[Sequence[Reg]]) -> None:
        for j, (g, vals) in enumerate(zip(self.guards, slices)):
            store_f32(b, dtype, self.addr(base, j, dtype.size), vals, guard=g)


def row_sweep(b: KernelBuilder, width: int, vec: int, block: int, tid: Reg, unroll: int,
              body: Callable[[Reg, "Reg | None"], None]) -> None:
    """Visit this thread's ``vec``-element slices of a row too wide for registers, in a loop.

    ``body(first_column, guard)`` sees the same slices as RowSlices: ``unroll`` per loop trip
    (independent loads in flight), then leftover full slices, then the one guarded tail slice.
    """
    nvec = width // vec
    full, tail = divmod(nvec, block)
    trips, leftover = divmod(full, unroll)
    step = block * vec
    col = b.mul(tid, vec)
    if trips:
        with b.loop(b.mov(trips, T.U32), "sweep"):
            for k in range(unroll):
                body(b.add(col, k * step), None)
            b.add(col, unroll * step, out=col)
    for k in range(leftover):
        body(b.add(col, k * step), None)
    if tail:
        body(b.add(col, leftover * step), b.setp("lt", tid, tail))


Body = Callable[[Reg, int, "Reg | None"], None]


def flat_elementwise(b: KernelBuilder, n: Reg, vec: int, block: int, body: Body) -> None:
    """Call ``body(first_element, width, guard)`` for this thread's elements of ``[0, n)``.

    Full vectors run unguarded with ``width == vec``; a final partial vector runs as ``vec - 1``
    scalar steps, each guarded by ``element < n``.
    """
    thread = b.mad(b.special("%ctaid.x"), block, b.special("%tid.x"))
    first = b.mul(thread, vec)
    done = b.new_label("done")
    if vec == 1:
        b.bra(done, guard=b.setp("ge", first, n))
        body(first, 1, None)
    else:
        tail = b.new_label("tail")
        b.bra(tail, guard=b.setp("gt", b.add(first, vec), n))
        body(first, vec, None)
        b.bra(done)
        b.place(tail)
        for k in range(vec - 1):
            element = b.add(first, k)
            body(element, 1, b.setp("lt", element, n))
    b.place(done)


def elementwise_vec(*dtypes: DType) -> int:
    """Elements per thread of ``elementwise``: 16 bytes of the narrowest type."""
    return 16 // min(d.size for d in dtypes)


def elementwise(b: KernelBuilder, block: int, inputs: dict[str, DType], outputs: dict[str, DType],
                fn: Callable[..., Sequence[Reg]], *, pointers: dict[str, Reg] | None = None,
                index: Callable[[str, Reg], Reg] | None = None, vec: int | None = None) -> None:
    """The flat elementwise kernel over params ``inputs``, ``outputs`` (pointers) and ``n``: load
    every input, ``fn(*values) -> outputs`` per element (f32 registers), store, vector by vector.
    ``pointers``: the tensors' base addresses by name where they are not their own pointer params;
    ``index(name, e)``: where flat element ``e`` sits in that tensor (default ``e``; a vector of
    elements must stay contiguous there); ``vec``: elements per thread (default ``elementwise_vec``)."""
    ptr = {name: b.cvta_global(b.ld_param(name)) for name in (*inputs, *outputs) if name not in (pointers or {})}
    ptr.update(pointers or {})
    at = index or (lambda name, e: e)

    def body(e: Reg, width: int, guard: "Reg | None") -> None:
        vals = [load_f32(b, dt, Addr(offset(b, ptr[name], at(name, e), dt.size)), width, guard=guard)
                for name, dt in inputs.items()]
        results = [fn(*column) for column in zip(*vals)]  # one tuple of outputs per element
        for k, (name, dt) in enumerate(outputs.items()):
            store_f32(b, dt, Addr(offset(b, ptr[name], at(name, e), dt.size)), [r[k] for r in results], guard=guard)

    flat_elementwise(b, b.ld_param("n"), vec or elementwise_vec(*inputs.values(), *outputs.values()), block, body)


def flat_grid(n: int, vec: int, block: int) -> int:
    """Blocks for ``flat_elementwise`` over ``n`` elements."""
    if n >= 2**32:
        raise ValueError(f"{n} elements overflow the kernels' 32-bit element index")
    return max(1, math.ceil(math.ceil(n / vec) / block))
