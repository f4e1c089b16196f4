"""GEMM on Hopper's warpgroup MMA (``wgmma``, sm_90a): C[M, N] (+)= A @ B^T (+ bias), f32 C, with
bf16 / fp16 operands, or fp32 operands multiplied as TF32 (10-bit mantissa, fp32 accumulate).

The layout a linear layer's forward needs (Y = X W^T): A [M, K] and B [N, K], both K-contiguous.
A block of ``warpgroups`` x 128 threads computes a (64 * warpgroups) x ``block_n`` tile, each
warpgroup 64 rows of it with ``wgmma.mma_async m64n{block_n}k16`` reading both operands straight
from shared memory through matrix descriptors (no ldmatrix, no register fragments for A or B).
Slices of 128 bytes of K (64 16-bit or 32 tf32 elements: one row of the swizzle) travel global ->
shared ``stages`` deep, fed one of two ways. By cp.async (default): every thread copies 16-byte
chunks into the tensor-core GEMM's swizzled tiles (chunk c of row r at c ^ (r % 8) is exactly the
128-byte swizzle the descriptors name, given 1024-byte aligned tiles; a tf32 row is copied as if of
16-bit units), and a fence makes them visible to the async proxy wgmma reads through. By TMA
(``tma``): one thread issues a bulk tensor copy per operand from a tensor map (runtime.tensormap),
the unit swizzling and zero-filling past the edges itself, completing on the stage's mbarrier.
The accumulators come out in the mma.sync m16n8 layout, so the store, bias and accumulate are the
tensor-core GEMM's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, Reg, T
from ..registry import register
from ..spec import KernelSpec, SpecError, Target
from .common import check_positive
from .gemm import Batch, batch_matrices
from .gemm_tc import SHARED_LIMIT, TensorCoreGemm, _Operand, store_accumulators, tile_origin
from .mma_tile import MmaType

BLOCK_K = 64        # a slice's K in 16-bit units: 128 bytes, one swizzle atom's row
ATOM_BYTES = 1024   # 8 rows of 128 bytes: the swizzle period, and a descriptor's stride between 8-row groups
# descriptor bits 62-63: 1 = 128-byte swizzle; 32-45: stride between 8-row groups (16-byte units);
# 16-29: leading offset (unused by swizzled K-major operands, 1 by convention)
DESCRIPTOR = (1 << 62) | ((ATOM_BYTES >> 4) << 32) | (1 << 16)


@register
@dataclass(frozen=True)
class GemmWgmmaSpec(TensorCoreGemm, KernelSpec):
    kind: ClassVar[str] = "gemm_wgmma"
    dtype: MmaType = MmaType.BF16
    bias: bool = False
    accumulate: bool = False
    warpgroups: int = 2   # 64 rows each
    block_n: int = 256
    stages: int = 4
    group_m: int = 8
    tma: bool = False  # slices by TMA bulk tensor copies (tensor maps as arguments), not cp.async

    trans_a: ClassVar[bool] = False
    trans_b: ClassVar[bool] = True
    block_k: ClassVar[int] = BLOCK_K
    m_tiles: ClassVar[int] = 1  # per warp: 16 rows of the m64 tile ...

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def n_tiles(self) -> int:  # ... by every n8 column tile of block_n
        return self.block_n // 8

    def arch(self, target: Target) -> str:
        if target.arch not in ("sm_90", "sm_90a"):
            raise SpecError(f"gemm_wgmma needs sm_90a (wgmma); the target is {target.arch}")
        return "sm_90a"

    def validate(self) -> None:
        for name in ("warpgroups", "block_n", "stages", "group_m"):
            check_positive(name, getattr(self, name))
        if self.warpgroups not in (1, 2):
            raise SpecError(f"warpgroups must be 1 or 2, got {self.warpgroups}")
        if self.block_n not in (64, 128, 256):
            raise SpecError(f"block_n must be 64, 128 or 256, got {self.block_n}")
        if self.stages < 2:
            raise SpecError("stages must be >= 2 (one slice in flight while one is multiplied)")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.stages} stages need {self.dynamic_shared_bytes()} bytes of shared memory "
                            f"(max {SHARED_LIMIT})")

    @property
    def stage_bytes(self) -> int:
        return (self.block_m + self.block_n) * BLOCK_K * 2

    def dynamic_shared_bytes(self) -> int:
        # with tma, a stage's mbarrier (8 bytes) each after the stages: static shared memory would
        # move the dynamic base off the 1024-byte alignment the swizzled tiles need
        return self.stages * (self.stage_bytes + (8 if self.tma else 0))


    def params(self) -> tuple[tuple[str, T], ...]:
        if not self.tma:
            return super().params()
        ptrs = ("tmap_a", "tmap_b", "c") + (("bias",) if self.bias else ())
        return tuple((p, T.U64) for p in ptrs) + tuple((d, T.U32) for d in ("m", "n", "k", "ldc"))

    def arguments(self, a: int, b: int, c: int, m: int, n: int, k: int, *, bias: int | None = None,
                  lda: int | None = None, ldb: int | None = None, ldc: int | None = None,
                  batch: Batch | None = None) -> tuple[int, ...]:
        """As the tensor-core GEMM's; with ``tma``, ``a`` and ``b`` are the device addresses of
        the operands' tensor maps (``runtime.tensormap``, boxes of ``tma_boxes``) and there are no
        leading dimensions or batches to pass."""
        if not self.tma:
            return super().arguments(a, b, c, m, n, k, bias=bias, lda=lda, ldb=ldb, ldc=ldc, batch=batch)
        ldc = ldc if ldc is not None else n
        if batch is not None or lda is not None or ldb is not None:
            raise ValueError("gemm_wgmma with tma: the tensor maps carry the operands' layout; no batch, lda, ldb")
        full = super().arguments(a, b, c, m, n, k, bias=bias, ldc=ldc)  # the same shape checks
        return full[:3 + self.bias] + (m, n, k, ldc)

    @property
    def tma_boxes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(rows, K elements) of the A and B boxes a tensor map must describe (128-byte swizzle)."""
        k_elems = 2 * BLOCK_K // self.dtype.bytes
        return (self.block_m, k_elems), (self.block_n, k_elems)

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        m, n, k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        lane, warp = b.and_(tid, 31), b.shr(tid, 5)
        warpgroup = b.shr(tid, 7)
        row0, col0 = tile_origin(b, self, m, n)
        a_stage = self.block_m * BLOCK_K * 2
        stage = self.stage_bytes
        smem = b.addr_of(b.dynamic_shared("tiles", align=ATOM_BYTES))
        slices = (_TmaSlices if self.tma else _CopySlices)(self, b, m, n, k, row0, col0, tid, a_stage, smem)
        c_ptr = b.cvta_global(b.ld_param("c")) if self.tma else slices.c_ptr

        acc = [b.mov(0.0, T.F32) for _ in range(self.block_n // 2)]
        scale_d = b.setp("ne", b.mov(1, T.U32), 0)  # accumulate into acc
        end = b.add(smem, self.stages * stage)
        write, read = b.mov(smem), b.mov(smem)
        a_rows = b.mul(warpgroup, 64 * BLOCK_K * 2)  # this warpgroup's 64 rows of the A tile

        def advance(at: Reg) -> None:
            b.add(at, stage, out=at)
            b.mov(b.selp(smem, at, b.setp("eq", at, end), T.U32), out=at)

        def descriptor(addr: Reg) -> Reg:
            return b.or_(b.cvt(T.U64, b.shr(addr, 4)), DESCRIPTOR, T.B64)

        for _ in range(self.stages - 1):
            slices.issue(write)
            advance(write)
        with b.loop(slices.count, "ktile"):
            slices.before_issue()  # ... every warpgroup is done with the oldest stage
            slices.issue(write)
            advance(write)
            slices.before_read()   # this slice has landed, visible to wgmma's reads
            b.wgmma_fence()
            desc_a, desc_b = descriptor(b.add(read, a_rows)), descriptor(b.add(read, a_stage))
            for kk in range(BLOCK_K // 16):  # 32 bytes further along the swizzled rows per MMA
                b.wgmma(acc, b.add(desc_a, 2 * kk, T.U64), b.add(desc_b, 2 * kk, T.U64), self.dtype.value,
                        self.block_n, scale_d)
            b.wgmma_commit()
            b.wgmma_wait(0)
            advance(read)
        slices.finish()
        tiles = [[acc[4 * j:4 * j + 4] for j in range(self.n_tiles)]]  # m16n8 tiles of this warp's 16 rows
        store_accumulators(b, self, tiles, c_ptr, m, n, row0, col0, warp, b.mov(0, T.U32), lane)

    @classmethod
    def examples(cls) -> list["GemmWgmmaSpec"]:
        return [cls(), cls(bias=True, dtype=MmaType.F16, block_n=128), cls(accumulate=True, warpgroups=1, stages=3),
                cls(dtype=MmaType.TF32, block_n=128), cls(tma=True), cls(tma=True, dtype=MmaType.TF32, bias=True)]


class _CopySlices:
    """Slices by cp.async: every thread's 16-byte chunks, the swizzle written by address. A tf32
    row is copied as if of 16-bit units (a tf32 element is two of them)."""

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder, m: Reg, n: Reg, k: Reg, row0: Reg, col0: Reg,
                 tid: Reg, a_stage: int, smem: Reg):
        self.b, self.stages = b, spec.stages
        size = spec.dtype.bytes
        ptr = dict(zip("abc", batch_matrices(b, b.special("%ctaid.y"), {"a": size, "b": size, "c": 4})))
        self.c_ptr = ptr["c"]
        units = size // 2
        lda, ldb, k = (b.mul(x, units) if units > 1 else x for x in (b.ld_param("lda"), b.ld_param("ldb"), k))
        self.ops = [_Operand(spec, b, ptr["a"], lda, m, k, row0, spec.block_m, True, tid, 0),
                    _Operand(spec, b, ptr["b"], ldb, n, k, col0, spec.block_n, True, tid, a_stage)]
        self.count = b.div(b.add(k, BLOCK_K - 1), BLOCK_K)
        self.k_issue = b.mov(0, T.U32)

    def issue(self, stage: Reg) -> None:  # past K: zero-size copies
        for op in self.ops:
            op.issue(self.k_issue, stage)
        self.b.cp_async_commit()
        self.b.add(self.k_issue, BLOCK_K, out=self.k_issue)

    def before_issue(self) -> None:
        b = self.b
        b.cp_async_wait(self.stages - 2)  # the slice to read has landed (for this thread) ...
        b.fence_proxy_async()             # ... visible to the async proxy wgmma reads through ...
        b.bar_sync()                      # ... for every thread

    def before_read(self) -> None:
        pass

    def finish(self) -> None:
        self.b.cp_async_wait(0)


class _TmaSlices:
    """Slices by TMA: one thread issues a bulk tensor copy per operand (the unit writes the 128-byte
    swizzle itself and zero-fills past the edges), completing on the stage's mbarrier, which every
    thread waits on before reading the stage."""

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder, m: Reg, n: Reg, k: Reg, row0: Reg, col0: Reg,
                 tid: Reg, a_stage: int, smem: Reg):
        self.b, self.stages, self.a_stage = b, spec.stages, a_stage
        self.bytes = spec.stage_bytes
        self.k_step = 2 * BLOCK_K // spec.dtype.bytes  # elements of K per slice
        self.maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
        self.rows = [row0, col0]
        self.count = b.div(b.add(k, self.k_step - 1), self.k_step)
        self.bars = b.add(smem, spec.stages * spec.stage_bytes)
        self.leader = b.setp("eq", tid, 0)
        for s in range(spec.stages):
            b.mbarrier_init(b.add(self.bars, 8 * s), 1, guard=self.leader)
        b.fence_mbarrier_init(guard=self.leader)
        b.bar_sync()
        self.k_issue, self.issued = b.mov(0, T.U32), b.mov(0, T.U32)
        self.write_bar, self.read_bar, self.phase = b.mov(self.bars), b.mov(self.bars), b.mov(0, T.U32)

    def _next(self, bar: Reg) -> Reg:
        """The next stage's mbarrier, wrapping around; returns whether it wrapped."""
        b = self.b
        b.add(bar, 8, out=bar)
        wrapped = b.setp("eq", bar, b.add(self.bars, 8 * self.stages))
        b.mov(b.selp(self.bars, bar, wrapped, T.U32), out=bar)
        return wrapped

    def issue(self, stage: Reg) -> None:  # only the slices of K there are
        b = self.b
        go = b.and_(self.leader, b.setp("lt", self.issued, self.count))
        b.mbarrier_expect_tx(self.write_bar, self.bytes, guard=go)
        for tensor_map, row, offset in zip(self.maps, self.rows, (0, self.a_stage)):
            b.tma_load_2d(b.add(stage, offset), tensor_map, self.k_issue, row, self.write_bar, guard=go)
        b.add(self.k_issue, self.k_step, out=self.k_issue)
        b.add(self.issued, 1, out=self.issued)
        self._next(self.write_bar)

    def before_issue(self) -> None:
        self.b.bar_sync()  # every warpgroup is done with the stage about to be refilled

    def before_read(self) -> None:
        b = self.b
        b.mbarrier_wait(self.read_bar, self.phase)
        b.mov(b.selp(b.xor(self.phase, 1), self.phase, self._next(self.read_bar), T.U32), out=self.phase)

    def finish(self) -> None:
        pass
