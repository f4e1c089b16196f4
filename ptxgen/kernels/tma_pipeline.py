"""The warp-specialized persistent GEMM skeleton of the TMA-fed tensor-core GEMM (gemm_wgmma).

The block's last warp is the producer: its first thread issues TMA bulk tensor copies of every
slice of every (split, tile) pair the block owns, as far ahead as the stages allow. The warps
before it are the consumers: the spec's loop multiplies each slice as it lands and stores each
tile, while the producer is already filling the stages with the next. Each stage has two
mbarriers: ``full`` (the copies' bytes have landed: one arrival with the byte count, completed by
the copy unit) and ``empty`` (every consumer thread is done reading it). Persistent blocks walk
the (split, tile) pairs ``%nctaid.x`` apart, tiles in ``tile_origin``'s order, so the stores of
one tile overlap the copies of the next, and there is no block-wide barrier after the setup.
Consumers that read a stage through the generic proxy (ld, ldmatrix) must fence it into the async
proxy before releasing it (``fence_proxy_async``): the copies that refill it are async-proxy
writes, which the mbarrier's release and acquire do not order after generic reads.

With ``split_tail`` the tiles past the last full wave (tiles mod ``%nctaid.x``: the tail, which
would leave the other SMs idle for a whole tile's time) are cut along K into ``tail_parts`` equal
parts (a runtime argument; 1: none, ``tail_parts`` picks it), dealt out after the full waves like
tiles. Part 0 of a tail tile stores it: it adds the partial sums parts 1, 2, ... left in the
workspace, in that order (the same bits every launch). Parts 1 and up come first in the deal, so a
part 0 waits only for parts that wait for nothing (``split_tail_units`` is the host's reference
of the schedule the kernel computes). Parts of one index run at once over the tail's tiles, at the
same K, as the full waves' tiles do: they share the operands in L2 (cutting tiles along K at
staggered offsets, as stream-K does, lost that: 1.5x slower at K = 151936).

A slice is 128 bytes of K. A K-major operand (K contiguous) lands as one [rows][128 bytes] box (a
``swiglu_act`` B as two of 64 rows, gate's then up's, through a 3-D map of the two halves); an
MN-major one as [64 K rows][64 elements] boxes side by side, MN_CHUNK apart; all in the 128-byte
swizzle (16-byte chunk c of row r at c ^ (r % 8) within 1024-byte aligned atoms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..builder import KernelBuilder, Reg, T
from ..hw import MBARRIER_BYTES, SWIZZLE_ATOM, SWIZZLE_ROW
from .gemm import tile_origin
from .ring import Ring, Slot

MN_CHUNK = 64 * SWIZZLE_ROW  # an MN-major operand's [64 K][64 M or N] box: the stride between its 64-wide chunks


@dataclass(frozen=True)
class Unit:
    """One run of a block's work: the tile at (row0, col0) of split ``split``, its slices k0 to
    k0 + count - 1 (the whole contraction but for a tail tile's part), which the block reaches
    after ``pos`` slices of its earlier runs (where its ring stands; None: the run's index times
    the slices, every run being whole); ``tile``: the tile's index (``split_tail``)."""

    split: Reg | int
    row0: Reg
    col0: Reg
    k0: Reg | int
    count: Reg
    pos: Reg | None
    tile: Reg | None = None


def split_tail_units(block: int, blocks: int, tiles: int, slices: int, parts: int
                     ) -> list[tuple[int, int, int, int]]:
    """The (tile, k0, count, pos) runs ``block`` of ``blocks`` works through, in order: the
    reference of the schedule ``SplitTail`` emits. Whole tiles ``blocks`` apart below the tail;
    then the tail's (part, tile) pairs ``blocks`` apart, parts 1 and up before part 0."""
    tail, waves, length = tiles % blocks, tiles // blocks, slices // parts
    units = [(j * blocks + block, 0, slices, j * slices) for j in range(waves)]
    for i, u in enumerate(range(block, tail * parts, blocks)):
        part, t = (1 + u // tail, u % tail) if u < tail * (parts - 1) else (0, u - tail * (parts - 1))
        units.append((tiles - tail + t, part * length, length, waves * slices + i * length))
    return units


def split_tail_slots(tile: int, blocks: int, tiles: int, parts: int) -> list[int]:
    """The workspace slots (one a part past 0) of tail ``tile``'s parts 1, 2, ..., in order."""
    tail = tiles % blocks
    return [(part - 1) * tail + tile - (tiles - tail) for part in range(1, parts)]


class SplitTail:
    """The split-tail schedule in the kernel (``split_tail_units``) for this ``block`` of
    ``blocks``, and where each part's partial sum goes (``slot``)."""

    def __init__(self, b: KernelBuilder, tiles: Reg, slices: Reg, block: Reg, blocks: Reg, parts: Reg):
        self.b, self.tiles, self.slices, self.block, self.blocks, self.parts = b, tiles, slices, block, blocks, parts
        self.tail = b.rem(tiles, blocks)
        self.waves = b.div(tiles, blocks)
        self.length = b.div(slices, parts)
        self.before = b.mul(self.tail, b.sub(parts, 1))  # the (part >= 1, tile) pairs, dealt first
        self.first_tail = b.sub(tiles, self.tail)
        pairs = b.mul(self.tail, parts)
        self.count = b.add(self.waves, b.div(b.add(b.sub(b.max(pairs, block), block), b.sub(blocks, 1)), blocks))

    def unit(self, j: Reg) -> tuple[Reg, Reg, Reg, Reg]:
        """(tile, k0, count, pos) of this block's ``j``-th run."""
        b, S = self.b, self.slices
        in_tail = b.setp("ge", j, self.waves)
        i = b.sub(j, self.waves)  # the tail pair's index (wraps below the tail: not selected)
        u = b.mad(i, self.blocks, self.block)
        early = b.setp("lt", u, self.before)
        tail = b.max(self.tail, 1)  # (no tail: the quotients are not selected)
        part = b.selp(b.add(b.div(u, tail), 1), 0, early, T.U32)
        t = b.selp(b.rem(u, tail), b.sub(u, self.before), early, T.U32)
        return (b.selp(b.add(self.first_tail, t), b.mad(j, self.blocks, self.block), in_tail, T.U32),
                b.selp(b.mul(part, self.length), 0, in_tail, T.U32),
                b.selp(self.length, S, in_tail, T.U32),
                b.selp(b.mad(i, self.length, b.mul(self.waves, S)), b.mul(j, S), in_tail, T.U32))

    def slot(self, tile: Reg, part: Reg) -> Reg:
        """The workspace slot of tail ``tile``'s ``part`` (>= 1)."""
        b = self.b
        return b.mad(b.sub(part, 1), self.tail, b.sub(tile, self.first_tail))


class TmaPipeline:
    """The skeleton for ``spec`` (a TensorCoreGemm with ``tma``: block_m, block_n, k_elems,
    stage_bytes, stages, mn_major, threads, staging_bytes). ``build(consume)`` emits the setup and
    the producer, and calls ``consume(pipeline, tid)`` for the consumer warps' code; ``readers``
    consumer threads (default all) release each stage."""

    def __init__(self, spec: Any, b: KernelBuilder, readers: int | None = None):
        self.spec, self.b = spec, b
        self.consumers = spec.threads - 32
        self.readers = readers or self.consumers

    def build(self, consume: Callable[["TmaPipeline", Reg], None]) -> None:
        spec, b = self.spec, self.b
        b.launch_bounds(spec.threads, 1)  # one block an SM: every register is the consumers'
        self.m, self.n, self.k = (b.ld_param(x) for x in "mnk")
        tid = b.special("%tid.x")
        self.smem = b.addr_of(b.dynamic_shared("tiles", align=SWIZZLE_ATOM))
        # the stages, then the consumers' C staging (tma_store: whole stages keep it 1024-byte aligned,
        # as its swizzle needs), then each stage's full mbarrier, then its empty one
        self.ring = Ring(b, spec.stages, spec.stage_bytes, self.smem)
        staging = spec.staging_bytes()
        self.staging = self.ring.end() if staging else None
        barriers = b.add(self.ring.end(), staging) if staging else self.ring.end()
        self.full = Ring(b, spec.stages, MBARRIER_BYTES, barriers)
        self.empty = Ring(b, spec.stages, MBARRIER_BYTES, self.full.end())
        leader = b.setp("eq", tid, 0)
        for s in range(spec.stages):
            b.mbarrier_init(b.add(self.full.base, MBARRIER_BYTES * s), 1, guard=leader)
            b.mbarrier_init(b.add(self.empty.base, MBARRIER_BYTES * s), self.readers, guard=leader)
        b.fence_mbarrier_init(guard=leader)
        b.bar_sync()
        self.slices = b.div(b.add(self.k, spec.k_elems - 1), spec.k_elems)
        self.tiles = b.mul(b.div(b.add(self.m, spec.block_m - 1), spec.block_m),
                           b.div(b.add(self.n, spec.block_n - 1), spec.block_n))
        work = b.mul(self.tiles, b.ld_param("splits"))
        self.first, self.stride = b.special("%ctaid.x"), b.special("%nctaid.x")
        self.split_tail = None
        if spec.split_tail:
            self.split_tail = SplitTail(b, self.tiles, self.slices, self.first, self.stride, b.ld_param("tail_parts"))
            self.mine = self.split_tail.count
        else:  # (split, tile) pairs first, first + stride, ... below work
            self.mine = b.div(b.add(b.sub(b.max(work, self.first), self.first), b.sub(self.stride, 1)), self.stride)
        end, consumer = b.new_label("end"), b.new_label("consumer")
        b.bra(consumer, guard=b.setp("lt", tid, self.consumers))
        b.bra(end, guard=b.setp("ne", tid, self.consumers))  # the producer warp's first thread issues
        self.produce()
        b.bra(end)
        b.place(consumer)
        consume(self, tid)
        b.place(end)

    def work(self) -> Iterator[tuple[Reg, Reg, Reg]]:
        """Loop over this block's (split, tile) pairs; yields (split, row0, col0)."""
        with self.b.loop(self.mine, "tile") as i:
            yield self.item(i)

    def item(self, i: Reg) -> tuple[Reg, Reg, Reg]:
        """(split, row0, col0) of this block's ``i``-th (split, tile) pair."""
        b = self.b
        index = b.mad(i, self.stride, self.first)
        split = b.div(index, self.tiles)
        return (split, *tile_origin(b, self.spec, self.m, self.n, b.sub(index, b.mul(split, self.tiles))))

    def unit(self, i: Reg) -> Unit:
        """This block's ``i``-th run (``Unit``): a whole (split, tile) pair, or with a split tail
        a run of its schedule."""
        b = self.b
        if self.split_tail is None:
            return Unit(*self.item(i), 0, self.slices, None)
        tile, k0, count, pos = self.split_tail.unit(i)
        return Unit(b.mov(0, T.U32), *tile_origin(b, self.spec, self.m, self.n, tile), k0, count, pos, tile)

    def stage(self, slot: Slot) -> tuple[Reg, Reg, Reg]:
        """(shared address, full barrier, empty barrier) of ``slot``'s stage."""
        return self.ring.address(slot), self.full.address(slot), self.empty.address(slot)

    def produce(self) -> None:
        """For each slice: wait for its stage to be free, then copy A's and B's boxes into it (a
        K-major operand's at (k, row0), an MN-major one's at (row0 + 64 j, k), a paired B's at (k,
        col0 / 2, half))."""
        spec, b = self.spec, self.b
        maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
        slot = Slot(self.ring)
        with b.loop(self.mine, "tile") as i:
            unit = self.unit(i)
            split, row0, col0 = unit.split, unit.row0, unit.col0
            k_at = b.mul(split, self.k) if self.split_tail is None else b.mul(unit.k0, spec.k_elems)
            with b.loop(unit.count, "slice"):
                at, full, empty = self.stage(slot)
                b.mbarrier_wait(empty, b.xor(slot.phase, 1))  # the first trip finds every stage free
                b.mbarrier_expect_tx(full, spec.stage_bytes)
                paired = (False, spec.swiglu_act)  # B as [gate; up]: 64 rows of each
                for tensor_map, outer0, rows, offset, mn, pair in zip(maps, (row0, col0), (spec.block_m, spec.block_n),
                                                                      (0, spec.block_m * SWIZZLE_ROW), spec.mn_major,
                                                                      paired):
                    if pair:  # tile columns col0.. are gate's and up's col0 / 2..: a 3-D map, [2][n / 2][k]
                        for half in range(2):
                            b.tma_load(b.add(at, offset + half * 64 * SWIZZLE_ROW), tensor_map,
                                       (k_at, b.shr(outer0, 1), half), full)
                    elif not mn:
                        b.tma_load(b.add(at, offset), tensor_map, (k_at, outer0), full)
                    for j in range(rows // 64 if mn else 0):
                        b.tma_load(b.add(at, offset + j * MN_CHUNK), tensor_map, (b.add(outer0, 64 * j), k_at),
                                   full)
                b.add(k_at, spec.k_elems, out=k_at)
                slot.advance()

    def split_c(self, split: Reg) -> Reg:
        """C's address for ``split``'s partial product (consecutive m x ldc matrices)."""
        b = self.b
        c_bytes = b.shl(b.mul_wide(self.m, b.ld_param("ldc")), 2)
        return b.add(b.cvta_global(b.ld_param("c")), b.mul(b.cvt(T.U64, split), c_bytes))
