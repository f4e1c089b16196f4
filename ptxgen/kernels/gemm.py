"""fp32 GEMM on the SIMT cores: C[M, N] (+)= op(A)[M, K] @ op(B)[K, N] (+ bias[N]), batched.

The three layouts a linear layer needs are the two transpose flags: Y = X W^T (``trans_b``),
dX = dY W (neither), dW = dY^T X (``trans_a``). M, N, K and the leading dimensions are arguments;
the tile shape, the vector width and the epilogue (bias, accumulate) are baked in.

Each block computes a ``block_m x block_n`` tile of C from ``block_k``-deep slices of A and B staged
in shared memory, double-buffered: while the threads multiply one slice, the next one is already in
flight from global memory. Each thread owns ``thread_m x thread_n`` outputs, laid out as 4x4
sub-tiles strided across the block tile, so its operands come from shared memory in 16-byte
broadcast reads without bank conflicts. Edges are masked (zeros loaded, stores guarded), so any
M, N, K >= 1 works, given that every dimension an operand is contiguous along is a multiple of
``vec`` (checked by ``check_shapes``).

Batches (grid z) address their matrices as ``base + (z // inner) * outer_stride + (z % inner) //
group * inner_stride`` per operand: plain strided batches, and the [batch, seq, heads, dim] views
of attention with grouped K/V heads, are both this form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..builder import Addr, KernelBuilder, Reg, T
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, load_f32, store_f32
from .common import check_positive
from .ring import Offset, Ring

PAD = 4  # floats of padding per shared row: the transposing stores then hit distinct banks


@dataclass(frozen=True)
class _Operand:
    """How one operand's ``outer x block_k`` slices travel from global to shared memory.

    ``k_contig``: the operand is stored with K contiguous (A not transposed, B transposed), so a
    thread's vector runs along K and is transposed on its way into shared memory, which always
    holds slices as [block_k][outer + PAD].
    """

    name: str
    outer: int   # block_m for A, block_n for B
    k_contig: bool


class _TileLoader:
    def __init__(self, spec: "GemmSpec", b: KernelBuilder, op: _Operand, ptr: Reg, ld: Reg,
                 extent: Reg, k_total: Reg, block_outer: Reg, tid: Reg, smem: Reg):
        self.b, self.op, self.vec, self.bk = b, op, spec.vec, spec.block_k
        per_row = (spec.block_k if op.k_contig else op.outer) // spec.vec
        count = op.outer * spec.block_k // (spec.vec * spec.threads)
        self.row_bytes = (op.outer + PAD) * 4
        # the k step between slices, in bytes of global memory: along a row, or over block_k rows
        self.k_step = b.mul_wide(ld, spec.block_k * 4) if not op.k_contig else None
        self.slots = []
        for i in range(count):
            idx = b.add(tid, i * spec.threads)
            first, second = b.div(idx, per_row), b.mul(b.rem(idx, per_row), spec.vec)
            outer, kk = (first, second) if op.k_contig else (second, first)
            g_outer = b.add(block_outer, outer)
            row, col = (g_outer, kk) if op.k_contig else (kk, g_outer)
            index = b.add(b.mul_wide(row, ld), b.cvt(T.U64, col))
            addr = b.add(ptr, b.shl(index, 2))
            in_outer = b.setp("lt", g_outer, extent)
            shared = b.add(smem, b.mad(kk, self.row_bytes, b.mul(outer, 4)))
            self.slots.append((addr, kk, in_outer, shared))
        self.k_total = k_total

    def fetch(self, k0: Reg) -> list[list[Reg]]:
        """This thread's vectors of the slice starting at ``k0``; zeros outside the matrix."""
        b, out = self.b, []
        for addr, kk, in_outer, _ in self.slots:
            in_k = b.setp("lt", b.add(k0, kk), self.k_total)
            ok = b.and_(in_outer, in_k)
            out.append(load_f32(b, DType.F32, Addr(addr), self.vec, guard=ok))
        return out

    def advance(self) -> None:
        b = self.b
        for addr, *_ in self.slots:
            if self.op.k_contig:
                b.add(addr, self.bk * 4, out=addr)
            else:
                b.add(addr, self.k_step, out=addr)

    def stash(self, values: list[list[Reg]], buffer: Reg) -> None:
        """Into shared memory at [k][outer] (``buffer`` = byte offset of the buffer being filled)."""
        b = self.b
        for (_, _, _, shared), vals in zip(self.slots, values):
            base = b.add(shared, buffer)
            if self.op.k_contig:
                for j, v in enumerate(vals):
                    b.st("shared", Addr(base, j * self.row_bytes), v)
            else:
                b.st("shared", Addr(base), vals if len(vals) > 1 else vals[0])


def bias_at(b: KernelBuilder, bias_ptr: Reg, col: Reg, ok: Reg, width: int) -> list[Reg]:
    """bias[col : col + width] (f32), loaded where ``ok`` (the chunk lies below n)."""
    return load_f32(b, DType.F32, Addr(b.add(bias_ptr, b.shl(b.cvt(T.U64, col), 2))), width, guard=ok)


class Epilogue:
    """Writes accumulators into C (f32, or ``out`` bf16: rounded to nearest even as stored) with
    ``ldc`` columns per row: + bias[col] when the spec has one (loaded once per column chunk), + the
    old C when it accumulates, + R[row, col] when it adds a ``residual`` (an f32 matrix of C's
    geometry); rows >= m and columns >= n are not written. Shared by the SIMT and the tensor-core
    GEMMs."""

    def __init__(self, b: KernelBuilder, c_ptr: Reg, m: Reg, n: Reg, bias: bool, accumulate: bool,
                 out: DType = DType.F32, residual: bool = False):
        self.b, self.c_ptr, self.m, self.n, self.accumulate, self.out = b, c_ptr, m, n, accumulate, out
        self.shift = out.size.bit_length() - 1  # log2 of C's element bytes
        self.ldc = b.ld_param("ldc")
        self.bias_ptr = b.cvta_global(b.ld_param("bias")) if bias else None
        self.residual_ptr = b.cvta_global(b.ld_param("residual")) if residual else None

    def column(self, col: Reg, width: int) -> tuple[Reg, Reg, list[Reg] | None, int]:
        """A chunk of ``width`` columns from ``col`` (never straddling n): (col, in range, bias, width)."""
        ok = self.b.setp("lt", col, self.n)
        return col, ok, bias_at(self.b, self.bias_ptr, col, ok, width) if self.bias_ptr is not None else None, width

    def row(self, row: Reg) -> tuple[Reg, Reg, Reg | None]:
        """(in range, C's row, R's row or None)."""
        b = self.b
        ok, elems = b.setp("lt", row, self.m), b.mul_wide(row, self.ldc)
        c_row = b.add(self.c_ptr, b.shl(elems, self.shift))
        return ok, c_row, b.add(self.residual_ptr, b.shl(elems, 2)) if self.residual_ptr is not None else None

    def store(self, row: tuple[Reg, Reg, Reg | None], column: tuple[Reg, Reg, list[Reg] | None, int],
              vals: list[Reg]) -> None:
        b = self.b
        (row_ok, row_ptr, r_row), (col, ok, bias, width) = row, column
        if bias is not None:
            vals = [b.add(v, x) for v, x in zip(vals, bias)]
        guard = b.and_(row_ok, ok)
        col64 = b.cvt(T.U64, col)
        addr = Addr(b.add(row_ptr, b.shl(col64, self.shift)))
        if self.accumulate:
            vals = [b.add(v, o) for v, o in zip(vals, load_f32(b, self.out, addr, width, guard=guard))]
        if r_row is not None:  # (.nc: R is apart from C, so its loads need not wait behind the stores before)
            at = Addr(b.add(r_row, b.shl(col64, 2)))
            vals = [b.add(v, r) for v, r in zip(vals, load_f32(b, DType.F32, at, width, guard=guard, nc=True))]
        store_f32(b, self.out, addr, vals, guard=guard)


@dataclass(frozen=True)
class Strides:
    """One operand's batch addressing: z -> (z // inner) * outer + ((z % inner) // group) * inner_stride."""

    outer: int = 0
    inner: int = 0
    group: int = 1


@dataclass(frozen=True)
class Batch:
    count: int = 1
    inner: int = 1  # z = outer_index * inner + inner_index
    a: Strides = Strides()
    b: Strides = Strides()
    c: Strides = Strides()

    def strides(self) -> tuple[int, ...]:
        if self.inner < 1 or min(s.group for s in (self.a, self.b, self.c)) < 1:
            raise ValueError("batch inner count and groups must be >= 1")
        return tuple(v for s in (self.a, self.b, self.c) for v in (s.outer, s.inner, s.group))


def leading_dims(spec: Any, m: int, n: int, k: int, lda: int | None, ldb: int | None, ldc: int | None,
                 bias: int | None, residual: int | None = None) -> tuple[int, int, int]:
    """(lda, ldb, ldc), dense by default, after the checks every GEMM's arguments share: M, N, K
    positive, a bias pointer exactly when the spec adds a bias, a residual exactly when it adds one."""
    if min(m, n, k) < 1:
        raise ValueError(f"{spec.kind}: M, N, K must be >= 1, got {m}, {n}, {k}")
    if (bias is not None) != spec.bias:
        raise ValueError(f"{spec.kind}: this spec {'needs a' if spec.bias else 'takes no'} bias")
    if (residual is not None) != spec.residual:
        raise ValueError(f"{spec.kind}: this spec {'needs a' if spec.residual else 'takes no'} residual")
    return (lda if lda is not None else (m if spec.trans_a else k),
            ldb if ldb is not None else (k if spec.trans_b else n),
            ldc if ldc is not None else n)


def check_residual(spec: Any) -> None:
    """A GEMM adds a residual to its own product: not to an accumulated C (whose old value is
    already its addend)."""
    if spec.residual and spec.accumulate:
        raise SpecError(f"{spec.kind}: residual and accumulate exclude each other (C = R + A@B, or C += A@B)")


def residual_arguments(spec: Any, c: int, residual: int | None, m: int, ldc: int, splits: int,
                       batch: "Batch | None") -> None:
    """A ``residual`` spec's R: one [m, ldc] f32 matrix beside one product (no split-K parts or
    batches), apart from C (a C that is R is ``accumulate``'s). Checked here where both are
    addresses; with ``tma_store`` they are tensor maps, and a plan's are views bound at launch:
    their caller keeps them apart."""
    if residual is None:
        return
    if splits != 1 or batch is not None:
        raise ValueError(f"{spec.kind}: a residual is added to one product: no split-K parts or batches")
    addresses = isinstance(residual, int) and isinstance(c, int) and not spec.tma_store
    if addresses and abs(residual - c) < m * ldc * spec.c_dtype.size:
        raise ValueError(f"{spec.kind}: the residual overlaps C (C = R + A@B in place is accumulate's)")


def split_batch(spec: Any, m: int, k: int, lda: int, ldb: int, ldc: int, splits: int, batch: Batch | None) -> Batch:
    """``batch``, or the batches that cut the contraction into ``splits`` consecutive parts of
    ``k`` (split-K): part z reads A and B z*k further along K and writes its partial product
    z*m*ldc elements further into C. The two do not combine."""
    if splits == 1:
        return batch or Batch()
    if splits < 1 or batch is not None:
        raise ValueError(f"{spec.kind}: splits must be >= 1 and cannot combine with batches, got {splits}")
    return Batch(count=splits, a=Strides(outer=k * (lda if spec.trans_a else 1)),
                 b=Strides(outer=k * (1 if spec.trans_b else ldb)), c=Strides(outer=m * ldc))


def tile_origin(b: KernelBuilder, spec: Any, m: Reg, n: Reg, pid: Reg | None = None) -> tuple[Reg, Reg]:
    """(row0, col0) of C tile ``pid`` (default: this block's). Consecutive tiles walk down a band
    of ``group_m`` tile rows, column by column, so the blocks running at once share A rows and B
    columns in L2 (plain row-major order would stream all of B through L2 once per tile row)."""
    tiles_m = b.div(b.add(m, spec.block_m - 1), spec.block_m)
    tiles_n = b.div(b.add(n, spec.block_n - 1), spec.block_n)
    pid = pid if pid is not None else b.special("%ctaid.x")
    width = b.mul(tiles_n, spec.group_m)
    group = b.div(pid, width)
    first = b.mul(group, spec.group_m)
    size = b.min(b.sub(tiles_m, first), spec.group_m)
    within = b.sub(pid, b.mul(group, width))
    tile_m, tile_n = b.add(first, b.rem(within, size)), b.div(within, size)
    return b.mul(tile_m, spec.block_m), b.mul(tile_n, spec.block_n)


BATCH_PARAMS = ("inner",) + tuple(f"{x}_{s}" for x in "abc" for s in ("outer", "inner", "group"))


def batch_matrices(b: KernelBuilder, z: Reg, elem_bytes: dict[str, int]) -> list[Reg]:
    """Batch ``z``'s matrix of each operand (name -> element size): the global base pointer plus
    z_outer * outer_stride + (z_inner // group) * inner_stride elements (the BATCH_PARAMS)."""
    inner = b.ld_param("inner")
    z_outer, z_inner = b.div(z, inner), b.rem(z, inner)
    out = []
    for name, size in elem_bytes.items():
        base = b.cvta_global(b.ld_param(name))
        group = b.ld_param(f"{name}_group")
        elems = b.add(b.mul_wide(z_outer, b.ld_param(f"{name}_outer")),
                      b.mul_wide(b.div(z_inner, group), b.ld_param(f"{name}_inner")))
        out.append(b.add(base, b.shl(elems, size.bit_length() - 1)))
    return out


@register
@dataclass(frozen=True)
class GemmSpec(KernelSpec):
    kind: ClassVar[str] = "gemm_f32"
    trans_a: bool = False
    trans_b: bool = True
    bias: bool = False        # C += bias[n] (broadcast over rows)
    accumulate: bool = False  # C = C_old + A@B: gradient accumulation
    residual: bool = False    # C = R + A@B, R an f32 matrix of C's geometry apart from C: a residual stream's add
    block_m: int = 128
    block_n: int = 128
    block_k: int = 8
    thread_m: int = 8
    thread_n: int = 8
    vec: int = 4              # elements per global access; contiguous dimensions must divide by it
    # the tensor-core GEMMs' epilogue options, none of them this kernel's (so every GEMM spec has them)
    split_tail: ClassVar[bool] = False
    tma_store: ClassVar[bool] = False
    swiglu_grad: ClassVar[bool] = False
    swiglu_act: ClassVar[bool] = False
    rope_heads: ClassVar[int] = 0
    c_dtype: ClassVar[DType] = DType.F32

    @property
    def threads_m(self) -> int:
        return self.block_m // self.thread_m

    @property
    def threads_n(self) -> int:
        return self.block_n // self.thread_n

    @property
    def threads(self) -> int:
        return self.threads_m * self.threads_n

    def validate(self) -> None:
        for name in ("block_m", "block_n", "block_k", "thread_m", "thread_n", "vec"):
            check_positive(name, getattr(self, name))
        if self.thread_m % 4 or self.thread_n % 4:
            raise SpecError("thread_m and thread_n must be multiples of 4 (16-byte shared reads)")
        if self.block_m % self.thread_m or self.block_n % self.thread_n:
            raise SpecError("block_m / block_n must be multiples of thread_m / thread_n")
        if self.vec not in (1, 2, 4):
            raise SpecError(f"vec must be 1, 2 or 4, got {self.vec}")
        if not 32 <= self.threads <= 1024 or self.threads % 32:
            raise SpecError(f"the tile needs {self.threads} threads; must be a multiple of 32 in [32, 1024]")
        for outer in (self.block_m, self.block_n):
            if (outer * self.block_k) % (self.vec * self.threads) or self.block_k % self.vec or outer % self.vec:
                raise SpecError(f"a {outer}x{self.block_k} slice does not split into {self.threads} "
                                f"threads' vectors of {self.vec}")
        check_residual(self)
        smem = 2 * self.block_k * (self.block_m + self.block_n + 2 * PAD) * 4
        if smem > 48 * 1024:
            raise SpecError(f"tiles need {smem} bytes of shared memory (max 49152)")

    def params(self) -> tuple[tuple[str, T], ...]:
        ptrs = ("a", "b", "c") + (("bias",) if self.bias else ()) + (("residual",) if self.residual else ())
        dims = ("m", "n", "k", "lda", "ldb", "ldc") + BATCH_PARAMS
        return tuple((p, T.U64) for p in ptrs) + tuple((d, T.U32) for d in dims)

    def outputs(self) -> tuple[str, ...]:
        return ('c',)

    def read_outputs(self) -> tuple[str, ...]:
        return ('c',) if self.accumulate else ()

    def launch_dims(self, m: int, n: int, batches: int = 1) -> tuple[tuple[int, int, int], int]:
        return (-(-n // self.block_n), -(-m // self.block_m), batches), self.threads

    def split_k_multiple(self) -> int:
        """What a split-K part's contraction length must be a multiple of: any (edges are masked)."""
        return 1

    def arguments(self, a: int, b: int, c: int, m: int, n: int, k: int, *, bias: int | None = None,
                  lda: int | None = None, ldb: int | None = None, ldc: int | None = None,
                  batch: "Batch | None" = None, splits: int = 1, residual: int | None = None) -> tuple[int, ...]:
        """The kernel's arguments in order (pointers as ints), after refusing what it cannot serve.

        Leading dimensions default to the dense ones. Every contiguous extent, leading dimension
        and batch stride must be a multiple of ``vec`` (else a vector access would straddle rows
        or be misaligned): a ValueError before the launch, never a wrong answer. ``splits``:
        split-K (``split_batch``), launched as that many batches. ``residual``: a ``residual``
        spec's R (``residual_arguments``).
        """
        lda, ldb, ldc = leading_dims(self, m, n, k, lda, ldb, ldc, bias, residual)
        residual_arguments(self, c, residual, m, ldc, splits, batch)
        batch = split_batch(self, m, k, lda, ldb, ldc, splits, batch)
        contiguous = {"M (A transposed)": m if self.trans_a else None,
                      "K": k if not self.trans_a or self.trans_b else None,
                      "N": n, "lda": lda, "ldb": ldb, "ldc": ldc,
                      **{f"batch stride {i}": s for i, s in enumerate(batch.strides()) if i % 3 != 2}}
        for name, value in contiguous.items():
            if value is not None and value % self.vec:
                raise ValueError(f"gemm_f32 with vec={self.vec}: {name}={value} is not a multiple of {self.vec}")
        ptrs = (a, b, c) + ((bias,) if self.bias else ()) + ((residual,) if residual is not None else ())
        return (*ptrs, m, n, k, lda, ldb, ldc, batch.inner, *batch.strides())

    def build(self, b: KernelBuilder) -> None:
        bm, bn, bk, tm, tn = self.block_m, self.block_n, self.block_k, self.thread_m, self.thread_n
        m, n, k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        tx, ty = b.rem(tid, self.threads_n), b.div(tid, self.threads_n)
        a_ptr, b_ptr, c_ptr = batch_matrices(b, b.special("%ctaid.z"), {"a": 4, "b": 4, "c": 4})
        row0 = b.mul(b.special("%ctaid.y"), bm)
        col0 = b.mul(b.special("%ctaid.x"), bn)

        a_rows = (bk * (bm + PAD)) * 4
        b_rows = (bk * (bn + PAD)) * 4
        smem_a = b.addr_of(b.shared_array("tile_a", T.F32, 2 * a_rows // 4, align=16))
        smem_b = b.addr_of(b.shared_array("tile_b", T.F32, 2 * b_rows // 4, align=16))
        op_a = _Operand("a", bm, k_contig=not self.trans_a)
        op_b = _Operand("b", bn, k_contig=self.trans_b)
        load_a = _TileLoader(self, b, op_a, a_ptr, b.ld_param("lda"), m, k, row0, tid, smem_a)
        load_b = _TileLoader(self, b, op_b, b_ptr, b.ld_param("ldb"), n, k, col0, tid, smem_b)

        acc = [[b.mov(0.0, T.F32) for _ in range(tn)] for _ in range(tm)]
        buf_a, buf_b = Offset(Ring(b, 2, a_rows, smem_a)), Offset(Ring(b, 2, b_rows, smem_b))
        k0 = b.mov(0, T.U32)
        load_a.stash(load_a.fetch(k0), buf_a.at)
        load_b.stash(load_b.fetch(k0), buf_b.at)
        b.bar_sync()
        frag_a = b.add(smem_a, b.mul(ty, 16))
        frag_b = b.add(smem_b, b.mul(tx, 16))
        tiles = b.div(b.add(k, bk - 1), bk)
        with b.loop(tiles, "ktile"):
            # the next slice is in flight while this one is multiplied (past K it loads zeros)
            b.add(k0, bk, out=k0)
            load_a.advance()
            load_b.advance()
            next_a, next_b = load_a.fetch(k0), load_b.fetch(k0)
            pa, pb = b.add(frag_a, buf_a.at), b.add(frag_b, buf_b.at)
            for kk in range(bk):
                av = [v for g in range(tm // 4) for v in
                      b.ld("shared", T.F32, Addr(pa, kk * (bm + PAD) * 4 + g * self.threads_m * 16), 4)]
                bv = [v for g in range(tn // 4) for v in
                      b.ld("shared", T.F32, Addr(pb, kk * (bn + PAD) * 4 + g * self.threads_n * 16), 4)]
                for i in range(tm):
                    for j in range(tn):
                        b.fma(av[i], bv[j], acc[i][j], out=acc[i][j])
            buf_a.advance()
            buf_b.advance()
            load_a.stash(next_a, buf_a.at)
            load_b.stash(next_b, buf_b.at)
            b.bar_sync()
        self._epilogue(b, acc, c_ptr, m, n, row0, col0, tx, ty)

    def _epilogue(self, b: KernelBuilder, acc: list[list[Reg]], c_ptr: Reg, m: Reg, n: Reg,
                  row0: Reg, col0: Reg, tx: Reg, ty: Reg) -> None:
        out = Epilogue(b, c_ptr, m, n, self.bias, self.accumulate, residual=self.residual)
        chunks = []  # (first accumulator column, column) per vec-wide chunk of this thread's columns
        for g in range(self.thread_n // 4):
            for c in range(0, 4, self.vec):
                col = out.column(b.add(col0, b.add(b.mul(tx, 4), g * self.threads_n * 4 + c)), self.vec)
                chunks.append((g * 4 + c, col))
        for g in range(self.thread_m // 4):
            for r in range(4):
                row = out.row(b.add(row0, b.add(b.mul(ty, 4), g * self.threads_m * 4 + r)))
                for j, col in chunks:
                    out.store(row, col, acc[g * 4 + r][j:j + self.vec])

    @classmethod
    def examples(cls) -> list["GemmSpec"]:
        return [cls(), cls(trans_a=False, trans_b=False), cls(trans_a=True, trans_b=False, accumulate=True),
                cls(bias=True), cls(block_m=64, block_n=64, thread_m=4, thread_n=4, vec=1), cls(residual=True),
                cls(trans_a=True, trans_b=True, block_m=32, block_n=64, thread_m=4, thread_n=4, vec=2)]


def widest_vec(*extents: int) -> int:
    """The widest vector (4, 2 or 1 elements) that divides every contiguous extent given."""
    return next(v for v in (4, 2, 1) if all(e % v == 0 for e in extents))


def gemm_reference(a: np.ndarray, b: np.ndarray, trans_a: bool, trans_b: bool, bias: np.ndarray | None = None,
                   c: np.ndarray | None = None) -> np.ndarray:
    """float64 op(A) @ op(B) (+ bias) (+ c)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out if c is None else out + np.asarray(c, np.float64)
