"""GEMM on Hopper's warpgroup MMA (``wgmma``, sm_90a): C[M, N] (+)= op(A) @ op(B) (+ bias), f32 C,
with bf16 / fp16 operands, or fp32 operands multiplied as TF32 (10-bit mantissa, fp32 accumulate).

A block's consumer warpgroups compute a (64 * ``warpgroups``) x ``block_n`` tile, each warpgroup 64
rows of it with ``wgmma.mma_async m64n{block_n}k16`` reading both operands straight from shared
memory through matrix descriptors (no ldmatrix, no register fragments for A or B). Slices of 128
bytes of K (64 16-bit or 32 tf32 elements) travel global -> shared ``stages`` deep, in the 128-byte
swizzle the descriptors name, fed one of two ways.

By TMA (``tma``), the fast path: a warp-specialized persistent kernel. Warpgroup 0 is the producer,
of which one thread issues bulk tensor copies (tensor maps as arguments, runtime.tensormap: the
unit swizzles and zero-fills past the edges) of every slice of every tile the block owns, as far
ahead as the stages allow; the other warpgroups multiply, keeping one wgmma group in flight, so the
tensor cores never wait on a barrier between slices, and while they store one tile the producer
already fills the stages with the next. Each stage has a ``full`` mbarrier (the copies' bytes
landed) and an ``empty`` one (every consumer thread's wgmmas reading it completed). All four
layouts of the 16-bit types: an operand stored with K contiguous ("K-major") is copied as [rows][64
K] boxes; one stored with M or N contiguous ("MN-major": A of dW = dY^T X, B of dX = dY W) as
[64 K][64 M or N] boxes side by side, which wgmma reads with its transpose flag. ``splits`` cuts
the contraction into parts whose partial products land in consecutive C matrices (split-K).

By cp.async (no tensor maps needed; Y = X W^T only, with the fp32 GEMM's batches): every thread
copies 16-byte chunks into the tensor-core GEMM's swizzled tiles (chunk c of row r at c ^ (r % 8)
is exactly the 128-byte swizzle, given 1024-byte aligned tiles; a tf32 row is copied as if of
16-bit units), and a fence makes them visible to the async proxy wgmma reads through.

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
ROW = 128           # bytes of a swizzled row: a K-major operand's slice row, an MN-major one's 64 elements
ATOM_BYTES = 1024   # 8 rows of 128 bytes: the swizzle period, and the descriptors' stride between 8-row groups
MN_CHUNK = BLOCK_K * ROW  # an MN-major operand's [64 K][64 M or N] box: the stride between its 64-wide chunks


def descriptor_bits(mn_major: bool) -> int:
    """A matrix descriptor's constant part. Bits 62-63: 1 = 128-byte swizzle; 32-45: the stride
    between 8-row groups (16-byte units): of M/N rows (K-major) or of k rows (MN-major); 16-29:
    the stride between 64-element chunks of M/N (MN-major; unused by K-major, 1 by convention)."""
    return (1 << 62) | ((ATOM_BYTES >> 4) << 32) | ((MN_CHUNK >> 4 if mn_major else 1) << 16)


@register
@dataclass(frozen=True)
class GemmWgmmaSpec(TensorCoreGemm, KernelSpec):
    kind: ClassVar[str] = "gemm_wgmma"
    dtype: MmaType = MmaType.BF16
    trans_a: bool = False  # A stored [K, M] (tma only)
    trans_b: bool = True   # B stored [N, K]; False: [K, N] (tma only)
    bias: bool = False
    accumulate: bool = False
    warpgroups: int = 2   # consumers, 64 rows each
    block_n: int = 256
    stages: int = 4
    group_m: int = 8
    tma: bool = False  # the warp-specialized persistent kernel fed by TMA (tensor maps as arguments)

    block_k: ClassVar[int] = BLOCK_K
    m_tiles: ClassVar[int] = 1  # per warp: 16 rows of the m64 tile ...

    @property
    def threads(self) -> int:
        return 128 * (self.warpgroups + self.tma)

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def n_tiles(self) -> int:  # ... by every n8 column tile of block_n
        return self.block_n // 8

    @property
    def mn_major(self) -> tuple[bool, bool]:
        """Whether A, B are stored with M, N contiguous (wgmma's transpose flags)."""
        return self.trans_a, not self.trans_b

    @property
    def k_elems(self) -> int:  # K elements per slice
        return 2 * BLOCK_K // self.dtype.bytes

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
        if any(self.mn_major) and not self.tma:
            raise SpecError("gemm_wgmma: only the tma feed reads operands stored with M or N contiguous")
        if any(self.mn_major) and self.dtype is MmaType.TF32:
            raise SpecError("gemm_wgmma: tf32 operands must be stored with K contiguous (A [M, K], B [N, K])")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.stages} stages need {self.dynamic_shared_bytes()} bytes of shared memory "
                            f"(max {SHARED_LIMIT})")

    @property
    def stage_bytes(self) -> int:
        return (self.block_m + self.block_n) * BLOCK_K * 2

    def dynamic_shared_bytes(self) -> int:
        # with tma, a stage's two mbarriers (8 bytes each) after the stages: static shared memory
        # would move the dynamic base off the 1024-byte alignment the swizzled tiles need
        return self.stages * (self.stage_bytes + (16 if self.tma else 0))

    def split_k_multiple(self) -> int:
        # a part's last slice would read the next part's K: TMA zero-fills only past the matrix
        return self.k_elems if self.tma else 1

    def params(self) -> tuple[tuple[str, T], ...]:
        if not self.tma:
            return super().params()
        ptrs = ("tmap_a", "tmap_b", "c") + (("bias",) if self.bias else ())
        return tuple((p, T.U64) for p in ptrs) + tuple((d, T.U32) for d in ("m", "n", "k", "ldc", "splits"))

    def launch_dims(self, m: int, n: int, batches: int = 1, *, resident: int | None = None
                    ) -> tuple[tuple[int, int], int]:
        """As the tensor-core GEMM's; the tma kernel's blocks persist, each walking (split, tile)
        pairs ``%nctaid.x`` apart, so it takes at most ``resident`` blocks (``Kernel.resident_blocks``)."""
        if not self.tma:
            return super().launch_dims(m, n, batches)
        (tiles, _), threads = super().launch_dims(m, n)
        return (min(tiles * batches, resident or tiles * batches), 1), threads

    def arguments(self, a: int, b: int, c: int, m: int, n: int, k: int, *, bias: int | None = None,
                  lda: int | None = None, ldb: int | None = None, ldc: int | None = None,
                  batch: Batch | None = None, splits: int = 1) -> tuple[int, ...]:
        """As the tensor-core GEMM's; with ``tma``, ``a`` and ``b`` are the device addresses of
        the operands' tensor maps (``tma_operands``) and there are no leading dimensions or
        batches to pass, only ``splits``."""
        if not self.tma:
            return super().arguments(a, b, c, m, n, k, bias=bias, lda=lda, ldb=ldb, ldc=ldc, batch=batch,
                                     splits=splits)
        if batch is not None or lda is not None or ldb is not None:
            raise ValueError("gemm_wgmma with tma: the tensor maps carry the operands' layout; no batch, lda, ldb")
        ldc = ldc if ldc is not None else n
        super().arguments(a, b, c, m, n, k, bias=bias, ldc=ldc, splits=splits)  # the same shape checks
        return (a, b, c) + ((bias,) if self.bias else ()) + (m, n, k, ldc, splits)

    def tma_operands(self, m: int, n: int, k: int, lda: int | None = None, ldb: int | None = None
                     ) -> tuple[tuple[int, int, int, tuple[int, int]], ...]:
        """(rows, columns, row stride, box) of A's and B's tensor maps (``runtime.tensormap``): the
        matrices as stored ([M or N, K] K-major, else [K, M or N]; ``k`` all of K, every split's),
        and the (rows, columns) box one copy brings."""
        out = []
        for outer, block, mn, ld in ((m, self.block_m, self.trans_a, lda), (n, self.block_n, not self.trans_b, ldb)):
            rows, cols, box = (k, outer, (self.k_elems, ROW // 2)) if mn else (outer, k, (block, self.k_elems))
            out.append((rows, cols, ld if ld is not None else cols, box))
        return tuple(out)

    def build(self, b: KernelBuilder) -> None:
        (_Persistent if self.tma else _CopyFed)(self, b).build()

    @classmethod
    def examples(cls) -> list["GemmWgmmaSpec"]:
        return [cls(), cls(bias=True, dtype=MmaType.F16, block_n=128), cls(accumulate=True, warpgroups=1, stages=3),
                cls(dtype=MmaType.TF32, block_n=128), cls(tma=True), cls(tma=True, dtype=MmaType.TF32, bias=True, block_n=128),
                cls(tma=True, trans_b=False, accumulate=True), cls(tma=True, trans_a=True, trans_b=False, block_n=128),
                cls(tma=True, trans_a=True, warpgroups=1, block_n=64, stages=6)]


def multiply(spec: GemmWgmmaSpec, b: KernelBuilder, acc: list[Reg], a_tile: Reg, b_tile: Reg, scale_d: Reg) -> None:
    """acc += the slice's A rows at shared ``a_tile`` @ its B tile at ``b_tile``: one committed group
    of BLOCK_K / 16 wgmmas, each 16 k further on (32 bytes along K-major rows, 16 rows of 128 bytes
    down MN-major ones)."""
    b.wgmma_fence()
    descs = [b.or_(b.cvt(T.U64, b.shr(x, 4)), descriptor_bits(mn), T.B64) for x, mn in zip((a_tile, b_tile),
                                                                                            spec.mn_major)]
    for kk in range(BLOCK_K // 16):
        desc_a, desc_b = (b.add(d, (16 * ROW if mn else 32) * kk >> 4, T.U64) for d, mn in zip(descs, spec.mn_major))
        b.wgmma(acc, desc_a, desc_b, spec.dtype.value, spec.block_n, scale_d, spec.mn_major)
    b.wgmma_commit()


def store(spec: GemmWgmmaSpec, b: KernelBuilder, acc: list[Reg], c_ptr: Reg, m: Reg, n: Reg, row0: Reg, col0: Reg,
          warp: Reg, lane: Reg) -> None:
    """The accumulators of consumer warp ``warp`` (16 rows of the block tile each) into C."""
    tiles = [[acc[4 * j:4 * j + 4] for j in range(spec.n_tiles)]]  # m16n8 tiles of this warp's 16 rows
    store_accumulators(b, spec, tiles, c_ptr, m, n, row0, col0, warp, b.mov(0, T.U32), lane)


class _CopyFed:
    """Every thread copies its 16-byte chunks of the next slice by cp.async, waits for the oldest,
    fences it into the async proxy and meets the others at a barrier; then the block multiplies."""

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder):
        self.spec, self.b = spec, b

    def build(self) -> None:
        spec, b = self.spec, self.b
        b.launch_bounds(spec.threads)
        m, n, k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        lane, warp = b.and_(tid, 31), b.shr(tid, 5)
        row0, col0 = tile_origin(b, spec, m, n)
        a_stage, stage = spec.block_m * BLOCK_K * 2, spec.stage_bytes
        smem = b.addr_of(b.dynamic_shared("tiles", align=ATOM_BYTES))
        size = spec.dtype.bytes
        ptr = dict(zip("abc", batch_matrices(b, b.special("%ctaid.y"), {"a": size, "b": size, "c": 4})))
        units = size // 2  # a tf32 row is copied as if of 16-bit units
        lda, ldb, k16 = (b.mul(x, units) if units > 1 else x for x in (b.ld_param("lda"), b.ld_param("ldb"), k))
        ops = [_Operand(spec, b, ptr["a"], lda, m, k16, row0, spec.block_m, True, tid, 0),
               _Operand(spec, b, ptr["b"], ldb, n, k16, col0, spec.block_n, True, tid, a_stage)]
        k_issue = b.mov(0, T.U32)

        acc = [b.mov(0.0, T.F32) for _ in range(spec.block_n // 2)]
        scale_d = b.setp("ne", b.mov(1, T.U32), 0)  # accumulate into acc
        end = b.add(smem, spec.stages * stage)
        write, read = b.mov(smem), b.mov(smem)
        a_rows = b.mul(b.shr(tid, 7), 64 * ROW)  # this warpgroup's 64 rows of the A tile

        def advance(at: Reg) -> None:
            b.add(at, stage, out=at)
            b.mov(b.selp(smem, at, b.setp("eq", at, end), T.U32), out=at)

        def issue() -> None:  # past K: zero-size copies
            for op in ops:
                op.issue(k_issue, write)
            b.cp_async_commit()
            b.add(k_issue, BLOCK_K, out=k_issue)
            advance(write)

        for _ in range(spec.stages - 1):
            issue()
        with b.loop(b.div(b.add(k, spec.k_elems - 1), spec.k_elems), "ktile"):
            b.cp_async_wait(spec.stages - 2)  # the slice to read has landed (for this thread) ...
            b.fence_proxy_async()             # ... visible to the async proxy wgmma reads through ...
            b.bar_sync()                      # ... for every thread, who are all done with the oldest stage
            issue()
            multiply(spec, b, acc, b.add(read, a_rows), b.add(read, a_stage), scale_d)
            b.wgmma_wait(0)
            advance(read)
        b.cp_async_wait(0)
        store(spec, b, acc, ptr["c"], m, n, row0, col0, warp, lane)


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


class _Persistent:
    """The warp-specialized persistent kernel (the module docstring's TMA feed)."""

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder):
        self.spec, self.b = spec, b

    def build(self) -> None:
        spec, b = self.spec, self.b
        # one block an SM: 65536 / 384 threads caps a thread at 168 registers, the consumers'
        # 128 accumulators (block_n 256) included. (setmaxnreg could move the producer's unused
        # ones to the consumers, but the driver's JIT linker compiles separately and ignores it.)
        b.launch_bounds(spec.threads, 1)
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
        self.slices = b.div(b.add(self.k, spec.k_elems - 1), spec.k_elems)
        self.tiles = b.mul(b.div(b.add(self.m, spec.block_m - 1), spec.block_m),
                           b.div(b.add(self.n, spec.block_n - 1), spec.block_n))
        work = b.mul(self.tiles, b.ld_param("splits"))
        self.first, self.stride = b.special("%ctaid.x"), b.special("%nctaid.x")
        # (split, tile) pairs first, first + stride, ... below work
        self.mine = b.div(b.add(b.sub(b.max(work, self.first), self.first), b.sub(self.stride, 1)), self.stride)
        end, consumer = b.new_label("end"), b.new_label("consumer")
        b.bra(consumer, guard=b.setp("ne", self.warpgroup, 0))
        b.bra(end, guard=~leader)
        self.produce()
        b.bra(end)
        b.place(consumer)
        self.consume(tid)
        b.place(end)

    def work(self):
        """Loop over this block's (split, tile) pairs; yields (split, row0, col0)."""
        b = self.b
        with b.loop(self.mine, "tile") as i:
            index = b.mad(i, self.stride, self.first)
            split = b.div(index, self.tiles)
            yield (split, *tile_origin(b, self.spec, self.m, self.n, b.sub(index, b.mul(split, self.tiles))))

    def stage(self, ring: _Ring) -> tuple[Reg, Reg, Reg]:
        """(shared address, full barrier, empty barrier) of the ring's stage."""
        b = self.b
        return (b.mad(ring.at, self.spec.stage_bytes, self.smem), b.mad(ring.at, 8, self.full),
                b.mad(ring.at, 8, self.empty))

    def produce(self) -> None:
        """One thread: for each slice, wait for its stage to be free, then copy A's and B's boxes
        into it. A K-major operand is one box [rows][K] at (k, row0); an MN-major one is a box
        [64 K][64] per 64 of its rows, at (row0 + 64 j, k), MN_CHUNK apart."""
        spec, b = self.spec, self.b
        maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
        ring = _Ring(b, spec.stages)
        for split, row0, col0 in self.work():
            k_at = b.mul(split, self.k)
            with b.loop(self.slices, "slice"):
                at, full, empty = self.stage(ring)
                b.mbarrier_wait(empty, b.xor(ring.phase, 1))  # the first trip finds every stage free
                b.mbarrier_expect_tx(full, spec.stage_bytes)
                for tensor_map, outer0, rows, offset, mn in zip(maps, (row0, col0), (spec.block_m, spec.block_n),
                                                                (0, spec.block_m * ROW), spec.mn_major):
                    if not mn:
                        b.tma_load_2d(b.add(at, offset), tensor_map, k_at, outer0, full)
                    for j in range(rows // 64 if mn else 0):
                        b.tma_load_2d(b.add(at, offset + j * MN_CHUNK), tensor_map, b.add(outer0, 64 * j), k_at,
                                      full)
                b.add(k_at, spec.k_elems, out=k_at)
                ring.advance()

    def consume(self, tid: Reg) -> None:
        spec, b = self.spec, self.b
        c_base = b.cvta_global(b.ld_param("c"))
        split_bytes = b.shl(b.mul_wide(self.m, b.ld_param("ldc")), 2)  # one split's C matrix
        warp, lane = b.sub(b.shr(tid, 5), 4), b.and_(tid, 31)  # the consumers' warps 0..
        # this warpgroup's 64 rows of A: 64 K-major rows, or the MN-major chunk of them
        a_rows = b.mul(b.sub(self.warpgroup, 1), 64 * ROW)
        acc = [b.reg(T.F32) for _ in range(spec.block_n // 2)]
        scale_d = b.setp("ne", b.mov(1, T.U32), 0)
        ring = _Ring(b, spec.stages)
        freed = b.reg(T.U32)  # the empty barrier of the slice before
        for split, row0, col0 in self.work():
            for r in acc:
                b.mov(0.0, out=r)
            with b.loop(self.slices, "slice") as i:
                at, full, empty = self.stage(ring)
                b.mbarrier_wait(full, ring.phase)
                multiply(spec, b, acc, b.add(at, a_rows), b.add(at, spec.block_m * ROW), scale_d)
                b.wgmma_wait(1)  # the slice before's wgmmas are done: its stage is free
                b.mbarrier_arrive(freed, guard=b.setp("ne", i, 0))
                b.mov(empty, out=freed)
                ring.advance()
            b.wgmma_wait(0)
            b.mbarrier_arrive(freed, guard=b.setp("ne", self.slices, 0))
            c_ptr = b.add(c_base, b.mul(b.cvt(T.U64, split), split_bytes))
            store(spec, b, acc, c_ptr, self.m, self.n, row0, col0, warp, lane)
