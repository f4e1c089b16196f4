"""GEMM on Hopper's warpgroup MMA (``wgmma``, sm_90a): C[M, N] (+)= A @ B^T (+ bias), f32 C, with
bf16 / fp16 operands, or fp32 operands multiplied as TF32 (10-bit mantissa, fp32 accumulate).

The layout a linear layer's forward needs (Y = X W^T): A [M, K] and B [N, K], both K-contiguous.
A block of ``warpgroups`` x 128 threads computes a (64 * warpgroups) x ``block_n`` tile, each
warpgroup 64 rows of it with ``wgmma.mma_async m64n{block_n}k16`` reading both operands straight
from shared memory through matrix descriptors (no ldmatrix, no register fragments for A or B).
Slices of 128 bytes of K (64 16-bit or 32 tf32 elements: one row of the swizzle) travel global ->
shared by cp.async ``stages`` deep (a tf32 row is copied as if of 16-bit units), into
the tensor-core GEMM's swizzled tiles: chunk c of row r at c ^ (r % 8) is exactly the 128-byte
swizzle the descriptors name, given 1024-byte aligned tiles. A fence makes the copies visible to
the async proxy wgmma reads through. The accumulators come out in the mma.sync m16n8 layout, so
the store, bias and accumulate are the tensor-core GEMM's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, Reg, T
from ..registry import register
from ..spec import KernelSpec, SpecError, Target
from .common import check_positive
from .gemm import batch_matrices
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

    def dynamic_shared_bytes(self) -> int:
        return self.stages * (self.block_m + self.block_n) * BLOCK_K * 2

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        m, n, k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        lane, warp = b.and_(tid, 31), b.shr(tid, 5)
        warpgroup = b.shr(tid, 7)
        row0, col0 = tile_origin(b, self, m, n)
        a_stage = self.block_m * BLOCK_K * 2
        stage = a_stage + self.block_n * BLOCK_K * 2
        smem = b.addr_of(b.dynamic_shared("tiles", align=ATOM_BYTES))
        size = self.dtype.bytes
        ptr = dict(zip("abc", batch_matrices(b, b.special("%ctaid.y"), {"a": size, "b": size, "c": 4})))
        # the copies count K in 16-bit units: a tf32 element is two of them
        units = size // 2
        lda, ldb, k = (b.mul(x, units) if units > 1 else x for x in (b.ld_param("lda"), b.ld_param("ldb"), k))
        op_a = _Operand(self, b, ptr["a"], lda, m, k, row0, self.block_m, True, tid, 0)
        op_b = _Operand(self, b, ptr["b"], ldb, n, k, col0, self.block_n, True, tid, a_stage)

        acc = [b.mov(0.0, T.F32) for _ in range(self.block_n // 2)]
        scale_d = b.setp("ne", b.mov(1, T.U32), 0)  # accumulate into acc
        k_issue = b.mov(0, T.U32)
        end = b.add(smem, self.stages * stage)
        write, read = b.mov(smem), b.mov(smem)
        a_rows = b.mul(warpgroup, 64 * BLOCK_K * 2)  # this warpgroup's 64 rows of the A tile

        def advance(at: Reg) -> None:
            b.add(at, stage, out=at)
            b.mov(b.selp(smem, at, b.setp("eq", at, end), T.U32), out=at)

        def issue() -> None:
            op_a.issue(k_issue, write)
            op_b.issue(k_issue, write)
            b.cp_async_commit()
            b.add(k_issue, BLOCK_K, out=k_issue)
            advance(write)

        def descriptor(addr: Reg) -> Reg:
            return b.or_(b.cvt(T.U64, b.shr(addr, 4)), DESCRIPTOR, T.B64)

        for _ in range(self.stages - 1):
            issue()
        with b.loop(b.div(b.add(k, BLOCK_K - 1), BLOCK_K), "ktile"):
            b.cp_async_wait(self.stages - 2)  # this slice has landed (for this thread) ...
            b.fence_proxy_async()             # ... visible to wgmma's reads ...
            b.bar_sync()                      # ... for every thread; every warpgroup is done with the oldest
            issue()
            b.wgmma_fence()
            desc_a, desc_b = descriptor(b.add(read, a_rows)), descriptor(b.add(read, a_stage))
            for kk in range(BLOCK_K // 16):  # 32 bytes further along the swizzled rows per MMA
                b.wgmma(acc, b.add(desc_a, 2 * kk, T.U64), b.add(desc_b, 2 * kk, T.U64), self.dtype.value,
                        self.block_n, scale_d)
            b.wgmma_commit()
            b.wgmma_wait(0)
            advance(read)
        b.cp_async_wait(0)
        tiles = [[acc[4 * j:4 * j + 4] for j in range(self.n_tiles)]]  # m16n8 tiles of this warp's 16 rows
        store_accumulators(b, self, tiles, ptr["c"], m, n, row0, col0, warp, b.mov(0, T.U32), lane)

    @classmethod
    def examples(cls) -> list["GemmWgmmaSpec"]:
        return [cls(), cls(bias=True, dtype=MmaType.F16, block_n=128), cls(accumulate=True, warpgroups=1, stages=3),
                cls(dtype=MmaType.TF32, block_n=128)]
