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
    specialized: bool = False  # tma only: a producer warpgroup copies, the others multiply; blocks persist

    trans_a: ClassVar[bool] = False
    trans_b: ClassVar[bool] = True
    block_k: ClassVar[int] = BLOCK_K
    m_tiles: ClassVar[int] = 1  # per warp: 16 rows of the m64 tile ...

    @property
    def threads(self) -> int:
        return 128 * (self.warpgroups + self.specialized)

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
        if self.specialized and not self.tma:
            raise SpecError("specialized (a producer warpgroup) needs tma: its one thread issues bulk copies")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.stages} stages need {self.dynamic_shared_bytes()} bytes of shared memory "
                            f"(max {SHARED_LIMIT})")

    @property
    def stage_bytes(self) -> int:
        return (self.block_m + self.block_n) * BLOCK_K * 2

    def dynamic_shared_bytes(self) -> int:
        # with tma, a stage's mbarriers (8 bytes each: full; empty too when specialized) after the
        # stages: static shared memory would move the dynamic base off the 1024-byte alignment the
        # swizzled tiles need
        return self.stages * (self.stage_bytes + 8 * (self.tma + self.specialized))

    def launch_dims(self, m: int, n: int, batches: int = 1, *, resident: int | None = None
                    ) -> tuple[tuple[int, int], int]:
        """As the tensor-core GEMM's; a specialized kernel's blocks persist, each walking tiles
        ``resident`` apart, so it takes at most ``resident`` blocks (``Kernel.resident_blocks``)."""
        (tiles, batches), threads = super().launch_dims(m, n, batches)
        if self.specialized and resident:
            tiles = min(tiles, resident)
        return (tiles, batches), threads

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
        if self.specialized:
            return _Specialized(self, b).build()
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

        for _ in range(self.stages - 1):
            slices.issue(write)
            advance(write)
        with b.loop(slices.count, "ktile"):
            slices.before_issue()  # ... every warpgroup is done with the oldest stage
            slices.issue(write)
            advance(write)
            slices.before_read()   # this slice has landed, visible to wgmma's reads
            multiply(self, b, acc, b.add(read, a_rows), b.add(read, a_stage), scale_d)
            b.wgmma_wait(0)
            advance(read)
        slices.finish()
        tiles = [[acc[4 * j:4 * j + 4] for j in range(self.n_tiles)]]  # m16n8 tiles of this warp's 16 rows
        store_accumulators(b, self, tiles, c_ptr, m, n, row0, col0, warp, b.mov(0, T.U32), lane)

    @classmethod
    def examples(cls) -> list["GemmWgmmaSpec"]:
        return [cls(), cls(bias=True, dtype=MmaType.F16, block_n=128), cls(accumulate=True, warpgroups=1, stages=3),
                cls(dtype=MmaType.TF32, block_n=128), cls(tma=True), cls(tma=True, dtype=MmaType.TF32, bias=True),
                cls(tma=True, specialized=True), cls(tma=True, specialized=True, accumulate=True, block_n=128)]


def multiply(spec: GemmWgmmaSpec, b: KernelBuilder, acc: list[Reg], a_tile: Reg, b_tile: Reg, scale_d: Reg) -> None:
    """acc += the slice's A rows at shared ``a_tile`` @ its B tile at ``b_tile``^T: one committed
    group of BLOCK_K / 16 wgmmas, each 32 bytes further along the swizzled rows."""
    b.wgmma_fence()
    desc_a, desc_b = (b.or_(b.cvt(T.U64, b.shr(x, 4)), DESCRIPTOR, T.B64) for x in (a_tile, b_tile))
    for kk in range(BLOCK_K // 16):
        b.wgmma(acc, b.add(desc_a, 2 * kk, T.U64), b.add(desc_b, 2 * kk, T.U64), spec.dtype.value, spec.block_n,
                scale_d)
    b.wgmma_commit()


class _Ring:
    """Which stage a slice counter is at and the parity of its mbarriers' current phase, advanced
    slice by slice (each stage's barriers complete once per trip around the ring)."""

    def __init__(self, b: KernelBuilder, stages: int):
        self.b, self.stages = b, stages
        self.at, self.phase = b.mov(0, T.U32), b.mov(0, T.U32)

    def advance(self) -> None:
        b = self.b
        b.add(self.at, 1, out=self.at)
        wrapped = b.setp("eq", self.at, self.stages)
        b.mov(b.selp(0, self.at, wrapped, T.U32), out=self.at)
        b.mov(b.selp(b.xor(self.phase, 1), self.phase, wrapped, T.U32), out=self.phase)


class _Specialized:
    """The warp-specialized persistent kernel: warpgroup 0 is the producer, of which one thread
    issues the TMA copies of every slice of every tile this block owns, as far ahead as the stages
    allow; warpgroups 1.. multiply. Two mbarriers a stage: ``full`` (the copies' bytes landed) and
    ``empty`` (every consumer thread's wgmmas that read the stage have completed). The consumers
    keep one wgmma group in flight (wait_group 1), so the tensor cores never wait for a barrier
    between slices, and while they store one tile the producer is already filling the stages
    with the next. Blocks walk tiles ``%nctaid.x`` apart in ``tile_origin``'s order."""

    PRODUCER_REGS, CONSUMER_REGS = 40, 232  # setmaxnreg: 128 x 40 + 256 x 232 <= 64K registers

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder):
        self.spec, self.b = spec, b

    def build(self) -> None:
        spec, b = self.spec, self.b
        b.launch_bounds(spec.threads, 1)  # the register cap setmaxnreg redistributes
        self.m, self.n, self.k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        self.warpgroup = b.shr(tid, 7)
        self.smem = b.addr_of(b.dynamic_shared("tiles", align=ATOM_BYTES))
        self.full = b.add(self.smem, spec.stages * spec.stage_bytes)
        self.empty = b.add(self.full, 8 * spec.stages)
        leader = b.setp("eq", tid, 0)
        for s in range(spec.stages):
            b.mbarrier_init(b.add(self.full, 8 * s), 1, guard=leader)
            b.mbarrier_init(b.add(self.empty, 8 * s), 128 * spec.warpgroups, guard=leader)
        b.fence_mbarrier_init(guard=leader)
        b.bar_sync()
        k_step = 2 * BLOCK_K // spec.dtype.bytes  # elements of K per slice
        self.slices = b.div(b.add(self.k, k_step - 1), k_step)
        tiles = b.mul(b.div(b.add(self.m, spec.block_m - 1), spec.block_m),
                      b.div(b.add(self.n, spec.block_n - 1), spec.block_n))
        self.first, self.stride = b.special("%ctaid.x"), b.special("%nctaid.x")
        # tiles first, first + stride, ... below tiles
        self.mine = b.div(b.add(b.sub(b.max(tiles, self.first), self.first), b.sub(self.stride, 1)), self.stride)
        end, consumer = b.new_label("end"), b.new_label("consumer")
        b.bra(consumer, guard=b.setp("ne", self.warpgroup, 0))
        b.setmaxnreg(self.PRODUCER_REGS, grow=False)
        b.bra(end, guard=~leader)
        self.produce(k_step)
        b.bra(end)
        b.place(consumer)
        b.setmaxnreg(self.CONSUMER_REGS, grow=True)
        self.consume(tid)
        b.place(end)

    def tiles(self):
        """Loop over this block's tiles; yields (row0, col0)."""
        b = self.b
        with b.loop(self.mine, "tile") as i:
            yield tile_origin(b, self.spec, self.m, self.n, b.mad(i, self.stride, self.first))

    def stage(self, ring: _Ring) -> tuple[Reg, Reg, Reg]:
        """(shared address, full barrier, empty barrier) of the ring's stage."""
        b = self.b
        return (b.mad(ring.at, self.spec.stage_bytes, self.smem), b.mad(ring.at, 8, self.full),
                b.mad(ring.at, 8, self.empty))

    def produce(self, k_step: int) -> None:
        spec, b = self.spec, self.b
        maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
        ring = _Ring(b, spec.stages)
        for row0, col0 in self.tiles():
            k_at = b.mov(0, T.U32)
            with b.loop(self.slices, "slice"):
                at, full, empty = self.stage(ring)
                b.mbarrier_wait(empty, b.xor(ring.phase, 1))  # the first trip finds every stage free
                b.mbarrier_expect_tx(full, spec.stage_bytes)
                for tensor_map, row, offset in zip(maps, (row0, col0), (0, spec.block_m * BLOCK_K * 2)):
                    b.tma_load_2d(b.add(at, offset), tensor_map, k_at, row, full)
                b.add(k_at, k_step, out=k_at)
                ring.advance()

    def consume(self, tid: Reg) -> None:
        spec, b = self.spec, self.b
        c_ptr = b.cvta_global(b.ld_param("c"))
        warp, lane = b.sub(b.shr(tid, 5), 4), b.and_(tid, 31)  # the consumers' warps 0..
        a_rows = b.mul(b.sub(self.warpgroup, 1), 64 * BLOCK_K * 2)  # this warpgroup's 64 rows of A
        acc = [b.reg(T.F32) for _ in range(spec.block_n // 2)]
        scale_d = b.setp("ne", b.mov(1, T.U32), 0)
        ring = _Ring(b, spec.stages)
        freed = b.reg(T.U32)  # the empty barrier of the slice before
        for row0, col0 in self.tiles():
            for r in acc:
                b.mov(0.0, out=r)
            with b.loop(self.slices, "slice") as i:
                at, full, empty = self.stage(ring)
                b.mbarrier_wait(full, ring.phase)
                multiply(spec, b, acc, b.add(at, a_rows), b.add(at, spec.block_m * BLOCK_K * 2), scale_d)
                b.wgmma_wait(1)  # the slice before's wgmmas are done: its stage is free
                b.mbarrier_arrive(freed, guard=b.setp("ne", i, 0))
                b.mov(empty, out=freed)
                ring.advance()
            b.wgmma_wait(0)
            b.mbarrier_arrive(freed, guard=b.setp("ne", self.slices, 0))
            tiles = [[acc[4 * j:4 * j + 4] for j in range(spec.n_tiles)]]  # m16n8 tiles of this warp's 16 rows
            store_accumulators(b, spec, tiles, c_ptr, self.m, self.n, row0, col0, warp, b.mov(0, T.U32), lane)


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
