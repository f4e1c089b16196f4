"""GEMM on Hopper's warpgroup MMA (``wgmma``, sm_90a): C[M, N] (+)= op(A) @ op(B) (+ bias), f32 C
(or, ``bf16_out``, C rounded to bf16 as it is stored), with bf16 / fp16 operands, or fp32 operands multiplied as TF32 (10-bit mantissa, fp32 accumulate).

A block's consumer warpgroups compute a (64 * ``warpgroups``) x ``block_n`` tile, each warpgroup 64
rows of it with ``wgmma.mma_async m64n{block_n}k16`` reading both operands straight from shared
memory through matrix descriptors (no ldmatrix, no register fragments for A or B). Slices of 128
bytes of K (64 16-bit or 32 tf32 elements) travel global -> shared ``stages`` deep, in the 128-byte
swizzle the descriptors name, fed one of two ways.

By TMA (``tma``), the fast path: a warp-specialized persistent kernel (``tma_pipeline``). A warp
after the consumer warpgroups is the producer, of which one thread issues bulk tensor copies
(tensor maps as arguments, runtime.tensormap: the unit swizzles and zero-fills past the edges) of
every slice of every tile the block owns, as far ahead as the stages allow; the warpgroups
multiply, keeping one wgmma group in flight, so the tensor cores never wait on a barrier between
slices, and while they store one tile the producer already fills the stages with the next. Each
stage has a ``full`` mbarrier (the copies' bytes landed) and an ``empty`` one (every consumer
thread's wgmmas reading it completed). All four layouts of the 16-bit types: an operand stored
with K contiguous ("K-major") is copied as [rows][64 K] boxes; one stored with M or N contiguous
("MN-major": A of dW = dY^T X, B of dX = dY W) as [64 K][64 M or N] boxes side by side, which wgmma
reads with its transpose flag. ``splits`` cuts the contraction into parts whose partial products
land in consecutive C matrices (split-K). With ``pingpong`` the two consumer warpgroups do not
share a tile: each takes whole tiles in turn and they hand the tensor cores to each other at named
barriers, so one stores while the other multiplies.

By cp.async (no tensor maps needed; Y = X W^T only, with the fp32 GEMM's batches): every thread
copies 16-byte chunks into the tensor-core GEMM's swizzled tiles (chunk c of row r at c ^ (r % 8)
is exactly the 128-byte swizzle, given 1024-byte aligned tiles; a tf32 row is copied as if of
16-bit units), and a fence makes them visible to the async proxy wgmma reads through.

The accumulators come out in the mma.sync m16n8 layout, so the store, bias and accumulate are the
tensor-core GEMM's; or (``tma_store``, pingpong) each warpgroup stages its tile in shared memory
and one thread writes it with TMA bulk tensor stores through C's tensor map (``StagedStore``).
``row_stats`` (the LM head's logits) also reduces each stored tile's rows to (max, sum of exp)
while they are in registers: the cross-entropy's first pass without reading the logits back
(``cross_entropy``'s ``stats_block``). ``swiglu_act`` (the gate/up forward) reads B as [W_gate;
W_up], 64 rows of each a tile, so that a lane holds gate and up of the same columns, and also
stores act = silu(gate) * up. ``swiglu_grad`` (the down projection's dX) stores not the
product but SwiGLU's backward of it, [dgate | dup] in bf16 (``StagedSwiGLU``: gate and up come
into the staging buffer by TMA, dgate and dup leave it so): the f32 gradient of SwiGLU's output is
never written nor read back. ``residual`` adds an f32 R of C's geometry (a residual stream) to the
product: with ``tma_store`` R comes into the staging buffer by TMA through its own map of C's
geometry (``StagedResidual``, the same in-place scheme as ``StagedSwiGLU``), else the threads that
store C read it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

from ..builder import Addr, KernelBuilder, Label, Reg, T
from ..exact import LOG2E_F32
from ..fastmath import exp2
from ..hw import DESCRIPTOR_SWIZZLE, MBARRIER_BYTES, SHARED_LIMIT, SWIZZLE_ATOM, SWIZZLE_ROW, MmaType
from ..reductions import tree_sum, warp_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError, Target
from ..vecio import DType, as_bf16_pair, bf16x2_f32
from .common import MAX_LOOP_BOUND, check_at_most, check_positive
from .gemm import batch_matrices, bias_at, check_residual, tile_origin
from .gemm_tc import TensorCoreGemm, _Feed, _Operand, store_accumulators
from .qkv_rope import RopeStore
from .ring import Ring, Slot
from .swiglu import swiglu_act, swiglu_grads
from .tma_pipeline import MN_CHUNK, TmaPipeline, Unit

BLOCK_K = SWIZZLE_ROW // 2  # a slice's K in 16-bit units: one swizzled row


def descriptor_bits(mn_major: bool, chunk_bytes: int = MN_CHUNK) -> int:
    """A matrix descriptor's constant part. Bits 62-63: 1 = 128-byte swizzle; 32-45: the stride
    between 8-row groups (16-byte units): of M/N rows (K-major) or of k rows (MN-major); 16-29:
    the stride between 64-element chunks of M/N, ``chunk_bytes`` (MN-major; unused by K-major, 1
    by convention)."""
    return DESCRIPTOR_SWIZZLE | ((SWIZZLE_ATOM >> 4) << 32) | ((chunk_bytes >> 4 if mn_major else 1) << 16)


def descriptor(b: KernelBuilder, addr: Reg, bits: int) -> Reg:
    """The matrix descriptor of the tile at shared ``addr`` (``descriptor_bits``' layout)."""
    return b.or_(b.cvt(T.U64, b.shr(addr, 4)), bits, T.B64)


@register
@dataclass(frozen=True)
class GemmWgmmaSpec(TensorCoreGemm, KernelSpec):
    kind: ClassVar[str] = "gemm_wgmma"
    dtype: MmaType = MmaType.BF16
    trans_a: bool = False  # A stored [K, M] (tma only)
    trans_b: bool = True   # B stored [N, K]; False: [K, N] (tma only)
    bias: bool = False
    accumulate: bool = False
    residual: bool = False  # C = R + A@B (+ bias), R f32 of C's geometry apart from C: a residual stream's add
    warpgroups: int = 2   # consumers, 64 rows each
    block_n: int = 256
    stages: int = 4
    group_m: int = 8
    tma: bool = False  # the warp-specialized persistent kernel fed by TMA (tensor maps as arguments)
    pingpong: bool = False  # tma, 2 warpgroups: each takes whole tiles in turn (else both share each tile)
    bf16_out: bool = False  # C stored in bf16, rounded to nearest even: a next kernel's bf16 operand
    row_stats: bool = False  # also each tile's (max, sum of exp(c - max)) per row: a softmax's first pass
    tma_store: bool = False  # pingpong: C leaves through shared memory by TMA stores (``c`` is its tensor map)
    split_tail: bool = False  # pingpong: the tiles past the last full wave cut along K (``tma_pipeline``)
    swiglu_grad: bool = False  # tma_store: the product is SwiGLU's output gradient; C = [dgate | dup] (bf16)
    swiglu_act: bool = False  # tma_store, bf16_out: C = [gate | up] (B = [W_gate; W_up]), and act = silu(gate) * up
    # rope_heads > 0 (pingpong, bf16): C is a fused q/k/v projection's [q | k | v] (rope_heads, rope_kv_heads
    # heads of rope_head_dim), stored as q, k and v in bf16, q and k rotated by RoPE, each row by the angles
    # of its position (rope.RopeTableSpec's table): qkv_rope
    rope_heads: int = 0
    rope_kv_heads: int = 0
    rope_head_dim: int = 0

    block_k: ClassVar[int] = BLOCK_K
    m_tiles: ClassVar[int] = 1  # per warp: 16 rows of the m64 tile ...

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups + 32 * self.tma  # with tma, a producer warp after the warpgroups

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def n_tiles(self) -> int:  # ... by every n8 column tile of block_n
        return self.block_n // 8

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
        check_at_most("group_m", self.group_m, MAX_LOOP_BOUND, "a tile-order group size")
        if self.warpgroups not in (1, 2):
            raise SpecError(f"warpgroups must be 1 or 2, got {self.warpgroups}")
        if self.block_n not in (64, 128, 256):
            raise SpecError(f"block_n must be 64, 128 or 256, got {self.block_n}")
        if self.stages < 2:
            raise SpecError("stages must be >= 2 (one slice in flight while one is multiplied)")
        if any(self.mn_major) and not self.tma:
            raise SpecError("gemm_wgmma: only the tma feed reads operands stored with M or N contiguous")
        if self.pingpong and not (self.tma and self.warpgroups == 2 and self.block_n <= 128):
            raise SpecError("gemm_wgmma pingpong: tma, 2 warpgroups, block_n <= 128 (a warpgroup holds a whole "
                            "128-row tile: block_n accumulators a thread)")
        if self.bf16_out and (self.accumulate or not self.tma):
            raise SpecError("gemm_wgmma: bf16_out needs tma and cannot accumulate (C += would round the old C "
                            "twice; the cp.async feed's batches address an f32 C)")
        if self.row_stats and (self.accumulate or self.bias or self.swiglu_act or not self.tma):
            raise SpecError("gemm_wgmma: row_stats needs tma and the plain product (no accumulate, bias or swiglu_act: "
                            "the statistics are of the C stored)")
        if self.tma_store and (not self.pingpong or self.accumulate):
            raise SpecError("gemm_wgmma: tma_store is the pingpong kernel's, storing C (no accumulate)")
        if self.swiglu_grad and (self.accumulate or self.bias or self.bf16_out or self.row_stats
                                 or not self.tma_store or self.dtype is not MmaType.BF16):
            raise SpecError("gemm_wgmma: swiglu_grad is the tma_store kernel's, on bf16 operands (gate_up is read in "
                            "bf16), storing its own bf16 C (no accumulate, bias, bf16_out or row_stats)")
        if self.swiglu_act and (not (self.tma_store and self.bf16_out) or self.bias or self.block_n != 128
                                or self.mn_major[1]):
            raise SpecError("gemm_wgmma: swiglu_act is the tma_store, bf16_out kernel's with 128-column tiles (64 of "
                            "gate, 64 of up) and B stored [N, K] (its halves' rows copied apart), no bias")
        if self.rope_heads or self.rope_kv_heads or self.rope_head_dim:
            self._validate_rope()
        check_residual(self)
        if self.residual and (self.c_dtype is not DType.F32 or self.row_stats or self.swiglu_act):
            raise SpecError("gemm_wgmma: residual adds an f32 R to an f32 C (no bf16_out, swiglu, rope or row_stats)")
        if self.split_tail and not self.pingpong:
            raise SpecError("gemm_wgmma: split_tail is the pingpong kernel's (a warpgroup holds a whole tile)")
        if any(self.mn_major) and self.dtype is MmaType.TF32:
            raise SpecError("gemm_wgmma: tf32 operands must be stored with K contiguous (A [M, K], B [N, K])")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.stages} stages need {self.dynamic_shared_bytes()} bytes of shared memory "
                            f"(max {SHARED_LIMIT})")

    def _validate_rope(self) -> None:
        for name in ("rope_heads", "rope_kv_heads", "rope_head_dim"):
            check_positive(name, getattr(self, name))
        if not (self.pingpong and self.dtype is MmaType.BF16) or self.accumulate or self.bf16_out or \
                self.tma_store or self.row_stats or self.swiglu_grad or self.swiglu_act or self.mn_major[1] or \
                self.split_tail:
            raise SpecError("gemm_wgmma: a RoPE epilogue (rope_heads) is the pingpong kernel's on bf16 operands, B "
                            "stored [N, K], storing its own bf16 q, k and v (no accumulate, bf16_out, tma_store, "
                            "row_stats or SwiGLU), its tail uncut (beside the partial sums' code ptxas spilled)")
        head_dim, block = self.rope_head_dim, self.block_n
        if head_dim % 16 or block % head_dim:
            raise SpecError(f"gemm_wgmma: rope_head_dim must be a multiple of 16 dividing block_n {block} (a head "
                            f"within a tile, its rotated pairs n8 tiles apart), got {head_dim}")
        for name in ("rope_heads", "rope_kv_heads"):
            if getattr(self, name) * head_dim % block:
                raise SpecError(f"gemm_wgmma: {name} x rope_head_dim must be a multiple of block_n {block} (a tile "
                                f"is all q, k or v), got {getattr(self, name)} x {head_dim}")

    def build(self, b: KernelBuilder) -> None:
        if self.pingpong:  # one warpgroup reads each stage
            TmaPipeline(self, b, readers=128).build(self._consume_pingpong)
        elif self.tma:
            TmaPipeline(self, b).build(self._consume)
        else:
            _CopyFed(self, b).build()

    def _consume(self, p: TmaPipeline, tid: Reg) -> None:
        """The TMA-fed consumer warpgroups, together on each tile, 64 rows each."""
        b = p.b
        warp, lane = b.shr(tid, 5), b.and_(tid, 31)
        acc = [b.reg(T.F32) for _ in range(self.block_n // 2)]
        # this warpgroup's 64 rows of A: 64 K-major rows, or the MN-major chunk of them
        rows = [(acc, b.mul(b.shr(tid, 7), 64 * SWIZZLE_ROW))]
        mainloop = _Mainloop(self, p)
        stats = b.cvta_global(b.ld_param("stats")) if self.row_stats else None
        for split, row0, col0 in p.work():
            mainloop.run(rows, p.slices)
            store(self, b, acc, p.split_c(split), p.m, p.n, row0, col0, warp, lane, stats)

    def _consume_pingpong(self, p: TmaPipeline, tid: Reg) -> None:
        """The TMA-fed consumer warpgroups taking turns: warpgroup w multiplies the block's
        tiles w, w + 2, ..., all 128 rows of each (two m64 accumulators), and the two hand the
        tensor cores to each other at named barriers (1: warpgroup 0's turn is over, 2: 1's),
        so that one stores its tile while the other multiplies."""
        b = p.b
        group, lane = b.shr(tid, 7), b.and_(tid, 31)
        warp = b.and_(b.shr(tid, 5), 3)  # within the warpgroup
        halves = [([b.reg(T.F32) for _ in range(self.block_n // 2)], h * 64 * SWIZZLE_ROW) for h in range(2)]
        mainloop = _Mainloop(self, p)
        stats = b.cvta_global(b.ld_param("stats")) if self.row_stats else None
        in_place = self.swiglu_grad or self.residual  # C made in its staging from what TMA brings there first
        staged = StagedStore(self, b, p, group, b.and_(tid, 127)) if self.tma_store and not in_place else None
        loaded = None
        if self.tma_store and in_place:
            loaded = (StagedSwiGLU if self.swiglu_grad else StagedResidual)(self, b, p, group, b.and_(tid, 127))
        rope = RopeStore(self, b, p) if self.rope_heads else None
        partials = PartialSums(self, p, group, b.and_(tid, 127)) if self.split_tail else None
        turns = b.div(b.add(b.sub(p.mine, group), 1), 2)  # tiles group, group + 2, ... below mine
        mine_wait, other_go = b.sub(2, group), b.add(group, 1)  # barrier ids: 2 or 1, 1 or 2
        with b.loop(turns, "turn") as t:
            j = b.mad(t, 2, group)
            unit = p.unit(j)
            split, row0, col0 = unit.split, unit.row0, unit.col0
            mainloop.slot.seek(b.mul(j, p.slices) if unit.pos is None else unit.pos)
            if loaded is not None:  # this tile's first 64 rows of what C is made from, while it is multiplied
                loaded.load(row0, col0, stores=None if isinstance(unit.k0, int) else b.setp("eq", unit.k0, 0))
            go = b.new_label("go")
            b.bra(go, guard=b.setp("eq", j, 0))  # the very first tile waits for no one
            b.bar_sync(mine_wait, 256)
            b.place(go)
            mainloop.run(halves, unit.count)
            done = b.new_label("handed")
            b.bra(done, guard=b.setp("ge", b.add(j, 1), p.mine))  # no next tile: no one to hand to
            b.bar_arrive(other_go, 256)
            b.place(done)
            if partials is not None:
                stored = b.new_label("stored")
                partials.settle([r for acc, _ in halves for r in acc], unit, stored)
            for h, (acc, _) in enumerate(halves):
                if loaded is not None:  # (and after the first 64 rows, the next 64 rows')
                    loaded.store(acc, b.add(row0, 64 * h), col0, warp, lane, b.add(row0, 64) if h == 0 else None)
                elif rope is not None:
                    rope.store(acc, b.add(row0, 64 * h), col0, warp, lane)
                elif staged is not None:
                    staged.store(acc, b.add(row0, 64 * h), col0, split, warp, lane)
                    if stats is not None:
                        store_row_stats(self, b, acc, stats, p.m, p.n, b.add(row0, 64 * h), col0, warp, lane)
                else:
                    store(self, b, acc, p.split_c(split), p.m, p.n, b.add(row0, 64 * h), col0, warp, lane, stats)
            if partials is not None:
                b.place(stored)
        for epilogue in (staged, loaded):
            if epilogue is not None:
                epilogue.finish()

    @classmethod
    def examples(cls) -> list["GemmWgmmaSpec"]:
        return [cls(), cls(bias=True, dtype=MmaType.F16, block_n=128), cls(accumulate=True, warpgroups=1, stages=3),
                cls(dtype=MmaType.TF32, block_n=128), cls(tma=True), cls(tma=True, dtype=MmaType.TF32, bias=True),
                cls(tma=True, trans_b=False, accumulate=True), cls(tma=True, trans_a=True, trans_b=False, block_n=128),
                cls(tma=True, trans_a=True, warpgroups=1, block_n=64, stages=6),
                cls(tma=True, pingpong=True, block_n=128, stages=6, bias=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, trans_a=True, trans_b=False),
                cls(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=True),
                cls(tma=True, block_n=128, bias=True, bf16_out=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, row_stats=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=True, tma_store=True, row_stats=True,
                    split_tail=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=True, tma_store=True),
                cls(tma=True, pingpong=True, block_n=128, stages=5, bias=True, tma_store=True),
                cls(tma=True, pingpong=True, block_n=128, stages=5, trans_a=True, trans_b=False, tma_store=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, trans_a=True, trans_b=False, split_tail=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=True, tma_store=True, split_tail=True),
                cls(tma=True, pingpong=True, block_n=128, stages=5, trans_b=False, tma_store=True, split_tail=True,
                    swiglu_grad=True),
                cls(tma=True, pingpong=True, block_n=64, stages=6, trans_b=False, tma_store=True, swiglu_grad=True),
                cls(tma=True, pingpong=True, block_n=128, stages=5, bf16_out=True, tma_store=True, swiglu_act=True),
                cls(tma=True, pingpong=True, block_n=128, stages=5, bf16_out=True, tma_store=True, swiglu_act=True,
                    split_tail=True),
                cls(tma=True, pingpong=True, block_n=128, stages=5, tma_store=True, residual=True, split_tail=True),
                cls(tma=True, pingpong=True, block_n=64, stages=6, tma_store=True, residual=True, bias=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, residual=True, bias=True),
                cls(tma=True, pingpong=True, block_n=128, stages=6, bias=True, rope_heads=14, rope_kv_heads=2,
                    rope_head_dim=64),
                cls(tma=True, pingpong=True, block_n=128, stages=6, rope_heads=4, rope_kv_heads=1, rope_head_dim=128)]


def multiply(spec: GemmWgmmaSpec, b: KernelBuilder, accs: list[tuple[list[Reg], Reg]], b_tile: Reg,
             scale_d: Reg) -> None:
    """Each acc += the slice's A rows at its shared ``a_tile`` @ the B tile at ``b_tile``: one
    committed group of BLOCK_K / 16 wgmmas an accumulator, each 16 k further on (32 bytes along
    K-major rows, 16 rows of 128 bytes down MN-major ones)."""
    b.wgmma_fence()
    a_mn, b_mn = spec.mn_major
    step = lambda mn, kk: (16 * SWIZZLE_ROW if mn else 32) * kk >> 4  # noqa: E731
    descs_a = [descriptor(b, a_tile, descriptor_bits(a_mn)) for _, a_tile in accs]
    desc_b = descriptor(b, b_tile, descriptor_bits(b_mn))
    for kk in range(BLOCK_K // 16):
        at_b = b.add(desc_b, step(b_mn, kk), T.U64)
        for (acc, _), desc_a in zip(accs, descs_a):
            b.wgmma(acc, b.add(desc_a, step(a_mn, kk), T.U64), at_b, spec.dtype.value, spec.block_n, scale_d,
                    spec.mn_major)
    b.wgmma_commit()


def store(spec: GemmWgmmaSpec, b: KernelBuilder, acc: list[Reg], c_ptr: Reg, m: Reg, n: Reg, row0: Reg, col0: Reg,
          warp: Reg, lane: Reg, stats: Reg | None = None) -> None:
    """The accumulators of consumer warp ``warp`` (16 rows of the block tile each) into C, and
    (``stats``) their rows' statistics."""
    tiles = [[acc[4 * j:4 * j + 4] for j in range(spec.n_tiles)]]  # m16n8 tiles of this warp's 16 rows
    store_accumulators(b, spec, tiles, c_ptr, m, n, row0, col0, warp, b.mov(0, T.U32), lane)
    if stats is not None:
        store_row_stats(spec, b, acc, stats, m, n, row0, col0, warp, lane)


def store_row_stats(spec: GemmWgmmaSpec, b: KernelBuilder, acc: list[Reg], stats: Reg, m: Reg, n: Reg,
                    row0: Reg, col0: Reg, warp: Reg, lane: Reg) -> None:
    """For each of the warp's 16 rows of the tile: (max, sum of e^(c - max)) over its columns below
    n, as an f32 pair at stats[col0 / block_n][row] ([column tiles][m] pairs), of the values just
    stored (the accumulators, which the next tile overwrites: rounded to bf16 as a ``bf16_out`` C
    holds them and masked, in place). A row's block_n columns sit in the 4 lanes of a quad, 2 of
    each n8 tile a lane; e^(c - max) as 2^(c log2 e - max log2 e), one fma (the cross-entropy's own
    pass rounds (c - max) first: the sums agree within f32 rounding, not bit for bit)."""
    tiles = [acc[4 * j:4 * j + 4] for j in range(spec.n_tiles)]
    if spec.bf16_out:  # a lane's pairs are adjacent columns of a row, as stored
        for tile in tiles:
            for h in range(2):
                for r, v in zip(tile[2 * h:2 * h + 2], as_bf16_pair(b, tile[2 * h], tile[2 * h + 1])):
                    b.mov(v, out=r)
    group, quad = b.shr(lane, 2), b.and_(lane, 3)
    cols = b.add(col0, b.shl(quad, 1))
    ragged = b.new_label("whole_tile")
    b.bra(ragged, guard=b.setp("le", b.add(col0, spec.block_n), n))  # only the last column tile is cut by n
    for j, tile in enumerate(tiles):
        for e in range(2):
            out = b.setp("ge", b.add(cols, 8 * j + e), n)
            for h in range(2):
                b.mov(b.selp(float("-inf"), tile[2 * h + e], out, T.F32), out=tile[2 * h + e])
    b.place(ragged)
    column_tile = b.shr(col0, spec.block_n.bit_length() - 1)
    for h in range(2):
        mine = [tile[2 * h + e] for tile in tiles for e in range(2)]
        row_max = warp_allreduce(b, functools.reduce(b.max, mine), "max", 4)
        neg = b.neg(b.mul(row_max, LOG2E_F32))
        total = warp_allreduce(b, tree_sum(b, [exp2(b, b.fma(x, LOG2E_F32, neg)) for x in mine]), "add", 4)
        row = b.add(b.add(row0, b.mad(warp, 16, group)), 8 * h)
        at = b.add(stats, b.mul_wide(b.mad(column_tile, m, row), 8))
        b.st("global", Addr(at), [row_max, total], guard=b.and_(b.setp("lt", row, m), b.setp("eq", quad, 0)))


BOX_BYTES = 64 * SWIZZLE_ROW  # a staged box: [64 rows][128 bytes]


def staged_pair(b: KernelBuilder, j: int, size: int, pair_bytes: Reg, group: Reg) -> Reg:
    """Where a lane's pair of n8 tile ``j`` sits in its row of a staging buffer of [64 rows][128
    bytes] boxes side by side, in the 128-byte swizzle: at byte (8 j + 2 quad) * ``size`` of the
    row (``pair_bytes`` = 2 quad * size), so in box (8 j * size) / 128, 16-byte chunk ((8 j + 2
    quad) * size % 128) / 16 swizzled by the row's index mod 8 (the lane's ``group``)."""
    box, in_box = divmod(8 * j * size, SWIZZLE_ROW)  # the tile's first byte in the row
    chunk = b.xor(b.shr(b.add(pair_bytes, in_box), 4), group)
    return b.add(b.shl(chunk, 4), b.add(b.and_(pair_bytes, 15), box * BOX_BYTES))


class StagedStore:
    """C out of a pingpong warpgroup's accumulators by TMA (``tma_store``): each 64-row half of its
    tile is written into the warpgroup's shared staging buffer, in boxes of [64 rows][128 bytes]
    laid out in the 128-byte swizzle (so a warp's 8 rows land in 8 different bank groups), and one
    thread stores the boxes with bulk tensor copies through C's tensor map ([splits][m][ldc], or
    a ``swiglu_act`` C's [gate, up][m][n / 2] with act's too: the copy unit clips rows >= m and
    columns past the edge). The warpgroup's threads write the next half only
    after the copies have read the last (``bulk_wait(read=True)``, then the warpgroup's own named
    barrier, 3 + its index)."""

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder, p: TmaPipeline, group: Reg, thread: Reg):
        self.spec, self.b = spec, b
        self.size = spec.c_dtype.size
        c_bytes = 64 * spec.block_n * self.size
        self.buffer = b.add(p.staging, b.mul(group, c_bytes))
        # swiglu_act: each warpgroup's act box after both C buffers
        self.act = b.add(p.staging, b.mad(group, BOX_BYTES, 2 * c_bytes)) if spec.swiglu_act else None
        self.leader, self.barrier = b.setp("eq", thread, 0), b.add(group, 3)
        self.tensor_map = b.cvta_global(b.ld_param("tmap_c"))
        self.bias = b.cvta_global(b.ld_param("bias")) if spec.bias else None
        self.n = p.n

    def store(self, acc: list[Reg], row0: Reg, col0: Reg, split: Reg, warp: Reg, lane: Reg) -> None:
        """This warpgroup's 64 rows from ``row0`` (its warp ``warp`` holding 16 of them) of the
        tile at ``col0`` in split ``split``'s C."""
        spec, b, size = self.spec, self.b, self.size
        b.bulk_wait(0, read=True, guard=self.leader)  # the copies of the last half have read the buffer
        b.bar_sync(self.barrier, 128)
        group, quad = b.shr(lane, 2), b.and_(lane, 3)
        pair_bytes = b.mul(quad, 2 * size)
        rows = [b.add(self.buffer, b.mul(b.add(b.mad(warp, 16, group), 8 * h), SWIZZLE_ROW)) for h in range(2)]
        cols = b.add(col0, b.shl(quad, 1))
        for j in range(spec.n_tiles):
            at = staged_pair(b, j, size, pair_bytes, group)
            values = acc[4 * j:4 * j + 4]
            if self.bias is not None:
                col = b.add(cols, 8 * j)
                bias = bias_at(b, self.bias, col, b.setp("lt", col, self.n), 2)
                values = [b.add(v, bias[e % 2]) for e, v in enumerate(values)]
            for h in range(2):
                pair = values[2 * h:2 * h + 2]
                if size == 4:
                    b.st("shared", Addr(b.add(rows[h], at)), pair)
                else:
                    b.st("shared", Addr(b.add(rows[h], at)), b.cvt_bf16x2(pair[1], pair[0]), t=T.B32)
        if self.act is not None:
            self._act(acc, rows, pair_bytes, group)
        b.fence_proxy_async()  # the writes, visible to the copy unit's reads ...
        b.bar_sync(self.barrier, 128)  # ... of every thread of the warpgroup
        box_cols = SWIZZLE_ROW // size
        if self.act is None:
            for box in range(spec.block_n // box_cols):
                b.tma_store_3d(self.tensor_map, b.add(col0, box * box_cols), row0, split,
                               b.add(self.buffer, box * BOX_BYTES), guard=self.leader)
        else:  # box 0 is gate's, box 1 up's, of the columns col0 / 2..; act's of the same
            col = b.shr(col0, 1)
            for half in range(2):
                b.tma_store_3d(self.tensor_map, col, row0, half, b.add(self.buffer, half * BOX_BYTES),
                               guard=self.leader)
            b.tma_store_3d(b.cvta_global(b.ld_param("tmap_act")), col, row0, 0, self.act, guard=self.leader)
        b.bulk_commit(guard=self.leader)

    def _act(self, acc: list[Reg], rows: list[Reg], pair_bytes: Reg, group: Reg) -> None:
        """``swiglu_act``: act = silu(gate) * up of each pair, gate in n8 tile j and up in tile j +
        n_tiles / 2 of the same lane, each rounded to bf16 first as C stores it (what the SwiGLU
        kernel reads), into the warpgroup's act box: bit for bit that kernel's output."""
        b, half = self.b, self.spec.n_tiles // 2
        act = [b.add(self.act, b.sub(r, self.buffer)) for r in rows]  # the same row of the act box
        def stored(t: int, h: int) -> list[Reg]:  # the pair of tile t, row half h, as C holds it
            return as_bf16_pair(b, *acc[4 * t + 2 * h:4 * t + 2 * h + 2])

        for j in range(half):
            at = staged_pair(b, j, DType.BF16.size, pair_bytes, group)
            for h in range(2):
                out = [swiglu_act(b, g, u) for g, u in zip(stored(j, h), stored(j + half, h))]
                b.st("shared", Addr(b.add(act[h], at)), b.cvt_bf16x2(out[1], out[0]), t=T.B32)

    def finish(self) -> None:
        """The last copies complete before the block (and its shared memory) goes."""
        self.b.bulk_wait(0, guard=self.leader)


class StagedInPlace:
    """An epilogue through shared memory that makes C out of the accumulators and a matrix of C's
    geometry brought in first (``tmap_<source>``). Each warpgroup's buffer holds 64 rows of its
    tile's source, a slot a 64-column box pair of the tile ([slot][2 boxes][64 rows][128 bytes],
    128-byte swizzle), brought by TMA and counted on the slot's mbarrier: the tile's first 64 rows
    while it is multiplied, the next 64 rows' of a slot as soon as the store of the slot's first
    has read it, so that each slot's load runs under the others' work. Each thread replaces its
    pairs' source values with C's (``_make``), and one thread stores the slot through C's tensor
    map (the copy unit clips rows >= m and columns >= n). A subclass names the source, where a
    slot's boxes sit in it (``_box``) and what C is made of (``_make``)."""

    SLOT_BYTES = 2 * BOX_BYTES
    source: ClassVar[str]
    size: ClassVar[int]  # bytes of a staged element

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder, p: TmaPipeline, group: Reg, thread: Reg):
        self.spec, self.b, self.p, self.group, self.slots = spec, b, p, group, spec.block_n // 64
        self.leader = b.setp("eq", thread, 0)
        self.phase = b.mov(0, T.U32)  # every slot is loaded, and waited for, once each 64 rows
        for slot in range(self.slots):
            b.mbarrier_init(self._loaded(slot), 1, guard=self.leader)
        b.fence_mbarrier_init(guard=self.leader)
        b.bar_sync(b.add(group, 3), 128)

    # (addresses made where they are used, as PartialSums': the accumulators all but fill the registers)
    def _buffer(self) -> Reg:
        return self.b.add(self.p.staging, self.b.mul(self.group, self.slots * self.SLOT_BYTES))

    def _loaded(self, slot: int) -> Reg:  # the mbarriers after both warpgroups' buffers
        b = self.b
        return b.add(self.p.staging, b.mad(self.group, MBARRIER_BYTES * self.slots,
                                           2 * self.slots * self.SLOT_BYTES + MBARRIER_BYTES * slot))

    def _map(self, name: str) -> Reg:
        return self.b.cvta_global(self.b.ld_param(name))

    def _box(self, col0: Reg, row0: Reg, slot: int, box: int) -> tuple[Reg, Reg, Reg | int]:
        """Box ``box`` of ``slot``'s coordinates in the source's (and C's) tensor map."""
        raise NotImplementedError

    def _make(self, acc: list[Reg], at: Reg, j: int) -> None:
        """C's pair in n8 tile ``j``, from the accumulators ``acc`` of it and the source's values at
        shared ``at`` (the pair's place in the slot's first box), written over them."""
        raise NotImplementedError

    def load(self, row0: Reg, col0: Reg, stores: Reg | None = None, slots: range | None = None) -> None:
        """The source's 64 rows from ``row0`` under the tile at ``col0`` into the buffer's ``slots``
        (all), once the copies of the last store have read it (``stores``: only if the tile's unit
        stores)."""
        b = self.b
        leader = self.leader if stores is None else b.and_(self.leader, stores)
        buffer, source = self._buffer(), self._map(f"tmap_{self.source}")
        b.bulk_wait(0, read=True, guard=leader)
        for slot in range(self.slots) if slots is None else slots:
            loaded = self._loaded(slot)
            b.mbarrier_expect_tx(loaded, self.SLOT_BYTES, guard=leader)
            for box in range(2):
                b.tma_load(b.add(buffer, slot * self.SLOT_BYTES + box * BOX_BYTES), source,
                           self._box(col0, row0, slot, box), loaded, guard=leader)

    def store(self, acc: list[Reg], row0: Reg, col0: Reg, warp: Reg, lane: Reg, next_row0: Reg | None = None
              ) -> None:
        """C's 64 rows from ``row0`` (warp ``warp`` holding 16 of them) of the tile at ``col0``, its
        accumulators ``acc``, slot by slot; ``next_row0``: each slot then loads those rows' source
        (the tile's next 64)."""
        b, spec, buffer = self.b, self.spec, self._buffer()
        group, quad = b.shr(lane, 2), b.and_(lane, 3)
        pair_bytes = b.mul(quad, 2 * self.size)
        rows = [b.add(buffer, b.mul(b.add(b.mad(warp, 16, group), 8 * h), SWIZZLE_ROW)) for h in range(2)]
        tiles = spec.n_tiles // self.slots  # n8 tiles a slot
        for slot in range(self.slots):
            b.mbarrier_wait(self._loaded(slot), self.phase)
            for j in range(slot * tiles, (slot + 1) * tiles):
                at = b.add(staged_pair(b, j - slot * tiles, self.size, pair_bytes, group), slot * self.SLOT_BYTES)
                for h in range(2):
                    self._make(acc[4 * j + 2 * h:4 * j + 2 * h + 2], b.add(rows[h], at), j)
            b.fence_proxy_async()  # the writes, visible to the copy unit's reads ...
            b.bar_sync(b.add(self.group, 3), 128)  # ... of every thread of the warpgroup
            c = self._map("tmap_c")
            for box in range(2):
                b.tma_store_3d(c, *self._box(col0, row0, slot, box),
                               b.add(buffer, slot * self.SLOT_BYTES + box * BOX_BYTES), guard=self.leader)
            b.bulk_commit(guard=self.leader)
            if next_row0 is not None:
                self.load(next_row0, col0, slots=range(slot, slot + 1))
        b.xor(self.phase, 1, out=self.phase)

    def finish(self) -> None:
        """The last copies complete before the block (and its shared memory) goes."""
        self.b.bulk_wait(0, guard=self.leader)


class StagedSwiGLU(StagedInPlace):
    """The ``swiglu_grad`` epilogue: SwiGLU's backward of the product. A slot's boxes are 64
    columns of gate and the same of up, brought through ``tmap_gate_up`` (C's geometry, [2][m][n]:
    zeros past m and n); each thread replaces its pairs' gate and up with dgate and dup,
    ``swiglu_grads`` of them and its accumulators (the swiglu_bwd kernel's arithmetic on the f32 C
    the plain kernel would store, so bit for bit what it makes of that)."""

    source, size = "gate_up", DType.BF16.size

    def _box(self, col0: Reg, row0: Reg, slot: int, box: int) -> tuple[Reg, Reg, Reg | int]:
        return self.b.add(col0, 64 * slot), row0, box  # gate, then up

    def _make(self, acc: list[Reg], at: Reg, j: int) -> None:
        b = self.b
        gate, up = at, b.add(at, BOX_BYTES)
        g, u = (bf16x2_f32(b, b.ld("shared", T.B32, Addr(y))) for y in (gate, up))
        grads = [swiglu_grads(b, *args) for args in zip(g, u, acc)]
        for where, (first, second) in ((gate, [dg for dg, _ in grads]), (up, [du for _, du in grads])):
            b.st("shared", Addr(where), b.cvt_bf16x2(second, first), t=T.B32)


class StagedResidual(StagedInPlace):
    """The ``residual`` epilogue with ``tma_store``: C = R + the product (+ bias). A slot's boxes
    are its 64 f32 columns of R, 32 a box, brought through ``tmap_residual`` (C's geometry: zeros
    past m and n); each thread adds its accumulators (and the bias, first, as the threads' store
    does) to its pairs of R in place."""

    source, size = "residual", DType.F32.size

    def __init__(self, spec: GemmWgmmaSpec, b: KernelBuilder, p: TmaPipeline, group: Reg, thread: Reg):
        super().__init__(spec, b, p, group, thread)
        self.bias, self.n = (b.cvta_global(b.ld_param("bias")) if spec.bias else None), p.n

    def _box(self, col0: Reg, row0: Reg, slot: int, box: int) -> tuple[Reg, Reg, Reg | int]:
        return self.b.add(col0, 64 * slot + 32 * box), row0, 0

    def store(self, acc: list[Reg], row0: Reg, col0: Reg, warp: Reg, lane: Reg, next_row0: Reg | None = None
              ) -> None:
        if self.bias is not None:  # the lane's first column (its pairs' in tile j are 8 j on)
            self.cols = self.b.add(col0, self.b.shl(self.b.and_(lane, 3), 1))
        super().store(acc, row0, col0, warp, lane, next_row0)

    def _make(self, acc: list[Reg], at: Reg, j: int) -> None:
        b = self.b
        if self.bias is not None:
            col = b.add(self.cols, 8 * j)
            acc = [b.add(v, x) for v, x in zip(acc, bias_at(b, self.bias, col, b.setp("lt", col, self.n), 2))]
        r = b.ld("shared", T.F32, Addr(at), 2)
        b.st("shared", Addr(at), [b.add(v, x) for v, x in zip(acc, r)])


class PartialSums:
    """A split tail's hand-over of partial sums between blocks (``tma_pipeline``). A tail tile's
    part past 0 leaves the warpgroup's accumulators in its workspace slot, each thread its own
    16-byte vectors (a warp's stores and its reader's loads are 512 contiguous bytes), then raises
    the slot's flag (release); part 0, once each flag is up (acquire), adds parts 1, 2, ... in
    that order, so the sum is the same every launch, and lowers the flags for the next launch."""

    def __init__(self, spec: GemmWgmmaSpec, p: TmaPipeline, group: Reg, thread: Reg):
        self.spec, self.p, self.b, self.group, self.thread = spec, p, p.b, group, thread
        self.slot_bytes = spec.block_m * spec.block_n * 4

    # (the addresses are made where they are used, from the parameters: nothing held across the
    # tiles in the consumers' registers, which the accumulators all but fill)
    def _vectors(self, slot: Reg) -> Reg:
        b = self.b
        return b.add(b.add(b.cvta_global(b.ld_param("partials")), b.mul_wide(self.thread, 16)),
                     b.mul_wide(slot, self.slot_bytes))

    def _flag(self, slot: Reg) -> Addr:
        b = self.b
        return Addr(b.add(b.cvta_global(b.ld_param("flags")), b.mul_wide(slot, 4)))

    def settle(self, acc: list[Reg], unit: Unit, stored: Label) -> None:
        """Before ``unit``'s store: a whole tile goes on to it; a tail tile's part past 0 leaves its
        partial sum and jumps to ``stored``; its part 0 adds the others' first."""
        b, tail = self.b, self.p.split_tail
        leader, barrier = b.setp("eq", self.thread, 0), b.add(self.group, 3)
        store, first = b.new_label("store"), b.new_label("part_0")
        starts = b.setp("eq", unit.k0, 0)
        b.bra(store, guard=b.and_(starts, b.setp("eq", unit.count, self.p.slices), T.PRED))
        b.bra(first, guard=starts)
        slot = tail.slot(unit.tile, b.div(unit.k0, unit.count))
        at = self._vectors(slot)
        for q in range(len(acc) // 4):
            b.st("global", Addr(at, q * 128 * 16), acc[4 * q:4 * q + 4])
        b.fence_gpu()
        b.bar_sync(barrier, 128)  # every thread's partial sum written (and fenced) ...
        b.st_release(self._flag(slot), 1, guard=leader)  # ... before the flag goes up
        b.bra(stored)
        b.place(first)
        with b.loop(b.sub(tail.parts, 1), "part") as i:
            slot = tail.slot(unit.tile, b.add(i, 1))
            flag, follower, spin = self._flag(slot), b.new_label("follower"), b.new_label("spin")
            b.bra(follower, guard=~leader)
            b.place(spin)
            b.bra(spin, guard=b.setp("eq", b.ld_acquire(flag), 0))
            b.place(follower)
            b.bar_sync(barrier, 128)  # the leader saw the flag: the partial sum is there for all
            at = self._vectors(slot)
            for q in range(len(acc) // 4):
                values = b.ld("global", T.F32, Addr(at, q * 128 * 16), 4, cg=True)
                for r, v in zip(acc[4 * q:4 * q + 4], values):
                    b.add(r, v, out=r)
            b.st("global", flag, 0, t=T.U32, guard=leader)  # lowered for the next launch
        b.place(store)


class _Mainloop:
    """One tile's slices through the ring: wait for each slice, multiply it into every (acc, A
    rows' offset in the stage), keep that group in flight while the one before completes
    (wait_group 1), and release the stage before; at the end, wait for all and release the last."""

    def __init__(self, spec: GemmWgmmaSpec, p: TmaPipeline):
        b = p.b
        self.spec, self.p, self.b = spec, p, b
        self.scale_d = b.setp("ne", b.mov(1, T.U32), 0)
        self.slot = Slot(p.ring)
        self.freed = b.reg(T.U32)  # the empty barrier of the slice before

    def run(self, accs: list[tuple[list[Reg], Reg | int]], slices: Reg) -> None:
        spec, p, b = self.spec, self.p, self.b
        for acc, _ in accs:
            for r in acc:
                b.mov(0.0, out=r)
        with b.loop(slices, "slice") as i:
            at, full, empty = p.stage(self.slot)
            b.mbarrier_wait(full, self.slot.phase)
            multiply(spec, b, [(acc, b.add(at, rows)) for acc, rows in accs], b.add(at, spec.block_m * SWIZZLE_ROW),
                     self.scale_d)
            b.wgmma_wait(1)  # the slice before's wgmmas are done: its stage is free
            b.mbarrier_arrive(self.freed, guard=b.setp("ne", i, 0))
            b.mov(empty, out=self.freed)
            self.slot.advance()
        b.wgmma_wait(0)
        b.mbarrier_arrive(self.freed, guard=b.setp("ne", slices, 0))


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
        smem = b.addr_of(b.dynamic_shared("tiles", align=SWIZZLE_ATOM))
        size = spec.dtype.bytes
        ptr = dict(zip("abc", batch_matrices(b, b.special("%ctaid.y"), {"a": size, "b": size, "c": 4})))
        units = size // 2  # a tf32 row is copied as if of 16-bit units
        lda, ldb, k16 = (b.mul(x, units) if units > 1 else x for x in (b.ld_param("lda"), b.ld_param("ldb"), k))
        ops = [_Operand(spec, b, ptr["a"], lda, m, k16, row0, spec.block_m, True, tid, 0),
               _Operand(spec, b, ptr["b"], ldb, n, k16, col0, spec.block_n, True, tid, a_stage)]
        k_issue = b.mov(0, T.U32)

        acc = [b.mov(0.0, T.F32) for _ in range(spec.block_n // 2)]
        scale_d = b.setp("ne", b.mov(1, T.U32), 0)  # accumulate into acc
        feed = _Feed(b, Ring(b, spec.stages, stage, smem), ops, k_issue, BLOCK_K)
        read = feed.read
        a_rows = b.mul(b.shr(tid, 7), 64 * SWIZZLE_ROW)  # this warpgroup's 64 rows of the A tile

        feed.prime()
        with b.loop(b.div(b.add(k, spec.k_elems - 1), spec.k_elems), "ktile"):
            b.cp_async_wait(spec.stages - 2)  # the slice to read has landed (for this thread) ...
            b.fence_proxy_async()             # ... visible to the async proxy wgmma reads through ...
            b.bar_sync()                      # ... for every thread, who are all done with the oldest stage
            feed.issue()
            multiply(spec, b, [(acc, b.add(read.at, a_rows))], b.add(read.at, a_stage), scale_d)
            b.wgmma_wait(0)
            read.advance()
        b.cp_async_wait(0)
        store(spec, b, acc, ptr["c"], m, n, row0, col0, warp, lane)
