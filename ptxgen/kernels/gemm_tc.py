"""bf16 / fp16 GEMM on tensor cores, fp32 accumulate: C[M, N] (+)= op(A) @ op(B) (+ bias[N]), f32 C.

The layouts are the fp32 GEMM's (``trans_a``, ``trans_b``). A block computes a ``block_m x
block_n`` tile with ``warps_m x warps_n`` warps; each warp owns a (16 * mt) x (8 * nt) piece as
mt x nt ``mma.sync.m16n8k16`` accumulators. Operand slices of ``block_k`` travel global -> shared
with ``cp.async`` (16 bytes, zero-filled past the matrix edge) ``stages`` deep, so copies of later
slices overlap the math on this one. Shared rows are XOR-swizzled by 16-byte chunk, so that the
eight row addresses of each ``ldmatrix`` hit eight different bank groups. An operand stored with K
contiguous is read by ``ldmatrix``; one stored with M (or N) contiguous by ``ldmatrix.trans``,
which hands out the same fragments from the transposed storage.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, Reg, T
from ..registry import register
from ..spec import KernelSpec, SpecError
from .common import check_positive
from .gemm import Epilogue

CHUNK = 16        # bytes per cp.async / per ldmatrix row
ELEMS = CHUNK // 2  # 16-bit elements per chunk
SHARED_LIMIT = 48 * 1024


class MmaType(enum.Enum):
    BF16 = "bf16"
    F16 = "f16"


def swizzle(chunks_per_row: int) -> tuple[int, int]:
    """(shift, mask): chunk c of row r is stored at c ^ ((r >> shift) & mask).

    Chosen so that any 8 consecutive rows put a given chunk in 8 different 16-byte bank groups
    (a 128-byte line holds 8 chunks): rows of 8+ chunks XOR with r & 7, of 4 with (r >> 1) & 3,
    of 2 with (r >> 2) & 1.
    """
    return {2: (2, 1), 4: (1, 3)}.get(chunks_per_row, (0, 7))


class _Operand:
    """One operand's slices: cp.async issue into a stage, and ldmatrix addresses for fragments."""

    def __init__(self, spec: "GemmTCSpec", b: KernelBuilder, ptr: Reg, ld: Reg, extent: Reg,
                 k_total: Reg, outer0: Reg, outer: int, k_contig: bool, tid: Reg, smem: Reg):
        self.b, self.k_contig, self.outer, self.bk = b, k_contig, outer, spec.block_k
        rows, row_elems = (outer, spec.block_k) if k_contig else (spec.block_k, outer)
        self.row_bytes = row_elems * 2
        self.stage_bytes = rows * self.row_bytes
        self.chunks = row_elems // ELEMS
        self.shift, self.mask = swizzle(self.chunks)
        self.smem, self.ptr, self.k_total = smem, ptr, k_total
        self.k_step = b.mul_wide(ld, spec.block_k * 2) if not k_contig else None
        self.slots = []
        for i in range(rows * self.chunks // spec.threads):
            idx = b.add(tid, i * spec.threads)
            row, chunk = b.div(idx, self.chunks), b.rem(idx, self.chunks)
            g_outer, k_off = (b.add(outer0, row), b.mul(chunk, ELEMS)) if k_contig else \
                (b.add(outer0, b.mul(chunk, ELEMS)), row)
            r, c = (g_outer, k_off) if k_contig else (k_off, g_outer)
            src = b.add(ptr, b.shl(b.add(b.mul_wide(r, ld), b.cvt(T.U64, c)), 1))
            dst = b.add(smem, b.mad(row, self.row_bytes, b.shl(self._swizzled(row, chunk), 4)))
            self.slots.append((src, dst, k_off, b.setp("lt", g_outer, extent)))

    def _swizzled(self, row: Reg, chunk: Reg) -> Reg:
        b = self.b
        return b.xor(chunk, b.and_(b.shr(row, self.shift), self.mask))

    def issue(self, k0: Reg, stage: Reg) -> None:
        """cp.async this thread's chunks of the slice at k0 into ``stage`` (a byte offset)."""
        b = self.b
        for src, dst, k_off, in_outer in self.slots:
            ok = b.and_(in_outer, b.setp("lt", b.add(k0, k_off), self.k_total))
            b.cp_async(b.add(dst, stage), b.selp(src, self.ptr, ok, T.U64), b.selp(CHUNK, 0, ok, T.U32))
            if self.k_contig:
                b.add(src, self.bk * 2, out=src)
            else:
                b.add(src, self.k_step, out=src)

    def lane_address(self, lane: Reg, outer_base: Reg, outer_bit: int, k_bit: int) -> tuple[Reg, Reg]:
        """Per lane, for x4 ldmatrix: (byte offset of its row without the compile-time row part,
        the runtime part of its chunk XOR its swizzle). ``outer_bit``/``k_bit``: which bit of the
        lane's matrix index (lane >> 3) steps 8 along the outer / the k dimension."""
        b = self.b
        i, j = b.and_(lane, 7), b.shr(lane, 3)
        outer_step = b.and_(b.shr(j, outer_bit), 1)
        k_step = b.and_(b.shr(j, k_bit), 1)
        swz = b.and_(b.shr(i, self.shift), self.mask)  # depends on row bits below 8 only: i's
        if self.k_contig:  # rows are outer, chunks are k: row = outer_base + i + 8 * outer_step
            row = b.add(outer_base, b.add(i, b.shl(outer_step, 3)))
            return b.mul(row, self.row_bytes), b.xor(k_step, swz)
        # rows are k (i + 8 * k_step), chunks are outer: outer_base / 8 + outer_step
        row = b.add(i, b.shl(k_step, 3))
        return b.mul(row, self.row_bytes), b.xor(b.add(b.shr(outer_base, 3), outer_step), swz)

    def fragment(self, stage: Reg, lane_row: Reg, lane_chunk: Reg, row: int, chunk: int) -> tuple[Reg, ...]:
        """ldmatrix.x4 at compile-time row / chunk offsets on top of the lane's (disjoint bits)."""
        b = self.b
        col = b.shl(b.xor(lane_chunk, chunk), 4) if chunk else b.shl(lane_chunk, 4)
        addr = b.add(b.add(self.smem, stage), b.add(lane_row, col))
        return b.ldmatrix(b.add(addr, row * self.row_bytes) if row else addr, 4, trans=not self.k_contig)


@register
@dataclass(frozen=True)
class GemmTCSpec(KernelSpec):
    kind: ClassVar[str] = "gemm_tc"
    dtype: MmaType = MmaType.BF16
    trans_a: bool = False
    trans_b: bool = True
    bias: bool = False
    accumulate: bool = False
    block_m: int = 128
    block_n: int = 128
    block_k: int = 32
    warps_m: int = 2
    warps_n: int = 4
    stages: int = 3

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def m_tiles(self) -> int:  # m16 tiles per warp
        return self.block_m // self.warps_m // 16

    @property
    def n_tiles(self) -> int:  # n8 tiles per warp
        return self.block_n // self.warps_n // 8

    def validate(self) -> None:
        for name in ("block_m", "block_n", "block_k", "warps_m", "warps_n", "stages"):
            check_positive(name, getattr(self, name))
        if self.block_k % 16 or self.block_k > 64:
            raise SpecError(f"block_k must be 16, 32, 48 or 64, got {self.block_k}")
        if self.block_m % (16 * self.warps_m) or self.block_n % (16 * self.warps_n):
            raise SpecError("each warp needs a whole number of 16-row and 16-column (two n8) tiles")
        for tiles, what in ((self.m_tiles, "m16"), (self.n_tiles // 2, "n16")):
            if tiles & (tiles - 1):
                raise SpecError(f"{what} tiles per warp must be a power of two, got {tiles}")
        if not 1 <= self.warps_m * self.warps_n <= 32:
            raise SpecError("1 to 32 warps per block")
        for outer in (self.block_m, self.block_n):
            if (outer * self.block_k // ELEMS) % self.threads:
                raise SpecError(f"a {outer}x{self.block_k} slice does not split into {self.threads} threads' chunks")
        if self.stages < 2:
            raise SpecError("stages must be >= 2 (one slice in flight while one is multiplied)")
        smem = self.stages * (self.block_m + self.block_n) * self.block_k * 2
        if smem > SHARED_LIMIT:
            raise SpecError(f"{self.stages} stages need {smem} bytes of shared memory (max {SHARED_LIMIT})")

    def params(self) -> tuple[tuple[str, T], ...]:
        ptrs = ("a", "b", "c") + (("bias",) if self.bias else ())
        return tuple((p, T.U64) for p in ptrs) + tuple((d, T.U32) for d in ("m", "n", "k", "lda", "ldb", "ldc"))

    def launch_dims(self, m: int, n: int) -> tuple[tuple[int, int], int]:
        return (-(-n // self.block_n), -(-m // self.block_m)), self.threads

    def arguments(self, a: int, b: int, c: int, m: int, n: int, k: int, *, bias: int | None = None,
                  lda: int | None = None, ldb: int | None = None, ldc: int | None = None) -> tuple[int, ...]:
        """The kernel's arguments in order, after refusing shapes its 16-byte copies cannot serve:
        each operand's contiguous extent and leading dimension a multiple of 8 elements, N even."""
        if min(m, n, k) < 1:
            raise ValueError(f"gemm_tc: M, N, K must be >= 1, got {m}, {n}, {k}")
        lda = lda if lda is not None else (m if self.trans_a else k)
        ldb = ldb if ldb is not None else (k if self.trans_b else n)
        ldc = ldc if ldc is not None else n
        if (bias is not None) != self.bias:
            raise ValueError(f"gemm_tc: this spec {'needs' if self.bias else 'has no'} a bias")
        eight = {"M (A transposed)": m if self.trans_a else None, "K": k if not self.trans_a or self.trans_b else None,
                 "N (B not transposed)": None if self.trans_b else n, "lda": lda, "ldb": ldb}
        for name, value in eight.items():
            if value is not None and value % ELEMS:
                raise ValueError(f"gemm_tc: {name}={value} is not a multiple of {ELEMS}")
        if n % 2 or ldc % 2:
            raise ValueError(f"gemm_tc: N={n} and ldc={ldc} must be even (C is stored in pairs)")
        return (a, b, c) + ((bias,) if self.bias else ()) + (m, n, k, lda, ldb, ldc)

    def build(self, b: KernelBuilder) -> None:
        m, n, k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        lane, warp = b.and_(tid, 31), b.shr(tid, 5)
        warp_m, warp_n = b.rem(warp, self.warps_m), b.div(warp, self.warps_m)
        row0, col0 = b.mul(b.special("%ctaid.y"), self.block_m), b.mul(b.special("%ctaid.x"), self.block_n)
        a_stage = self.block_m * self.block_k * 2
        b_stage = self.block_n * self.block_k * 2
        smem_a = b.addr_of(b.shared_array("tile_a", T.B16, self.stages * a_stage // 2, align=128))
        smem_b = b.addr_of(b.shared_array("tile_b", T.B16, self.stages * b_stage // 2, align=128))
        ptr = {x: b.cvta_global(b.ld_param(x)) for x in "abc"}
        op_a = _Operand(self, b, ptr["a"], b.ld_param("lda"), m, k, row0, self.block_m,
                        not self.trans_a, tid, smem_a)
        op_b = _Operand(self, b, ptr["b"], b.ld_param("ldb"), n, k, col0, self.block_n,
                        self.trans_b, tid, smem_b)

        # fragments: A's matrix index bit 0 steps the rows (m) by 8, bit 1 the k chunk;
        # B's (two n8 tiles per x4) bit 1 steps n by 8, bit 0 the k chunk
        wm, wn = self.m_tiles * 16, self.n_tiles * 8
        a_row, a_chunk = op_a.lane_address(lane, b.mul(warp_m, wm), outer_bit=0, k_bit=1)
        b_row, b_chunk = op_b.lane_address(lane, b.mul(warp_n, wn), outer_bit=1, k_bit=0)

        acc = [[[b.mov(0.0, T.F32) for _ in range(4)] for _ in range(self.n_tiles)] for _ in range(self.m_tiles)]
        k_issue = b.mov(0, T.U32)
        write_a, write_b = b.mov(0, T.U32), b.mov(0, T.U32)

        def issue() -> None:  # the next slice into the next stage, then advance both
            op_a.issue(k_issue, write_a)
            op_b.issue(k_issue, write_b)
            b.cp_async_commit()
            b.add(k_issue, self.block_k, out=k_issue)
            for reg, size in ((write_a, a_stage), (write_b, b_stage)):
                b.add(reg, size, out=reg)
                b.mov(b.selp(0, reg, b.setp("eq", reg, self.stages * size), T.U32), out=reg)

        for _ in range(self.stages - 1):
            issue()
        read_a, read_b = b.mov(0, T.U32), b.mov(0, T.U32)
        with b.loop(b.div(b.add(k, self.block_k - 1), self.block_k), "ktile"):
            b.cp_async_wait(self.stages - 2)  # this slice has landed (for this thread) ...
            b.bar_sync()                      # ... and for every thread; the oldest stage is free
            issue()
            for kk in range(self.block_k // 16):
                if op_a.k_contig:  # compile-time parts: rows step 16 per m tile, chunks 2 per k16
                    frags_a = [op_a.fragment(read_a, a_row, a_chunk, mt * 16, 2 * kk) for mt in range(self.m_tiles)]
                else:
                    frags_a = [op_a.fragment(read_a, a_row, a_chunk, 16 * kk, 2 * mt) for mt in range(self.m_tiles)]
                frags_b = []
                for pair in range(self.n_tiles // 2):
                    if op_b.k_contig:
                        r = op_b.fragment(read_b, b_row, b_chunk, pair * 16, 2 * kk)
                    else:
                        r = op_b.fragment(read_b, b_row, b_chunk, 16 * kk, 2 * pair)
                    frags_b += [r[0:2], r[2:4]]
                for mt in range(self.m_tiles):
                    for nt in range(self.n_tiles):
                        b.mma_m16n8k16(acc[mt][nt], frags_a[mt], frags_b[nt], self.dtype.value)
            for reg, size in ((read_a, a_stage), (read_b, b_stage)):
                b.add(reg, size, out=reg)
                b.mov(b.selp(0, reg, b.setp("eq", reg, self.stages * size), T.U32), out=reg)
        b.cp_async_wait(0)
        self._epilogue(b, acc, ptr["c"], m, n, row0, col0, warp_m, warp_n, lane)

    def _epilogue(self, b: KernelBuilder, acc, c_ptr: Reg, m: Reg, n: Reg, row0: Reg, col0: Reg,
                  warp_m: Reg, warp_n: Reg, lane: Reg) -> None:
        """Accumulator q of tile (mt, nt) is C[row + 8 * (q >> 1), col + (q & 1)] with row = group,
        col = 2 * (lane % 4): stored in pairs."""
        out = Epilogue(b, c_ptr, m, n, self.bias, self.accumulate)
        group, pair = b.shr(lane, 2), b.shl(b.and_(lane, 3), 1)
        rows = b.add(row0, b.add(b.mul(warp_m, self.m_tiles * 16), group))
        cols = b.add(col0, b.add(b.mul(warp_n, self.n_tiles * 8), pair))
        columns = [out.column(b.add(cols, nt * 8), 2) for nt in range(self.n_tiles)]
        for mt in range(self.m_tiles):
            for half in range(2):
                row = out.row(b.add(rows, mt * 16 + 8 * half))
                for nt, col in enumerate(columns):
                    out.store(row, col, acc[mt][nt][2 * half:2 * half + 2])

    @classmethod
    def examples(cls) -> list["GemmTCSpec"]:
        return [cls(), cls(trans_a=False, trans_b=False), cls(trans_a=True, trans_b=False, accumulate=True),
                cls(bias=True, dtype=MmaType.F16), cls(block_m=64, block_n=64, warps_m=2, warps_n=2, block_k=64),
                cls(trans_a=True, trans_b=True, block_k=16, stages=4)]
