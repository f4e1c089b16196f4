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

With ``stream_k`` the first ``sk_tiles`` tiles (a runtime argument, ``stream_k_tiles`` picks it)
are not dealt out whole: their slices, tile after tile, are cut into ``%nctaid.x`` equal runs, one
a block, which each block multiplies first (then its share of the other tiles, whole). A run that
starts inside a tile ends that tile's contraction: it leaves its partial sum in the block's slot
of a workspace and raises the block's flag; the run holding the tile's first slice adds the
partial sums of the runs after it, in block order (deterministic), then stores the tile. So the
tiles that would fill a last wave badly are shared by every SM (``stream_k_units`` is the host's
reference of the schedule the kernel computes).

A slice is 128 bytes of K. A K-major operand (K contiguous) lands as one [rows][128 bytes] box; an
MN-major one as [64 K rows][64 elements] boxes side by side, MN_CHUNK apart; both in the 128-byte
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
    k0 + count - 1 (the whole contraction but where stream-K cuts a tile), which the block reaches
    after ``pos`` slices of its earlier runs (where its ring stands; None: the run's index times
    the slices, every run being whole); ``tile``: the stream-K tile index."""

    split: Reg | int
    row0: Reg
    col0: Reg
    k0: Reg | int
    count: Reg
    pos: Reg | None
    tile: Reg | None = None


def stream_k_bounds(block: int, blocks: int, total: int) -> tuple[int, int]:
    """The slices [lo, hi) of the stream-K tiles' ``total`` that ``block`` of ``blocks`` multiplies."""
    return block * total // blocks, (block + 1) * total // blocks


def stream_k_units(block: int, blocks: int, tiles: int, slices: int, sk_tiles: int) -> list[tuple[int, int, int, int]]:
    """The (tile, k0, count, pos) runs ``block`` works through, in order: the reference of the
    schedule ``StreamK`` emits. Its stream-K runs first (tiles below ``sk_tiles``, cut at its slice
    bounds), then the other tiles ``blocks`` apart, whole."""
    lo, hi = stream_k_bounds(block, blocks, sk_tiles * slices)
    units = []
    for tile in range(lo // slices, -(-hi // slices)) if hi > lo else ():
        start, end = max(lo, tile * slices), min(hi, (tile + 1) * slices)
        units.append((tile, start - tile * slices, end - start, start - lo))
    for i, tile in enumerate(range(sk_tiles + block, tiles, blocks)):
        units.append((tile, 0, slices, hi - lo + i * slices))
    return units


def stream_k_finisher(tile: int, blocks: int, slices: int, sk_tiles: int) -> tuple[int, list[int]]:
    """(the block that stores stream-K tile ``tile``, the blocks whose partial sums it adds, in order)."""
    owners = [g for g in range(blocks) if any(u[0] == tile for u in stream_k_units(g, blocks, sk_tiles, slices,
                                                                                  sk_tiles))]
    return owners[0], owners[1:]


class StreamK:
    """The stream-K schedule in the kernel: this block's runs of the first ``shared`` tiles' slices
    (``stream_k_units``), then its whole tiles; and, for a tile's first run, the blocks whose
    partial sums complete it."""

    def __init__(self, b: KernelBuilder, tiles: Reg, slices: Reg, block: Reg, blocks: Reg, shared: Reg):
        self.b, self.slices, self.block, self.blocks, self.shared = b, slices, block, blocks, shared
        self.total = b.mul(shared, slices)
        self.lo, self.hi = self.bounds(block)
        first, last = b.div(self.lo, slices), b.div(b.sub(self.hi, 1), slices)
        self.first_tile = first
        self.runs = b.selp(b.add(b.sub(last, first), 1), 0, b.setp("gt", self.hi, self.lo), T.U32)
        whole = b.sub(tiles, shared)
        self.count = b.add(self.runs, b.div(b.add(b.sub(b.max(whole, block), block), b.sub(blocks, 1)), blocks))

    def bounds(self, block: Reg) -> tuple[Reg, Reg]:
        """The slices [lo, hi) ``block`` multiplies of the shared tiles' (u32: the host keeps
        shared * slices * blocks below 2^32)."""
        b = self.b
        return b.div(b.mul(block, self.total), self.blocks), b.div(b.mul(b.add(block, 1), self.total), self.blocks)

    def unit(self, j: Reg) -> tuple[Reg, Reg, Reg, Reg]:
        """(tile, k0, count, pos) of this block's ``j``-th run."""
        b, S = self.b, self.slices
        shared_run = b.setp("lt", j, self.runs)
        tile = b.add(self.first_tile, j)
        tile_k = b.mul(tile, S)
        start = b.max(self.lo, tile_k)
        end = b.min(self.hi, b.add(tile_k, S))
        later = b.sub(j, self.runs)  # the whole tiles' index (wraps for a shared run: not selected)
        return (b.selp(tile, b.mad(later, self.blocks, b.add(self.shared, self.block)), shared_run, T.U32),
                b.selp(b.sub(start, tile_k), 0, shared_run, T.U32),
                b.selp(b.sub(end, start), S, shared_run, T.U32),
                b.selp(b.sub(start, self.lo), b.mad(later, S, b.sub(self.hi, self.lo)), shared_run, T.U32))

    def last_block(self, tile: Reg) -> Reg:
        """The block holding stream-K ``tile``'s last slice: the greatest g with lo(g) <= it."""
        b = self.b
        return b.div(b.sub(b.mul(b.mad(tile, self.slices, self.slices), self.blocks), 1), self.total)


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
        self.stream_k = None
        if getattr(spec, "stream_k", False):
            self.stream_k = StreamK(b, self.tiles, self.slices, self.first, self.stride, b.ld_param("sk_tiles"))
            self.mine = self.stream_k.count
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
        """This block's ``i``-th run (``Unit``): a whole (split, tile) pair, or with stream-K a
        run of its schedule."""
        b = self.b
        if self.stream_k is None:
            return Unit(*self.item(i), 0, self.slices, None)
        tile, k0, count, pos = self.stream_k.unit(i)
        return Unit(b.mov(0, T.U32), *tile_origin(b, self.spec, self.m, self.n, tile), k0, count, pos, tile)

    def stage(self, slot: Slot) -> tuple[Reg, Reg, Reg]:
        """(shared address, full barrier, empty barrier) of ``slot``'s stage."""
        return self.ring.address(slot), self.full.address(slot), self.empty.address(slot)

    def produce(self) -> None:
        """For each slice: wait for its stage to be free, then copy A's and B's boxes into it (a
        K-major operand's at (k, row0), an MN-major one's at (row0 + 64 j, k))."""
        spec, b = self.spec, self.b
        maps = [b.cvta_global(b.ld_param(x)) for x in ("tmap_a", "tmap_b")]
        slot = Slot(self.ring)
        with b.loop(self.mine, "tile") as i:
            unit = self.unit(i)
            split, row0, col0 = unit.split, unit.row0, unit.col0
            k_at = b.mul(split, self.k) if self.stream_k is None else b.mul(unit.k0, spec.k_elems)
            with b.loop(unit.count, "slice"):
                at, full, empty = self.stage(slot)
                b.mbarrier_wait(empty, b.xor(slot.phase, 1))  # the first trip finds every stage free
                b.mbarrier_expect_tx(full, spec.stage_bytes)
                for tensor_map, outer0, rows, offset, mn in zip(maps, (row0, col0), (spec.block_m, spec.block_n),
                                                                (0, spec.block_m * SWIZZLE_ROW), spec.mn_major):
                    if not mn:
                        b.tma_load_2d(b.add(at, offset), tensor_map, k_at, outer0, full)
                    for j in range(rows // 64 if mn else 0):
                        b.tma_load_2d(b.add(at, offset + j * MN_CHUNK), tensor_map, b.add(outer0, 64 * j), k_at,
                                      full)
                b.add(k_at, spec.k_elems, out=k_at)
                slot.advance()

    def split_c(self, split: Reg) -> Reg:
        """C's address for ``split``'s partial product (consecutive m x ldc matrices)."""
        b = self.b
        c_bytes = b.shl(b.mul_wide(self.m, b.ld_param("ldc")), 2)
        return b.add(b.cvta_global(b.ld_param("c")), b.mul(b.cvt(T.U64, split), c_bytes))
