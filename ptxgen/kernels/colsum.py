"""Column sums of a [rows, cols] f32 (or bf16) matrix, in f32, deterministic: fixed partition,
fixed order, no floating-point atomics.
(And the parts sum: the same for a few very long rows.)

Block (x: 32 columns, y: a chunk of rows) has 32 x ``row_groups`` threads; group g sums rows
g, g + row_groups, ... of the chunk in order, then group 0 adds the groups' sums in order and
writes out[chunk, col]. One launch with one chunk finishes a sum; with many chunks it makes
partials for a second launch, or (``finish``) the last block of each column block to be done
adds the chunks' partials, in chunk order whichever block that is, itself: one launch. Serves
dgamma (over RMSNorm backward partials) and bias gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..builder import Addr, KernelBuilder, Reg, T
from ..reductions import tree_sum
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, flat_elementwise, flat_grid, load_f32, offset, store_f32
from .common import check_block_size

COLS_PER_BLOCK = 32
UNROLL = 4  # rows per trip; fixed, so the summation order (and the result) is too
VEC = 4     # floats per thread of the parts sum


@register
@dataclass(frozen=True)
class ColumnSumSpec(KernelSpec):
    kind: ClassVar[str] = "colsum"
    row_groups: int = 8
    # the chunks' sums into ``partials`` ([chunks][n_cols]), then the last block of a column block
    # to be done (a count per column block in ``counters``: zero before, left zero) adds them into
    # ``dst`` in chunk order: the second launch's sums, bit for bit, without the launch
    finish: bool = False
    dtype: DType = DType.F32  # the matrix's (the sums and their partials are f32)

    def validate(self) -> None:
        if self.row_groups not in (1, 2, 4, 8, 16, 32):
            raise SpecError(f"row_groups must be a power of two in [1, 32], got {self.row_groups}")
        if self.dtype not in (DType.F32, DType.BF16):
            raise SpecError(f"colsum: dtype must be f32 or bf16, got {self.dtype.value}")

    def launch_dims(self, rows: int, cols: int, rows_per_chunk: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(grid, block); the output has ``-(-rows // rows_per_chunk)`` rows of ``cols``."""
        chunks = max(1, -(-rows // rows_per_chunk))
        return (-(-cols // COLS_PER_BLOCK), chunks), (COLS_PER_BLOCK, self.row_groups)

    def params(self) -> tuple[tuple[str, T], ...]:
        finish = (("partials", T.U64),) if self.finish else ()
        counters = (("counters", T.U64),) if self.finish else ()
        return (("src", T.U64), *finish, ("dst", T.U64), *counters, ("n_rows", T.U32), ("n_cols", T.U32),
                ("rows_per_chunk", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ("partials", "dst", "counters") if self.finish else ("dst",)

    def read_outputs(self) -> tuple[str, ...]:  # (the partials are written by the same launch first)
        return ("counters",) if self.finish else ()

    def build(self, b: KernelBuilder) -> None:
        src, dst = (b.cvta_global(b.ld_param(n)) for n in ("src", "dst"))
        n_rows, n_cols, per_chunk = (b.ld_param(n) for n in ("n_rows", "n_cols", "rows_per_chunk"))
        chunk = b.special("%ctaid.y")
        col = b.mad(b.special("%ctaid.x"), COLS_PER_BLOCK, b.special("%tid.x"))
        in_cols = b.setp("lt", col, n_cols)
        start = b.mul(chunk, per_chunk)
        sums = b.addr_of(b.shared_array("group_sums", T.F32, self.row_groups * COLS_PER_BLOCK)) \
            if self.row_groups > 1 else None
        total = self._sum_rows(b, src, start, b.min(b.add(start, per_chunk), n_rows), n_cols, col, in_cols, sums,
                               self.dtype)
        store = b.and_(in_cols, b.setp("eq", b.special("%tid.y"), 0))
        out = b.cvta_global(b.ld_param("partials")) if self.finish else dst
        b.st("global", Addr(offset(b, out, b.mad(chunk, n_cols, col), 4)), total, guard=store)
        if self.finish:
            self._finish(b, out, dst, n_cols, col, in_cols, store, sums)

    def _sum_rows(self, b: KernelBuilder, src: Reg, start: Reg, end: Reg, n_cols: Reg, col: Reg, in_cols: Reg,
                  sums: Reg | None, dtype: DType = DType.F32, cg: bool = False) -> Reg:
        """The sum of rows [start, end) of column ``col`` of ``src`` (``dtype``), in the fixed order: group g
        of the block's threads sums rows start + g, start + g + row_groups, ..., UNROLL a trip into
        independent accumulators, then group 0's threads (where the result is) add the groups'
        (met at ``sums`` in shared memory). ``cg``: read through L2 only (other blocks' writes)."""
        ty = b.special("%tid.y")
        span = b.sub(end, b.add(start, ty), T.S32)
        per_trip = self.row_groups * UNROLL
        trips = b.selp(b.div(b.add(span, per_trip - 1, T.S32), per_trip, T.S32), 0,
                       b.setp("gt", span, 0, T.S32), T.S32)
        trips = b.selp(trips, 0, in_cols, T.S32)
        row = b.add(start, ty)
        accs = [b.mov(0.0, T.F32) for _ in range(UNROLL)]
        with b.loop(trips, "rows"):
            for u, acc in enumerate(accs):
                r = b.add(row, u * self.row_groups)
                at, past = Addr(offset(b, src, b.mad(r, n_cols, col), dtype.size)), b.setp("lt", r, end)
                if dtype is DType.F32:  # rows past end: 0
                    v = b.ld("global", T.F32, at, cg=cg, out=[b.mov(0.0, T.F32)], guard=past)
                else:
                    v = b.cvt(T.F32, b.ld("global", T.B16, at, cg=cg, out=[b.mov(0, T.B16)], guard=past), src=T.BF16)
                b.add(acc, v, out=acc)
            b.add(row, per_trip, out=row)
        acc = tree_sum(b, accs)
        if sums is None:
            return acc
        b.st("shared", Addr(b.add(sums, b.shl(b.mad(ty, COLS_PER_BLOCK, b.special("%tid.x")), 2))), acc)
        b.bar_sync()
        column = b.add(sums, b.shl(b.special("%tid.x"), 2))
        total = b.ld("shared", T.F32, Addr(column))
        for g in range(1, self.row_groups):
            b.add(total, b.ld("shared", T.F32, Addr(column, 4 * g * COLS_PER_BLOCK)), out=total)
        return total

    def _finish(self, b: KernelBuilder, partials: Reg, dst: Reg, n_cols: Reg, col: Reg, in_cols: Reg,
                store: Reg, sums: Reg | None) -> None:
        """The last block of the column block to be done sums the chunks' partials into dst, as a
        second launch over them would (one chunk of them all). Thread 0 counts the block between
        two fences: the barrier before orders the block's partials before its release (fence,
        then the count), its acquire (the count, then a fence) orders every block's partials counted
        before the barrier after, and so before the last block's reads (from L2)."""
        chunks = b.special("%nctaid.y")
        counter = Addr(offset(b, b.cvta_global(b.ld_param("counters")), b.special("%ctaid.x"), 4))
        first = b.and_(b.setp("eq", b.special("%tid.x"), 0), b.setp("eq", b.special("%tid.y"), 0))
        last_flag = b.addr_of(b.shared_array("last", T.U32, 1))
        b.bar_sync()  # every thread's partial written
        counted = b.new_label("counted")
        b.bra(counted, guard=~first)
        b.fence_gpu()
        before = b.atom("global", "add", counter, 1, T.U32)
        b.fence_gpu()
        b.st("shared", Addr(last_flag), b.selp(1, 0, b.setp("eq", before, b.sub(chunks, 1)), T.U32), t=T.U32)
        b.place(counted)
        b.bar_sync()
        not_last = b.new_label("not_last")
        b.bra(not_last, guard=b.setp("eq", b.ld("shared", T.U32, Addr(last_flag)), 0))
        total = self._sum_rows(b, partials, b.mov(0, T.U32), chunks, n_cols, col, in_cols, sums, cg=True)  # (f32)
        b.st("global", Addr(offset(b, dst, col, 4)), total, guard=store)
        b.st("global", counter, 0, t=T.U32, guard=first)  # down for the next launch
        b.place(not_last)

    @classmethod
    def examples(cls) -> list["ColumnSumSpec"]:
        return [cls(), cls(row_groups=1), cls(row_groups=32), cls(finish=True), cls(row_groups=1, finish=True),
                cls(dtype=DType.BF16), cls(row_groups=4, finish=True, dtype=DType.BF16)]


def column_sum_reference(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).sum(axis=0)


@register
@dataclass(frozen=True)
class PartsSumSpec(KernelSpec):
    """dst[i] = sum over z < parts of src[z * n + i], in order z = 0, 1, ...: the split-K partial sums
    (a few long rows, which the column sum's column blocks would serve poorly), 4 floats a thread."""

    kind: ClassVar[str] = "parts_sum"
    block_size: int = 256

    def validate(self) -> None:
        check_block_size(self.block_size)

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, VEC, self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("src", T.U64), ("dst", T.U64), ("parts", T.U32), ("n", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('dst',)

    def arguments(self, src: int, dst: int, parts: int, n: int) -> tuple[int, ...]:
        if parts < 1 or n % VEC:
            raise ValueError(f"parts_sum: parts must be >= 1 and n a multiple of {VEC} (16-byte rows), "
                             f"got {parts}, {n}")
        return src, dst, parts, n

    def build(self, b: KernelBuilder) -> None:
        src, dst = (b.cvta_global(b.ld_param(n)) for n in ("src", "dst"))
        parts, n = b.ld_param("parts"), b.ld_param("n")
        row = b.mul_wide(n, 4)

        def body(e: Reg, width: int, guard: Reg | None) -> None:
            at = offset(b, src, e, 4)
            acc = load_f32(b, DType.F32, Addr(at), width, guard=guard)
            with b.loop(b.sub(parts, 1), "part"):
                b.add(at, row, out=at)
                for a, v in zip(acc, load_f32(b, DType.F32, Addr(at), width, guard=guard)):
                    b.add(a, v, out=a)
            store_f32(b, DType.F32, Addr(offset(b, dst, e, 4)), acc, guard=guard)

        flat_elementwise(b, n, VEC, self.block_size, body)

    @classmethod
    def examples(cls) -> list["PartsSumSpec"]:
        return [cls(), cls(block_size=512)]
