"""bf16 / fp16 GEMM on tensor cores, fp32 accumulate: C[M, N] (+)= op(A) @ op(B) (+ bias[N]), f32 C.

The layouts are the fp32 GEMM's (``trans_a``, ``trans_b``). A block computes a ``block_m x
block_n`` tile with ``warps_m x warps_n`` warps; each warp owns a (16 * mt) x (8 * nt) piece as
mt x nt ``mma.sync.m16n8k16`` accumulators. Operand slices of ``block_k`` travel global -> shared
with ``cp.async`` (16 bytes, zero-filled past the matrix edge) ``stages`` deep, so copies of later
slices overlap the math on this one; the stages live in dynamic shared memory (more than the 48 KB a
static array may take), each holding one slice of A then one of B. Fragments are double-buffered in
registers: step k + 1's ldmatrix loads run under step k's mmas, also across slices. Blocks walk the
C tiles in bands of ``group_m`` tile rows for L2 reuse. Shared rows are XOR-swizzled by 16-byte
chunk, so that the eight row addresses of each ``ldmatrix`` hit eight different bank groups. An
operand stored with K contiguous is read by ``ldmatrix``; one stored with M (or N) contiguous by
``ldmatrix.trans``, which hands out the same fragments from the transposed storage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, Reg, T
from ..hw import CHUNK, MBARRIER_BYTES, SHARED_LIMIT, SHARED_LINE, MmaType
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType
from .common import MAX_LOOP_BOUND, check_at_most, check_positive
from .gemm import (BATCH_PARAMS, Batch, Epilogue, batch_matrices, leading_dims, residual_arguments, split_batch,
                   tile_origin)
from .mma_tile import ELEMS, SharedTile
from .ring import Pointer, Ring

# a split tail's prices in slices of a block's time, as measured in the model's step on the H200
# (a 128 x 128 x 64 slice 0.34 us, a tile's epilogue ~1-2 us): halving the 52-tile tails of the
# K = 896 GEMMs (14 slices a tile) cost 4-7 us a launch more than it saved, so a hand-over (the
# partial sums written, fenced, flagged, waited for and read) costs ~8 us; halving those of K =
# 9728 and 151936 saved 29 us and 0.4 ms a launch. At most this many parts a tail tile, and its
# (part, tile) pairs at most TAIL_ROUNDS per block (the workspace's slots: TAIL_ROUNDS a block)
TAIL_TILE_COST = 4
TAIL_HANDOVER_COST = 24
TAIL_PARTS_MAX = 16
TAIL_ROUNDS = 2



class _Operand:
    """One operand's slices: cp.async issue into a stage, and ldmatrix addresses for fragments.

    ``base`` is the operand's byte offset inside a stage (A first, then B); a stage holds one
    slice of each, so a single rotating offset addresses both."""

    def __init__(self, spec: "GemmTCSpec", b: KernelBuilder, ptr: Reg, ld: Reg, extent: Reg,
                 k_total: Reg, outer0: Reg, outer: int, k_contig: bool, tid: Reg, base: int):
        self.b, self.k_contig, self.outer, self.bk, self.base = b, k_contig, outer, spec.block_k, base
        rows, row_elems = (outer, spec.block_k) if k_contig else (spec.block_k, outer)
        self.tile = SharedTile(b, row_elems, k_contig, base)
        self.row_bytes, self.chunks = self.tile.row_bytes, self.tile.chunks
        # the block's threads copy pass_rows whole rows per pass (validate: a multiple of 8, so a
        # pass moves a thread's chunk by whole swizzle periods: compile-time shared offsets)
        self.pass_rows = spec.threads // self.chunks
        self.passes = rows // self.pass_rows
        self.ptr, self.k_total, self.extent = ptr, k_total, extent
        row, chunk = b.div(tid, self.chunks), b.rem(tid, self.chunks)
        self.outer_at, self.k_off = (b.add(outer0, row), b.mul(chunk, ELEMS)) if k_contig else \
            (b.add(outer0, b.mul(chunk, ELEMS)), row)
        r, c = (self.outer_at, self.k_off) if k_contig else (self.k_off, self.outer_at)
        self.src = b.add(ptr, b.shl(b.add(b.mul_wide(r, ld), b.cvt(T.U64, c)), 1))  # pass 0 of the next slice
        self.pass_step = b.mul_wide(ld, self.pass_rows * 2)
        self.slice_step = b.mul_wide(ld, spec.block_k * 2) if not k_contig else spec.block_k * 2
        self.dst = self.tile.offset(row, chunk)
        self.outer_ok = None if k_contig else b.setp("lt", self.outer_at, extent)

    def issue(self, k0: Reg, stage: Reg) -> None:
        """cp.async this thread's chunks of the slice at k0 into ``stage`` (a shared address)."""
        b = self.b
        at = b.add(stage, self.dst)
        k_at = b.add(k0, self.k_off)
        k_ok = b.setp("lt", k_at, self.k_total) if self.k_contig else None
        src = self.src
        for i in range(self.passes):
            step = i * self.pass_rows  # rows of this pass: outer rows (K contiguous) or k rows
            if self.k_contig:
                ok = b.and_(k_ok, b.setp("lt", b.add(self.outer_at, step), self.extent))
            else:
                ok = b.and_(self.outer_ok, b.setp("lt", b.add(k_at, step), self.k_total))
            if i:
                src = b.add(src, self.pass_step)
            b.cp_async(at, b.selp(src, self.ptr, ok, T.U64), b.selp(CHUNK, 0, ok, T.U32),
                       dst_offset=self.base + step * self.row_bytes)
        b.add(self.src, self.slice_step, out=self.src)


class _Feed:
    """The cp.async side of a copy ring: ``issue()`` copies every operand's slice at ``k`` (a
    register, advanced ``step`` a slice) into the stage at ``write``, commits them as one group and
    moves on; ``read`` follows behind. ``prime()`` fills all stages but one."""

    def __init__(self, b: KernelBuilder, ring: Ring, ops: list[_Operand], k: Reg, step: int):
        self.b, self.ring, self.ops, self.k, self.step = b, ring, ops, k, step
        self.write, self.read = Pointer(ring), Pointer(ring)

    def issue(self) -> None:  # past K: zero-size copies
        for op in self.ops:
            op.issue(self.k, self.write.at)
        self.b.cp_async_commit()
        self.b.add(self.k, self.step, out=self.k)
        self.write.advance()

    def prime(self) -> None:
        for _ in range(self.ring.stages - 1):
            self.issue()


class _Fragments:
    """A warp's ldmatrix fragments of A and B for each k16 step of a slice, in two register sets
    (step kk + 1's loads run under step kk's mmas), and the mmas of a step. Which ldmatrix.x4
    (compile-time row, chunk) each fragment is, per step kk: A's matrix index bit 0 steps the rows
    (m) by 8, bit 1 the k chunk; B's (two n8 tiles per x4) bit 1 steps n by 8, bit 0 the k chunk."""

    def __init__(self, spec: "GemmTCSpec", b: KernelBuilder, tile_a: SharedTile, tile_b: SharedTile, lane: Reg,
                 warp_m: Reg, warp_n: Reg):
        self.spec, self.b, self.tiles = spec, b, (tile_a, tile_b)
        self.steps = spec.block_k // 16

        def places(tile: SharedTile, count: int) -> list[list[tuple[int, int]]]:
            return [[(t * 16, 2 * kk) if tile.k_contig else (16 * kk, 2 * t) for t in range(count)]
                    for kk in range(self.steps)]

        self.places = places(tile_a, spec.m_tiles), places(tile_b, spec.n_tiles // 2)
        chunks = lambda place: sorted({c for row in place for _, c in row})  # noqa: E731
        self.lanes = (tile_a.lane_offsets(lane, b.mul(warp_m, spec.m_tiles * 16), 0, 1, chunks(self.places[0])),
                      tile_b.lane_offsets(lane, b.mul(warp_n, spec.n_tiles * 8), 1, 0, chunks(self.places[1])))
        self.sets = [([[b.reg(T.B32) for _ in range(4)] for _ in range(spec.m_tiles)],
                      [[b.reg(T.B32) for _ in range(4)] for _ in range(spec.n_tiles // 2)]) for _ in range(2)]

    def load(self, stage: Reg, kk: int, into: int) -> None:
        """Step ``kk``'s fragments of the slice at shared ``stage`` into register set ``into``."""
        b = self.b
        for tile, lanes, place, regs in zip(self.tiles, self.lanes, self.places, self.sets[into]):
            at = {c: b.add(stage, off) for c, off in lanes.items()}
            for (row, c), out in zip(place[kk], regs):
                tile.fragment(at, row, c, out)

    def multiply(self, acc: list, kk: int) -> None:
        frags_a, pairs_b = self.sets[kk % 2]
        frags_b = [half for r in pairs_b for half in (r[0:2], r[2:4])]
        for mt in range(self.spec.m_tiles):
            for nt in range(self.spec.n_tiles):
                self.b.mma_m16n8k16(acc[mt][nt], frags_a[mt], frags_b[nt], self.spec.dtype.value)

    def carry(self) -> None:
        """Set 1 into set 0 (after an odd number of steps, the next slice's first fragments)."""
        for into, src in zip(self.sets[0], self.sets[1]):
            for regs_to, regs_from in zip(into, src):
                for x, y in zip(regs_to, regs_from):
                    self.b.mov(y, out=x)


class TensorCoreGemm:
    """What the 16-bit tensor-core GEMM specs (mma.sync and wgmma) share: parameters, launch
    shape, argument checks, and the TMA-fed persistent form (``tma``: ``tma_pipeline``), whose
    operands are tensor maps (``tma_operands``). Their blocks walk C in ``tile_origin``'s order.
    A spec provides tma, bf16_out, row_stats, tma_store, split_tail, swiglu_grad, swiglu_act,
    rope_heads, residual, block_m, block_n, k_elems (K elements a slice), stages, threads."""

    @property
    def mn_major(self) -> tuple[bool, bool]:
        """Whether A, B are stored with M, N contiguous."""
        return self.trans_a, not self.trans_b

    @property
    def stage_bytes(self) -> int:  # a slice of A then one of B
        return (self.block_m + self.block_n) * self.k_elems * self.dtype.bytes

    def staging_bytes(self) -> int:
        """Shared memory the consumers stage C in before a TMA store (``tma_store``): a 64-row
        half tile each of the two warpgroups; with ``swiglu_grad`` its gate and up (then dgate and
        dup), with ``residual`` its R (then C), and the mbarriers of its slots after both; with
        ``swiglu_act`` also act."""
        if self.swiglu_grad or (self.residual and self.tma_store):  # an mbarrier each 64-column slot
            loaded = 2 if self.swiglu_grad else 1  # C's values a column: gate and up, or R
            return 2 * (loaded * 64 * self.block_n * self.c_dtype.size + self.block_n // 64 * MBARRIER_BYTES)
        if self.swiglu_act:  # and each warpgroup's act, [64 rows][block_n / 2] bf16
            return 2 * 64 * self.block_n * (self.c_dtype.size + DType.BF16.size // 2)
        return 2 * 64 * self.block_n * self.c_dtype.size if self.tma_store else 0

    def dynamic_shared_bytes(self) -> int:
        # with tma, a stage's two mbarriers after the stages (and C's staging): static shared memory
        # would move the dynamic base off the alignment the swizzled tiles need (SWIZZLE_ATOM)
        return self.stages * (self.stage_bytes + (2 * MBARRIER_BYTES if self.tma else 0)) + self.staging_bytes()

    def params(self) -> tuple[tuple[str, T], ...]:
        if self.tma:
            ptrs = ("tmap_a", "tmap_b", self.c_param) + (("bias",) if self.bias else ()) + \
                ((self.residual_param,) if self.residual else ()) + \
                (("stats",) if self.row_stats else ()) + (("tmap_gate_up",) if self.swiglu_grad else ()) + \
                (("tmap_act",) if self.swiglu_act else ()) + (("keys", "values", "rope_table") if self.rope_heads else ())
            ptrs += ("partials", "flags") if self.split_tail else ()
            dims = ("m", "n", "k", "ldc", "splits") + (("tail_parts",) if self.split_tail else ())
            return tuple((p, T.U64) for p in ptrs) + tuple((d, T.U32) for d in dims)
        ptrs = ("a", "b", "c") + (("bias",) if self.bias else ()) + (("residual",) if self.residual else ())
        dims = ("m", "n", "k", "lda", "ldb", "ldc") + BATCH_PARAMS
        return tuple((p, T.U64) for p in ptrs) + tuple((d, T.U32) for d in dims)

    def outputs(self) -> tuple[str, ...]:
        return (self.c_param,) + (("stats",) if self.row_stats else ()) + (("keys", "values") if self.rope_heads else ()) + \
            (("tmap_act",) if self.swiglu_act else ()) + (("partials", "flags") if self.split_tail else ())

    def blocks_wait(self) -> bool:  # a cut tail's part 0 spins until the other parts' flags are up
        return self.split_tail

    def read_outputs(self) -> tuple[str, ...]:  # a cut tail's flags count its parts (reset by the last)
        return ((self.c_param,) if self.accumulate else ()) + (("flags",) if self.split_tail else ())

    @property
    def c_param(self) -> str:
        """C's parameter: ``tmap_c``, its tensor map, where the kernel stores C by TMA (``tma_store``;
        named apart, so a raw C pointer bound by name is refused when the plan is built); ``q``
        where a RoPE epilogue stores q, k and v (``rope_heads``); else ``c``."""
        return "tmap_c" if self.tma_store else "q" if self.rope_heads else "c"

    @property
    def residual_param(self) -> str:
        """A ``residual`` spec's R: ``tmap_residual``, its tensor map (of C's geometry), where C leaves
        by TMA (R comes into C's staging the same way); else ``residual``."""
        return "tmap_residual" if self.tma_store else "residual"

    def tiles(self, m: int, n: int) -> int:
        """C's block_m x block_n tiles."""
        return -(-m // self.block_m) * -(-n // self.block_n)

    def slices(self, k: int) -> int:
        """The K slices of a ``k``-long contraction."""
        return -(-k // self.k_elems)

    def tail_parts(self, m: int, n: int, k: int, blocks: int) -> int:
        """The parts a ``split_tail`` kernel of ``blocks`` blocks cuts each tile past its last full
        wave into (1: none), priced in slices of a block's time: the tail, whole, takes a tile's
        slices and an epilogue (TAIL_TILE_COST); in P parts, its (part, tile) pairs' rounds of
        slices / P and an epilogue each, and P - 1 hand-overs of partial sums (TAIL_HANDOVER_COST).
        P divides the slices (equal parts), at most TAIL_PARTS_MAX, the pairs at most TAIL_ROUNDS
        a block (the workspace's slots)."""
        tiles, slices = self.tiles(m, n), self.slices(k)
        tail = tiles % blocks
        if not self.split_tail or not tail or not slices:
            return 1

        def cost(parts: int) -> int:
            rounds = -(-tail * parts // blocks)
            return rounds * (slices // parts + TAIL_TILE_COST) + (parts - 1) * TAIL_HANDOVER_COST

        options = [p for p in range(1, min(TAIL_PARTS_MAX, slices) + 1)
                   if slices % p == 0 and tail * p <= TAIL_ROUNDS * blocks]
        return min(options, key=lambda p: (cost(p), p))

    def tail_workspace(self, blocks: int) -> tuple[int, int]:
        """Bytes of (partial sums, flags) a ``split_tail`` kernel of ``blocks`` blocks needs: a
        tile of f32 and a u32 flag for each of TAIL_ROUNDS slots a block; the flags zero before
        the first launch (each launch leaves them so)."""
        slots = TAIL_ROUNDS * blocks
        return slots * self.block_m * self.block_n * 4, slots * 4

    @property
    def c_dtype(self) -> DType:
        """C's element type: f32, or bf16 where the spec stores it so (``bf16_out``, ``swiglu_grad``)."""
        return DType.BF16 if self.bf16_out or self.swiglu_grad or self.rope_heads else DType.F32

    def split_k_multiple(self) -> int:
        """What a split-K part's contraction length must be a multiple of: with tma, whole slices
        (a part's last one would read the next part's K: TMA zero-fills only past the matrix)."""
        return self.k_elems if self.tma else 1

    def launch_dims(self, m: int, n: int, batches: int = 1, *, resident: int | None = None
                    ) -> tuple[tuple[int, int], int]:
        """(grid, block). A tma kernel's blocks persist, each walking (split, tile) pairs
        ``%nctaid.x`` apart: at most ``resident`` of them (``Kernel.resident_blocks``)."""
        tiles = self.tiles(m, n)
        if self.tma:  # with split_tail every block resident: the tail's parts go to all
            return (resident if self.split_tail and resident else min(tiles * batches, resident or tiles * batches),
                    1), self.threads
        return (tiles, batches), self.threads

    def arguments(self, a: int, b: int, c: int, m: int, n: int, k: int, *, bias: int | None = None,
                  lda: int | None = None, ldb: int | None = None, ldc: int | None = None,
                  batch: Batch | None = None, splits: int = 1, stats: int | None = None,
                  partials: int | None = None, flags: int | None = None, tail_parts: int = 1,
                  blocks: int | None = None, gate_up: int | None = None, act: int | None = None,
                  rope: tuple[int, int, int] | None = None, residual: int | None = None) -> tuple[int, ...]:
        """The kernel's arguments in order, after refusing shapes its 16-byte copies cannot serve:
        each operand's contiguous extent, leading dimension and batch strides a multiple of 16
        bytes (8 16-bit or 4 tf32 elements); N, ldc and C's batch strides even. Batches are the
        fp32 GEMM's (``Batch``), ``splits`` its split-K (``split_batch``); a part's K must be a
        multiple of ``split_k_multiple()``. With ``tma``, ``a`` and ``b`` are the device addresses
        of the operands' tensor maps, which carry their layout: no lda, ldb or batches; with
        ``tma_store``, ``c`` is C's (``runtime.tensormap.gemm_c_tensor_map``). ``stats``:
        where a ``row_stats`` spec writes its per-tile row statistics (and only such a spec).
        ``tail_parts``: the parts a ``split_tail`` spec launched as ``blocks`` blocks (the grid's
        x: the kernel takes its tail from %nctaid.x) cuts its tail tiles into (``tail_parts``),
        through the workspace ``partials``, ``flags`` (``tail_workspace``), which it touches only
        then. Its blocks wait on each other then: all must be resident at once (``launch_dims``
        with the GPU's resident blocks), so no other launch whose blocks wait may run beside it
        (``blocks_wait``; a launch that waits for nothing only delays it). ``gate_up``: a ``swiglu_grad``
        spec's (and only such a spec's) bf16 [m][ldc] gate and up (up n columns after gate), by
        its tensor map of C's geometry (``runtime.tensormap.gemm_c_tensor_map``): C ([m][ldc],
        ldc 2 n by default) takes dgate's and dup's places. ``act``: a ``swiglu_act`` spec's (and
        only such a spec's) act = silu(gate) * up, [m][n / 2] bf16, by its tensor map (the same
        function's, ``act=True``); its B is [gate; up], [2][n / 2][k], read through a 3-D map
        (``gemm_tensor_maps``), and C [m][ldc] takes gate and up side by side, n / 2 apart.
        ``rope``: a ``rope_heads`` spec's (and only such a spec's) (keys, values, rope_table): ``c``
        is q, [m][rope_heads x rope_head_dim] bf16, k and v [m][rope_kv_heads x rope_head_dim]
        bf16, rope_table [m][rope_head_dim / 2] (cos, sin) f32 pairs (``rope.RopeTableSpec``'s);
        n is the three widths' sum. ``residual``: a ``residual`` spec's R (``residual_arguments``;
        with ``tma_store`` its tensor map, ``gemm_c_tensor_map``'s)."""
        name = self.kind
        if (rope is not None) != bool(self.rope_heads):
            raise ValueError(f"{name}: rope {'needs' if rope is not None else 'is required by'} rope_heads")
        if rope is not None and (n != (self.rope_heads + 2 * self.rope_kv_heads) * self.rope_head_dim or splits != 1):
            raise ValueError(f"{name}: a RoPE epilogue's N is q's, k's and v's widths, "
                             f"{(self.rope_heads + 2 * self.rope_kv_heads) * self.rope_head_dim}, of one product: "
                             f"got N={n}, splits={splits}")
        if (gate_up is not None) != self.swiglu_grad:
            raise ValueError(f"{name}: gate_up {'needs' if gate_up is not None else 'is required by'} swiglu_grad")
        if (act is not None) != self.swiglu_act:
            raise ValueError(f"{name}: act {'needs' if act is not None else 'is required by'} swiglu_act")
        if self.swiglu_act and (n % 16 or splits != 1):
            raise ValueError(f"{name}: swiglu_act's C is [gate | up] of one product, n / 2 columns each, 16-byte "
                             f"aligned: N={n} must be a multiple of 16 and splits={splits} 1")
        if self.swiglu_grad and ldc is None:
            ldc = 2 * n
        if self.swiglu_grad and (ldc < 2 * n or n % 8 or ldc % 8):
            raise ValueError(f"{name}: a swiglu_grad C holds dgate and dup side by side, n apart, each half's rows "
                             f"16-byte aligned for its tensor maps: N={n} and ldc={ldc} must be multiples of 8, "
                             "ldc >= 2 N")
        if (partials is not None or flags is not None) and not self.split_tail:
            raise ValueError(f"{name}: partials and flags are a split_tail spec's")
        if self.split_tail and splits > 1:  # its schedule deals out the tiles of one product
            raise ValueError(f"{name}: a split_tail spec cuts its own tail along K; no split-K (splits={splits})")
        if tail_parts != 1:
            slices = self.slices(k)
            tiles = self.tiles(m, n)
            if not self.split_tail or blocks is None or partials is None or flags is None:
                raise ValueError(f"{name}: tail_parts={tail_parts} needs split_tail, the blocks launched and the "
                                 "workspace (partials and flags)")
            if not 1 < tail_parts <= TAIL_PARTS_MAX or slices % tail_parts or \
                    tiles % blocks * tail_parts > TAIL_ROUNDS * blocks:
                raise ValueError(f"{name}: tail_parts={tail_parts} must divide the {slices} slices, be at most "
                                 f"{TAIL_PARTS_MAX}, and deal the {tiles % blocks} tail tiles' parts at most "
                                 f"{TAIL_ROUNDS} to each of {blocks} blocks")
        if (stats is not None) != self.row_stats:
            raise ValueError(f"{name}: stats {'needs' if stats is not None else 'is required by'} row_stats")
        if stats is not None and splits > 1:
            raise ValueError(f"{name}: row statistics are of whole products; no split-K")
        if self.tma and (batch is not None or lda is not None or ldb is not None):
            raise ValueError(f"{name} with tma: the tensor maps carry the operands' layout; no batch, lda, ldb")
        lda, ldb, ldc = leading_dims(self, m, n, k, lda, ldb, ldc, bias, residual)
        residual_arguments(self, c, residual, m, ldc, splits, batch)
        if splits > 1 and self.c_dtype is not DType.F32:
            raise ValueError(f"{name}: split-K partial sums are f32; this spec stores C in {self.c_dtype.value}")
        if splits > 1 and k % self.split_k_multiple():
            raise ValueError(f"{name}: a split part's K={k} is not a multiple of {self.split_k_multiple()}")
        batch = split_batch(self, m, k, lda, ldb, ldc, splits, batch)
        strides = batch.strides()
        eight = {"M (A transposed)": m if self.trans_a else None,
                 "K": k if not self.trans_a or self.trans_b else None,
                 "N (B not transposed)": None if self.trans_b else n, "lda": lda, "ldb": ldb,
                 **{f"batch stride {i}": v for i, v in enumerate(strides[:6]) if i % 3 != 2}}
        chunk = CHUNK // self.dtype.bytes  # elements per 16-byte copy
        for what, value in eight.items():
            if value is not None and value % chunk:
                raise ValueError(f"{name}: {what}={value} is not a multiple of {chunk}")
        if n % 2 or ldc % 2 or strides[6] % 2 or strides[7] % 2:
            raise ValueError(f"{name}: N={n}, ldc={ldc} and C's batch strides must be even (C is stored in pairs)")
        if self.tma_store and (ldc * self.c_dtype.size) % 16:
            raise ValueError(f"{name}: a TMA store's C rows must be 16-byte aligned: ldc={ldc} x {self.c_dtype.size} "
                             "bytes")
        ptrs = (a, b, c) + ((bias,) if self.bias else ()) + ((residual,) if residual is not None else ()) + \
            ((stats,) if stats is not None else ()) + \
            ((gate_up,) if gate_up is not None else ()) + ((act,) if act is not None else ()) + \
            (tuple(rope) if rope is not None else ())
        if self.tma:
            if self.split_tail:
                return (*ptrs, partials or 0, flags or 0, m, n, k, ldc, splits, tail_parts)
            return (*ptrs, m, n, k, ldc, splits)
        return (*ptrs, m, n, k, lda, ldb, ldc, batch.inner, *strides)

    def tma_operands(self, m: int, n: int, k: int, lda: int | None = None, ldb: int | None = None
                     ) -> tuple[tuple[int, int, int, tuple[int, int]], ...]:
        """(rows, columns, row stride, box) of A's and B's tensor maps (``runtime.tensormap``): the
        matrices as stored ([M or N, K] K-major, else [K, M or N]; ``k`` all of K, every split's),
        and the (rows, columns) box one copy brings."""
        out = []
        for outer, block, mn, ld in zip((m, n), (self.block_m, self.block_n), self.mn_major, (lda, ldb)):
            rows, cols, box = (k, outer, (self.k_elems, 64)) if mn else (outer, k, (block, self.k_elems))
            out.append((rows, cols, ld if ld is not None else cols, box))
        return tuple(out)


def store_accumulators(b: KernelBuilder, spec: "GemmTCSpec", acc, c_ptr: Reg, m: Reg, n: Reg, row0: Reg, col0: Reg,
                       warp_m: Reg, warp_n: Reg, lane: Reg) -> None:
    """A warp's m_tiles x n_tiles m16n8 accumulator tiles into C through the shared epilogue:
    accumulator q of tile (mt, nt) is C[row + 8 * (q >> 1), col + (q & 1)] with row = group,
    col = 2 * (lane % 4), stored in pairs. Column by column, so that only one column's bias is
    live at a time (a wgmma warp's 32 columns of bias would crowd out its accumulators)."""
    out = Epilogue(b, c_ptr, m, n, spec.bias, spec.accumulate, spec.c_dtype, spec.residual)
    group, pair = b.shr(lane, 2), b.shl(b.and_(lane, 3), 1)
    first = b.add(row0, b.add(b.mul(warp_m, spec.m_tiles * 16), group))
    cols = b.add(col0, b.add(b.mul(warp_n, spec.n_tiles * 8), pair))
    rows = [(mt, half, out.row(b.add(first, mt * 16 + 8 * half))) for mt in range(spec.m_tiles) for half in range(2)]
    for nt in range(spec.n_tiles):
        col = out.column(b.add(cols, nt * 8), 2)
        for mt, half, row in rows:
            out.store(row, col, acc[mt][nt][2 * half:2 * half + 2])


@register
@dataclass(frozen=True)
class GemmTCSpec(TensorCoreGemm, KernelSpec):
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
    stages: int = 4
    group_m: int = 8
    min_blocks: int = 1  # blocks per SM the registers must allow (ptxas .minnctapersm)

    # Not TMA-fed: tried, a producer warp beside 8 mma.sync warps leaves 168 registers a thread
    # (the register file counts a block's warps in fours), so 64 accumulators a warp, and the proxy
    # fence its ldmatrix reads need before each stage is refilled: 390-430 TFLOP/s against this
    # kernel's 450-460 at 4096^3 and 8192^3.
    tma: ClassVar[bool] = False
    bf16_out: ClassVar[bool] = False  # C is f32 (a bf16 C is the wgmma kernel's)
    row_stats: ClassVar[bool] = False  # the wgmma kernel's
    tma_store: ClassVar[bool] = False  # the wgmma kernel's
    split_tail: ClassVar[bool] = False  # the wgmma kernel's
    swiglu_grad: ClassVar[bool] = False  # the wgmma kernel's
    swiglu_act: ClassVar[bool] = False  # the wgmma kernel's
    rope_heads: ClassVar[int] = 0  # the wgmma kernel's
    residual: ClassVar[bool] = False  # the wgmma kernel's (and the fp32 one's)

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def k_elems(self) -> int:
        return self.block_k

    @property
    def m_tiles(self) -> int:  # m16 tiles per warp
        return self.block_m // self.warps_m // 16

    @property
    def n_tiles(self) -> int:  # n8 tiles per warp
        return self.block_n // self.warps_n // 8

    def validate(self) -> None:
        for name in ("block_m", "block_n", "block_k", "warps_m", "warps_n", "stages", "group_m", "min_blocks"):
            check_positive(name, getattr(self, name))
        check_at_most("group_m", self.group_m, MAX_LOOP_BOUND, "a tile-order group size")
        if self.min_blocks * 32 * self.warps_m * self.warps_n > 2048:  # past an SM's threads ptxas ignores it
            raise SpecError(f"min_blocks {self.min_blocks} of {32 * self.warps_m * self.warps_n} threads exceeds "
                            "an SM's 2048 threads")
        if self.dtype is MmaType.TF32:
            raise SpecError("gemm_tc (mma.sync m16n8k16) takes bf16 or f16; tf32 is gemm_wgmma's")
        if self.block_k not in (16, 32, 64):  # a power-of-two count of 16-byte chunks per row
            raise SpecError(f"block_k must be 16, 32 or 64, got {self.block_k}")
        if self.block_m % (16 * self.warps_m) or self.block_n % (16 * self.warps_n):
            raise SpecError("each warp needs a whole number of 16-row and 16-column (two n8) tiles")
        for tiles, what in ((self.m_tiles, "m16"), (self.n_tiles // 2, "n16")):
            if tiles & (tiles - 1):
                raise SpecError(f"{what} tiles per warp must be a power of two, got {tiles}")
        if not 1 <= self.warps_m * self.warps_n <= 32:
            raise SpecError("1 to 32 warps per block")
        for outer in (self.block_m, self.block_n):
            if outer & (outer - 1):
                raise SpecError(f"tile sides must be powers of two, got {outer}")
            for chunks, rows in ((self.block_k // ELEMS, outer), (outer // ELEMS, self.block_k)):
                if self.threads % chunks or rows % (self.threads // chunks) or (self.threads // chunks) % 8:
                    raise SpecError(f"{self.threads} threads do not copy a {outer}x{self.block_k} slice in "
                                    f"passes of whole rows, a multiple of 8 each")
        if self.stages < 2:
            raise SpecError("stages must be >= 2 (one slice in flight while one is multiplied)")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.stages} stages need {self.dynamic_shared_bytes()} bytes of shared memory "
                            f"(max {SHARED_LIMIT})")

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads, self.min_blocks)
        m, n, k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        lane, warp = b.and_(tid, 31), b.shr(tid, 5)
        warp_m, warp_n = b.rem(warp, self.warps_m), b.div(warp, self.warps_m)
        row0, col0 = tile_origin(b, self, m, n)
        a_stage = self.block_m * self.block_k * 2
        stage = a_stage + self.block_n * self.block_k * 2
        smem = b.addr_of(b.dynamic_shared("tiles", align=SHARED_LINE))
        ptr = dict(zip("abc", batch_matrices(b, b.special("%ctaid.y"), {"a": 2, "b": 2, "c": 4})))
        op_a = _Operand(self, b, ptr["a"], b.ld_param("lda"), m, k, row0, self.block_m,
                        not self.trans_a, tid, 0)
        op_b = _Operand(self, b, ptr["b"], b.ld_param("ldb"), n, k, col0, self.block_n,
                        self.trans_b, tid, a_stage)
        frags = _Fragments(self, b, op_a.tile, op_b.tile, lane, warp_m, warp_n)

        acc = [[[b.mov(0.0, T.F32) for _ in range(4)] for _ in range(self.n_tiles)] for _ in range(self.m_tiles)]
        k_issue = b.mov(0, T.U32)
        feed = _Feed(b, Ring(b, self.stages, stage, smem), [op_a, op_b], k_issue, self.block_k)
        read = feed.read

        def landed() -> None:  # the slice at ``read`` is in shared memory, for every thread
            b.cp_async_wait(self.stages - 2)
            b.bar_sync()

        feed.prime()
        landed()
        frags.load(read.at, 0, 0)
        last = frags.steps - 1
        with b.loop(b.div(b.add(k, self.block_k - 1), self.block_k), "ktile"):
            for kk in range(frags.steps):
                if kk == 0:     # into the stage every warp finished reading before the last barrier
                    feed.issue()
                if kk == last:  # the next slice: its first fragments load under this step's mmas
                    landed()
                    read.advance()
                frags.load(read.at, (kk + 1) % frags.steps, (kk + 1) % 2)
                frags.multiply(acc, kk)
            if frags.steps % 2:  # an odd step count leaves the next slice's first fragments in set 1
                frags.carry()
        b.cp_async_wait(0)
        store_accumulators(b, self, acc, ptr["c"], m, n, row0, col0, warp_m, warp_n, lane)

    @classmethod
    def examples(cls) -> list["GemmTCSpec"]:
        return [cls(), cls(trans_a=False, trans_b=False), cls(trans_a=True, trans_b=False, accumulate=True),
                cls(bias=True, dtype=MmaType.F16), cls(block_m=64, block_n=64, warps_m=2, warps_n=2, block_k=64),
                cls(trans_a=True, trans_b=True, block_k=16, stages=4),
                cls(block_n=256, trans_b=False, group_m=4)]
