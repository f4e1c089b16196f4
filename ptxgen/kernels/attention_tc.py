"""Causal GQA attention on tensor cores (FlashAttention-2 style): bf16/f16 in, fp32 math.

The tensors are the fp32 attention's (``attention.py``): q, k, v, o, do [batch, seq, heads,
head_dim] in ``dtype``; lse and delta [batch, heads, seq] f32 (lse in natural log); the gradients
dq, dk, dv are written in f32. The scale 1/sqrt(head_dim) is baked in.

A block takes ``16 * warps`` rows (queries, or for dK/dV keys: ``16 * warps / teams``), a warp 16
of them, and walks the other side in tiles of ``tile`` rows, which travel global -> shared by
cp.async, double-buffered (the next tile is in flight under this one's math). The block's own rows are read into mma
fragments once. Every product runs on ``mma.sync.m16n8k16`` with fp32 accumulators, and a product
by P (or dS) takes it straight from the accumulators of the product that made it: an m16n8
accumulator tile holds half an m16k16 A fragment, so two of them repacked to 16-bit pairs are one.
Masking (causal, past the sequence) is applied only on the tiles that need it.

* Forward: S = Q K^T, online softmax in base 2 on the S accumulators (a row's values sit in the 4
  lanes of a quad), O += P V; writes O and the log-sum-exp. Queries at q_start.. over kv_len keys
  (a KV cache) as the fp32 forward.
* Backward dQ (run first): delta = rowsum(dO * O) (written for dK/dV), then per key tile S and P
  again, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
* Backward dK/dV: a block owns keys and loops over the query heads of its group and every query
  tile at or after its keys (with ``teams``, each team of its warps every teams-th tile): S^T =
  K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q; the group's sum (and the teams', in team
  order) needs no atomics, so the result is deterministic.
Blocks with the most causal work start first, across the whole grid.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

from ..builder import Addr, Guard, KernelBuilder, Reg, T
from ..exact import LN2_F32, LOG2E_F32
from ..fastmath import exp2, reciprocal
from ..hw import CHUNK, SHARED_LIMIT, SHARED_LINE, MmaType
from ..reductions import tree_sum, warp_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError
from .attention import AttentionGrid
from .common import check_positive
from .mma_tile import ELEMS, SharedTile
from .ring import Pair, Ring
from .rope import rotate as rotate_pair
from .rope import table_angles


Tiles = list[list[Reg]]  # accumulator tiles: [n8 tile][4 f32]


class _Flash:
    """What the three kernels share: indices, cp.async row copies into swizzled tiles, and the two
    mma products (rows x tile^T, and accumulators x tile) over a head_dim-wide tile."""

    def __init__(self, spec: "_FlashBase", b: KernelBuilder, batch: Reg, align: int = SHARED_LINE):
        self.b, self.spec, self.d = b, spec, spec.head_dim
        self.block_tid = b.special("%tid.x")
        # a team's threads copy, multiply and meet at barriers on their own (team t at barrier t + 1)
        teams = spec.threads // spec.team_threads
        self.tid = b.rem(self.block_tid, spec.team_threads) if teams > 1 else self.block_tid
        self.barrier = (b.add(self.team, 1), spec.team_threads) if teams > 1 else (0, None)
        self.lane, self.warp = b.and_(self.tid, 31), b.shr(self.tid, 5)
        self.group, self.quad = b.shr(self.lane, 2), b.and_(self.lane, 3)  # accumulator row, column pair
        self.batch = batch
        self.smem = b.addr_of(b.dynamic_shared("tiles", align=align))
        self.rows, self.cols = SharedTile(b, self.d, k_contig=True), SharedTile(b, self.d, k_contig=False)
        chunks = self.d // ELEMS
        self.pass_rows = spec.team_threads // chunks  # rows one pass of the team's 16-byte copies covers
        self.my_row, my_chunk = b.div(self.tid, chunks), b.rem(self.tid, chunks)
        self.my_dst = b.add(self.smem, self.rows.offset(self.my_row, my_chunk))  # one swizzle for every pass
        self.my_col = b.mul_wide(my_chunk, CHUNK)
        self.steps_d = range(self.d // 16)
        chunks_d = [2 * kk for kk in self.steps_d]
        self.a_lane = self.rows.lane_offsets(self.lane, b.mul(self.warp, 16), 0, 1, chunks_d)
        self.b_lane = self.rows.lane_offsets(self.lane, b.mov(0, T.U32), 1, 0, chunks_d)
        self.t_lane = self.cols.lane_offsets(self.lane, b.mov(0, T.U32), 1, 0, chunks_d)
        self.mma = functools.partial(b.mma_m16n8k16, dtype=spec.dtype.value)
        self.to = T(spec.dtype.value)

    @functools.cached_property
    def team(self) -> Reg:
        """This thread's team (0 when the block is one)."""
        return self.b.div(self.block_tid, self.spec.team_threads)

    def row_ptr(self, name: str, per_batch: Reg, row0: Reg, heads: int, head: Reg) -> Reg:
        """Address of row ``row0`` of ``head`` in this block's batch of a [batch, rows, heads, d] tensor."""
        b = self.b
        index = b.mad(b.mad(self.batch, per_batch, row0), heads, head)
        return b.add(b.cvta_global(b.ld_param(name)), b.mul_wide(index, self.d * 2))

    def stat_ptr(self, name: str, heads: int, head: Reg, seq: Reg, row0: Reg) -> Reg:
        """Address of element row0 of a [batch, heads, seq] f32 statistic."""
        b = self.b
        return b.add(b.cvta_global(b.ld_param(name)), b.mul_wide(b.mad(b.mad(self.batch, heads, head), seq, row0), 4))

    def copy_rows(self, at: Reg, heads: int, dst: Reg, row0: Reg, limit: Reg, rows: int,
                  mine: Reg | None = None, row_bytes: int | None = None) -> None:
        """Rows row0.. of a tensor with ``heads`` heads (``at``: row row0 of the head) into the tile at
        shared address ``dst``, zeros from row ``limit`` on; cp.async, not committed. The tile is a
        ``rows`` tile, row-major and swizzled, unless ``mine`` (this thread's first chunk's shared
        address) and ``row_bytes`` (between a pass's rows) say where another layout puts them."""
        b, stride = self.b, heads * self.d * 2
        src = b.add(at, b.add(b.mul_wide(self.my_row, stride), self.my_col))
        base = mine if mine is not None else b.add(self.my_dst, b.sub(dst, self.smem))
        first = b.add(row0, self.my_row)
        for i in range(rows // self.pass_rows):
            ok = b.setp("lt", b.add(first, i * self.pass_rows), limit)
            b.cp_async(base, b.selp(src, at, ok, T.U64), b.selp(CHUNK, 0, ok, T.U32),
                       dst_offset=i * self.pass_rows * (row_bytes or self.d * 2))
            if i + 1 < rows // self.pass_rows:
                src = b.add(src, self.pass_rows * stride)

    def kv_copier(self, kv_head: Reg, per_batch: Reg, rows: int,
                  copy_rows: Callable | None = None) -> Callable[[Reg, Reg, Reg], None]:
        """``copy(dst, key, end)``: keys key.. (``rows`` of them) of K, then of V, of ``kv_head``
        (``per_batch`` rows a batch) into the stage at shared address ``dst``, zeros from ``end``,
        by ``copy_rows`` (default ``self.copy_rows``: the row-major swizzled tiles)."""
        b, heads = self.b, self.spec.kv_heads
        copy_rows = copy_rows or self.copy_rows
        zero = b.mov(0, T.U32)
        k_at, v_at = (self.row_ptr(name, per_batch, zero, heads, kv_head) for name in "kv")
        row_bytes, tile_bytes = heads * self.d * 2, rows * self.d * 2

        def copy(dst: Reg, key: Reg, end: Reg) -> None:
            copy_rows(b.add(k_at, b.mul_wide(key, row_bytes)), heads, dst, key, end, rows)
            copy_rows(b.add(v_at, b.mul_wide(key, row_bytes)), heads, b.add(dst, tile_bytes), key, end, rows)

        return copy

    def a_fragments(self, tile: Reg) -> Tiles:
        """This warp's 16 rows of a row tile at shared address ``tile``, as A fragments per k16 of d."""
        frags = [[self.b.reg(T.B32) for _ in range(4)] for _ in self.steps_d]
        for kk in self.steps_d:
            self.rows.fragment({2 * kk: self.b.add(tile, self.a_lane[2 * kk])}, 0, 2 * kk, frags[kk])
        return frags

    def zeros(self, tiles: int, into: Tiles | None = None) -> Tiles:
        """``tiles`` accumulator tiles of zeros (``into``: those registers set to zero)."""
        if into is None:
            return [[self.b.mov(0.0, T.F32) for _ in range(4)] for _ in range(tiles)]
        for tile in into:
            for r in tile:
                self.b.mov(0.0, T.F32, out=r)
        return into

    def products(self, acc: Tiles, a: Tiles, tile: Reg, n: int) -> None:
        """acc[16 x n] += A (16 x d fragments) times the n-row tile at ``tile``, transposed."""
        at = {c: self.b.add(tile, off) for c, off in self.b_lane.items()}
        for kk in self.steps_d:
            for pair in range(n // 16):
                frag = [self.b.reg(T.B32) for _ in range(4)]
                self.rows.fragment(at, pair * 16, 2 * kk, frag)
                self.mma(acc[2 * pair], a[kk], frag[0:2])
                self.mma(acc[2 * pair + 1], a[kk], frag[2:4])

    def accumulate(self, out: Tiles, p: Tiles, tile: Reg, n: int) -> None:
        """out[16 x d] += P (16 x n accumulator tiles, rounded to 16 bits) times the n-row tile at ``tile``."""
        b = self.b
        at = {c: b.add(tile, off) for c, off in self.t_lane.items()}
        for kk in range(n // 16):
            a = self.p_fragment(p, kk)
            for pair in self.steps_d:
                frag = [b.reg(T.B32) for _ in range(4)]
                self.cols.fragment(at, 16 * kk, 2 * pair, frag)
                self.mma(out[2 * pair], a, frag[0:2])
                self.mma(out[2 * pair + 1], a, frag[2:4])

    def p_fragment(self, p: Tiles, kk: int) -> list[Reg]:
        """P's k16 step kk as an m16k16 A fragment: accumulator tiles 2kk and 2kk + 1 (columns
        16kk.. and 16kk + 8..) rounded to 16-bit pairs."""
        b, lo, hi = self.b, p[2 * kk], p[2 * kk + 1]
        return [b.cvt_x2(self.to, lo[1], lo[0]), b.cvt_x2(self.to, lo[3], lo[2]),
                b.cvt_x2(self.to, hi[1], hi[0]), b.cvt_x2(self.to, hi[3], hi[2])]

    def mask(self, s: Tiles, col0: Reg, needed: Reg, off: Callable[[Reg, int], Reg]) -> None:
        """-inf where ``off(column, h)`` (h: the row group + 8h), on tiles where ``needed`` only."""
        b = self.b
        skip = b.new_label("unmasked")
        b.bra(skip, guard=Guard(needed, negated=True))
        col = b.add(col0, b.shl(self.quad, 1))
        for j, tile in enumerate(s):
            for q, value in enumerate(tile):
                b.mov(b.selp(float("-inf"), value, off(b.add(col, 8 * j + (q & 1)), q >> 1), T.F32), out=value)
        b.place(skip)

    def rows_of_warp(self, first: Reg) -> list[Reg]:
        """The block-level rows of this lane's accumulator rows: group and group + 8 of its warp's 16."""
        b = self.b
        return [b.add(b.add(first, b.mad(self.warp, 16, self.group)), 8 * h) for h in range(2)]

    def key_end(self, first: Reg, q_start: Reg, kv_len: Reg) -> Reg:
        """The keys a forward block of queries first.. needs: all kv_len, or (causal) up to its last
        query's position."""
        b, spec = self.b, self.spec
        return b.min(kv_len, b.add(q_start, b.add(first, spec.rows_per_block))) if spec.causal else kv_len

    def softmax_state(self) -> tuple[list[Reg], list[Reg]]:
        """(row maxima, this lane's shares of the row sums) of rows group and group + 8, empty."""
        b = self.b
        return [b.mov(float("-inf"), T.F32) for _ in range(2)], [b.mov(0.0, T.F32) for _ in range(2)]

    def forward_masking(self, first: Reg, q_start: Reg, kv_len: Reg) -> tuple[list[Reg], Reg, Callable]:
        """(this lane's two rows, the last key every row of the block sees (key tiles past it need
        masking), ``off(key, h)``: key past kv_len, or (causal) after row h's position)."""
        b, causal = self.b, self.spec.causal
        rows = self.rows_of_warp(first)
        positions = [b.add(q_start, r) for r in rows]
        last_free = b.min(kv_len, b.add(q_start, b.add(first, 1))) if causal else kv_len

        def off(key: Reg, h: int) -> Reg:
            out = b.setp("ge", key, kv_len)
            return b.or_(out, b.setp("gt", key, positions[h])) if causal else out

        return rows, last_free, off

    def online_softmax(self, s: Tiles, m: list[Reg], l_part: list[Reg], o: Tiles, c: float) -> Tiles:
        """One key tile's step of the online softmax, in base 2 (``c``: the scale times log2 e), on
        the S accumulators: the row maxima ``m`` move up, the lane's shares of the row sums
        ``l_part`` and the output accumulators ``o`` are rescaled to them; returns P."""
        b = self.b
        p = [[None] * 4 for _ in s]
        for h in range(2):  # this lane's values of row group + 8h: accumulator entries 2h, 2h+1
            mine = [(j, e) for j in range(len(s)) for e in (2 * h, 2 * h + 1)]
            row_max = functools.reduce(b.max, [s[j][e] for j, e in mine])
            m_new = b.max(m[h], b.mul(warp_allreduce(b, row_max, "max", 4), c))
            alpha = exp2(b, b.sub(m[h], m_new))
            neg = b.neg(m_new)
            for j, e in mine:
                p[j][e] = exp2(b, b.fma(s[j][e], c, neg))
            b.fma(l_part[h], alpha, tree_sum(b, [p[j][e] for j, e in mine]), out=l_part[h])
            for acc in o:
                for e in (2 * h, 2 * h + 1):
                    b.mul(acc[e], alpha, out=acc[e])
            b.mov(m_new, out=m[h])
        return p

    def store_output(self, o: Tiles, m: list[Reg], l_part: list[Reg], rows: list[Reg], seq: Reg, head: Reg) -> None:
        """O / l in 16 bits and the log-sum-exp (natural log) of this lane's two rows."""
        b, spec = self.b, self.spec
        for h in range(2):
            l_row = warp_allreduce(b, l_part[h], "add", 4)
            # approx: rcp.rn's slow path is a call, and a call serializes wgmma; l_row >= 1 (its maximum's 2^0)
            inv = reciprocal(b, l_row)
            valid = b.setp("lt", rows[h], seq)
            out = b.add(self.row_ptr("o", seq, rows[h], spec.heads, head), b.mul_wide(self.quad, 4))
            for j, acc in enumerate(o):
                b.st("global", Addr(out, 16 * j), b.cvt_x2(self.to, b.mul(acc[2 * h + 1], inv), b.mul(acc[2 * h], inv)),
                     t=T.B32, guard=valid)
            b.st("global", Addr(self.stat_ptr("lse", spec.heads, head, seq, rows[h])),
                 b.mul(b.add(m[h], b.fn("lg2", l_row)), LN2_F32), guard=b.and_(valid, b.setp("eq", self.quad, 0)))

    def unless(self, done: Reg, body: Callable[[], None]) -> None:
        """``body`` emitted for threads where predicate ``done`` is false (the others branch past it)."""
        skip = self.b.new_label("done")
        self.b.bra(skip, guard=done)
        body()
        self.b.place(skip)

    def landed(self, fenced: bool = False, block: bool = False) -> None:
        """Every thread's copies have landed (and, ``fenced``, are visible to the async proxy wgmma
        reads through), for every thread of the team (``block``: of the block): the stage they
        filled may be read, the one read refilled."""
        b = self.b
        b.cp_async_wait(0)
        if fenced:
            b.fence_proxy_async()
        b.bar_sync(*((0, None) if block else self.barrier))

    def store_f32(self, acc: Tiles, h: int, row_at: Reg, valid: Reg, scale: float = 1.0) -> None:
        """Row group + 8h of a [16 x d] accumulator into the f32 row at ``row_at`` (d floats)."""
        b = self.b
        at = b.add(row_at, b.mul_wide(self.quad, 8))
        for j, tile in enumerate(acc):
            vals = [tile[2 * h], tile[2 * h + 1]]
            b.st("global", Addr(at, 32 * j), [b.mul(v, scale) for v in vals] if scale != 1.0 else vals,
                 guard=valid)

    def store_qkv_row(self, name: str, acc: Tiles, h: int, token: Reg, column_head: Reg, valid: Reg,
                      scale: float = 1.0, rotate: bool = False) -> None:
        """The spec's ``qkv_rows``: row group + 8h of the gradient ``name`` ([16 x d] accumulators x
        ``scale``) of token ``token`` into head ``column_head`` of the fused projection's [q | k |
        v] gradient row, in bf16 (its GEMMs' operand); ``rotate``: rotated back by RoPE (the
        angles' table's (cos, -sin) of the token, ``rope.rotate``): bit for bit the RoPE backward
        kernel's bf16 output (``RopeSpec(bf16_out=True)``), and the strided cast's."""
        b, spec, d = self.b, self.spec, self.d
        index = b.mad(token, spec.heads + 2 * spec.kv_heads, column_head)  # in head_dim units of d_qkv
        at16 = b.add(b.add(b.cvta_global(b.ld_param(name)), b.mul_wide(index, d * 2)), b.mul_wide(self.quad, 4))
        pairs = [[b.mul(v, scale) if scale != 1.0 else v for v in (tile[2 * h], tile[2 * h + 1])] for tile in acc]
        if rotate:  # the pair (i, i + d / 2) in n8 tiles j and j + d / 16 of the lane; i = 8 j + 2 quad (+ 1)
            half = d // 2
            for j, cs in enumerate(table_angles(b, b.cvta_global(b.ld_param("angles")), token, self.quad, half, valid)):
                turned = [rotate_pair(b, x1, x2, cs[2 * e], b.neg(cs[2 * e + 1]))
                          for e, (x1, x2) in enumerate(zip(pairs[j], pairs[j + half // 8]))]
                pairs[j], pairs[j + half // 8] = [y1 for y1, _ in turned], [y2 for _, y2 in turned]
        for j, pair in enumerate(pairs):
            b.st("global", Addr(at16, 16 * j), b.cvt_bf16x2(pair[1], pair[0]), t=T.B32, guard=valid)


@dataclass(frozen=True)
class _FlashBase(AttentionGrid, KernelSpec):
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    dtype: MmaType = MmaType.BF16
    warps: int = 4  # 16 rows each
    tile: int = 64  # rows of the other side per step

    # a kernel's tile layout (shared alignment, the row copier) and whether its copies are read
    # through the async proxy (wgmma) and so fenced into it
    _align: ClassVar[int] = SHARED_LINE
    _fenced: ClassVar[bool] = False

    def _copy_rows(self, f: _Flash) -> Callable:
        return f.copy_rows

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def team_threads(self) -> int:
        """The threads that copy and multiply together (the dK/dV kernel's ``teams`` split the block)."""
        return self.threads

    @property
    def rows_per_block(self) -> int:
        return 16 * self.warps

    def validate(self) -> None:
        self.check_heads("warps", "tile")
        if self.dtype is MmaType.TF32:
            raise SpecError("the tensor-core attention (mma.sync m16n8k16) takes bf16 or f16")
        if self.head_dim not in (32, 64, 128):
            raise SpecError(f"head_dim must be 32, 64 or 128, got {self.head_dim}")
        if self.tile not in (16, 32, 64, 128):
            raise SpecError(f"tile must be 16, 32, 64 or 128, got {self.tile}")
        if self.warps > 8:
            raise SpecError(f"1 to 8 warps, got {self.warps}")
        chunks = self.head_dim // ELEMS
        rows = self.team_threads // chunks
        if self.team_threads % chunks or rows % 8 or self.rows_per_block % rows or self.tile % rows:
            raise SpecError(f"{self.team_threads} threads do not copy {self.head_dim}-wide rows in passes of whole "
                            f"rows, a multiple of 8 that divides {self.rows_per_block} and {self.tile}")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.dynamic_shared_bytes()} bytes of shared memory (max {SHARED_LIMIT})")

    def _wait(self, f: _Flash, team: bool = False) -> None:
        """Every product this thread's warps issued is done (``team``: every warp's of its team);
        mma.sync's are done at once: nothing (the barrier after a stage's last reads orders its
        refill)."""

    def _work(self, b: KernelBuilder, reversed_rows: bool) -> tuple[Reg, Reg, Reg]:
        """(first row, head, batch) of this block. The launch starts blocks in the order of their
        index (x fastest), so the grid is renumbered with the row tile slowest: every (head, batch)
        block of the row tile with the most causal work (the last (``reversed_rows``: queries) or
        the first (keys)) starts before any of the next tile, across the whole grid, and the blocks
        with the least work fill in at the end."""
        tiles, heads = b.special("%nctaid.x"), b.special("%nctaid.y")
        index = b.mad(b.mad(b.special("%ctaid.z"), heads, b.special("%ctaid.y")), tiles, b.special("%ctaid.x"))
        per_tile = b.mul(heads, b.special("%nctaid.z"))
        tile, rest = b.div(index, per_tile), b.rem(index, per_tile)
        if reversed_rows:
            tile = b.sub(b.sub(tiles, 1), tile)
        return b.mul(tile, self.rows_per_block), b.rem(rest, heads), b.div(rest, heads)


class _ForwardBase(_FlashBase):
    """What the tensor-core forwards share: o = softmax(q k^T * scale, causal) v per head and lse,
    over ``kv_len`` keys (a cache of ``kv_stride`` rows per batch) for ``seq`` queries at positions
    q_start... The block copies its queries and the first key/value tile, then per tile: the next
    tile's copies, S, the mask, the online softmax, O += P V, and a barrier once the next tile has
    landed. A kernel provides its tile layout (``_align``, ``_copy_rows``), whether its copies are
    read through the async proxy (``_fenced``), and its two products (``_start``, ``_output``,
    ``_scores``, ``_accumulate``)."""

    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "lse")
    written: ClassVar[tuple[str, ...]] = ("o", "lse")
    scalars: ClassVar[tuple[str, ...]] = ("seq", "kv_len", "kv_stride", "q_start")

    def dynamic_shared_bytes(self) -> int:
        return (self.rows_per_block + 4 * self.tile) * self.head_dim * 2  # Q, then K and V twice

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        first, head, batch = self._work(b, reversed_rows=True)
        f = _Flash(self, b, batch, align=self._align)
        copy_rows = self._copy_rows(f)
        d, bq, bkv = self.head_dim, self.rows_per_block, self.tile
        seq, kv_len, kv_stride, q_start = (b.ld_param(n) for n in ("seq", "kv_len", "kv_stride", "q_start"))
        kv_head = b.div(head, self.group)
        copy_kv = f.kv_copier(kv_head, kv_stride, bkv, copy_rows)
        kv_bytes = bkv * d * 2

        end = f.key_end(first, q_start, kv_len)
        key0 = b.mov(0, T.U32)
        kv = Pair(Ring(b, 2, 2 * kv_bytes, b.add(f.smem, bq * d * 2)))  # K then V, after Q
        copy_rows(f.row_ptr("q", seq, first, self.heads, head), self.heads, f.smem, first, seq, bq)
        copy_kv(kv.at, key0, end)
        b.cp_async_commit()
        f.landed(self._fenced)
        queries = self._start(f)

        c = self.scale_log2e  # scores in base 2
        m, l_part = f.softmax_state()
        o = self._output(f)
        rows, last_free, off = f.forward_masking(first, q_start, kv_len)
        with b.loop(b.div(b.add(end, bkv - 1), bkv), "kv_tile"):
            copy_kv(kv.other, b.add(key0, bkv), end)  # the next tile (past ``end``: zero-size copies)
            b.cp_async_commit()
            s = self._scores(f, queries, kv.at)
            f.mask(s, key0, b.setp("gt", b.add(key0, bkv), last_free), off)
            p = f.online_softmax(s, m, l_part, o, c)
            self._accumulate(f, queries, o, p, b.add(kv.at, kv_bytes))
            f.landed(self._fenced)  # the next tile has landed, and every warp is done with this one
            kv.advance()
            b.add(key0, bkv, out=key0)
        f.store_output(o, m, l_part, rows, seq, head)


@register
@dataclass(frozen=True)
class AttentionTCSpec(_ForwardBase):
    """The forward on mma.sync: the block's queries read into A fragments once, S from them and
    the key tile by ldmatrix, P V from the S accumulators repacked."""

    kind: ClassVar[str] = "attention_tc_fwd"

    def _start(self, f: _Flash) -> Tiles:
        return f.a_fragments(f.smem)

    def _output(self, f: _Flash) -> Tiles:
        return f.zeros(self.head_dim // 8)

    def _scores(self, f: _Flash, q: Tiles, stage: Reg) -> Tiles:
        s = f.zeros(self.tile // 8)
        f.products(s, q, stage, self.tile)
        return s

    def _accumulate(self, f: _Flash, q: Tiles, o: Tiles, p: Tiles, values: Reg) -> None:
        f.accumulate(o, p, values, self.tile)

    @classmethod
    def examples(cls) -> list["AttentionTCSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128),
                cls(heads=4, kv_heads=4, head_dim=32, causal=False, dtype=MmaType.F16, warps=2, tile=32),
                cls(heads=8, kv_heads=2, head_dim=64, warps=8, tile=128)]


class _QkvRows:
    """The backward kernels' ``qkv_rows``: dq, dk and dv land in the fused q/k/v projection's
    gradient rows, [q | k | v] heads a token (dq, dk and dv all point at its first), in bf16 as the
    projection's GEMMs and its bias's column sum read them (no f32 rows), dq and dk rotated back by
    RoPE by the forward's angles' table ``angles`` (``rope.RopeTableSpec``'s): the RoPE backward
    kernels and dv's copy, done as they are stored (``_Flash.store_qkv_row``)."""

    qkv_rows: bool

    def params(self) -> tuple[tuple[str, T], ...]:
        return super().params() + ((("angles", T.U64),) if self.qkv_rows else ())  # type: ignore[misc]


@dataclass(frozen=True)
class _BackwardQBase(_QkvRows, _FlashBase):
    """What the dQ kernels share: dq = scale * sum_j ds_ij k_j with ds = p * (dp - delta), dp = do v^T;
    writes delta = rowsum(do * o). The block stages its Q, dO and O rows and the first key/value
    tile, computes delta from the staged dO and O, then per key tile: the next tile's copies, the
    tile's products (``_gradient``: S = Q K^T, its mask, dP = dO V^T, dS, dQ += dS K), and a barrier
    once the next tile has landed. A kernel provides its operands (``_start``), where a staged row
    tile keeps a chunk (``_tile_offset``) and the products."""

    qkv_rows: bool = False

    kind: ClassVar[str]
    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "do", "lse", "dq", "delta")
    written: ClassVar[tuple[str, ...]] = ("dq", "delta")

    def dynamic_shared_bytes(self) -> int:
        return (3 * self.rows_per_block + 4 * self.tile) * self.head_dim * 2  # Q, dO, O, then K and V twice

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        first, head, batch = self._work(b, reversed_rows=True)
        f = _Flash(self, b, batch, align=self._align)
        copy_rows = self._copy_rows(f)
        d, bq, bkv = self.head_dim, self.rows_per_block, self.tile
        seq = b.ld_param("seq")
        kv_head = b.div(head, self.group)
        copy_kv = f.kv_copier(kv_head, seq, bkv, copy_rows)
        kv_bytes, q_bytes = bkv * d * 2, bq * d * 2
        end = b.min(seq, b.add(first, bq)) if self.causal else seq
        key0 = b.mov(0, T.U32)
        kv = Pair(Ring(b, 2, 2 * kv_bytes, b.add(f.smem, 3 * q_bytes)))  # K then V, after Q, dO, O

        for i, name in enumerate(("q", "do", "o")):
            copy_rows(f.row_ptr(name, seq, first, self.heads, head), self.heads, b.add(f.smem, i * q_bytes),
                      first, seq, bq)
        copy_kv(kv.at, key0, end)
        b.cp_async_commit()
        f.landed(self._fenced)
        operands = self._start(f, q_bytes)
        rows = f.rows_of_warp(first)
        delta = self._delta(b, f, first, seq, head, q_bytes)
        lse2 = [b.mul(b.ld("global", T.F32, Addr(f.stat_ptr("lse", self.heads, head, seq, r)),
                           guard=b.setp("lt", r, seq), out=[b.mov(0.0, T.F32)]), LOG2E_F32) for r in rows]
        neg_lse2 = [b.neg(x) for x in lse2]
        c = self.scale_log2e
        dq = f.zeros(d // 8)
        last_free = b.min(seq, b.add(first, 1)) if self.causal else seq

        def off(key: Reg, h: int) -> Reg:
            out = b.setp("ge", key, seq)
            return b.or_(out, b.setp("gt", key, rows[h])) if self.causal else out

        def mask(s: Tiles) -> None:
            f.mask(s, key0, b.setp("gt", b.add(key0, bkv), last_free), off)

        def dscores(s: Tiles, dp: Tiles) -> Tiles:
            return [[b.mul(exp2(b, b.fma(s[j][e], c, neg_lse2[e >> 1])), b.sub(dp[j][e], delta[e >> 1]))
                     for e in range(4)] for j in range(len(s))]

        with b.loop(b.div(b.add(end, bkv - 1), bkv), "kv_tile"):
            copy_kv(kv.other, b.add(key0, bkv), end)
            b.cp_async_commit()
            self._gradient(f, operands, dq, kv.at, mask, dscores)
            f.landed(self._fenced)
            kv.advance()
            b.add(key0, bkv, out=key0)

        if self.qkv_rows:
            for h in range(2):
                f.store_qkv_row("dq", dq, h, b.mad(f.batch, seq, rows[h]), head, b.setp("lt", rows[h], seq),
                                self.scale, rotate=True)
            return
        dq_ptr = b.cvta_global(b.ld_param("dq"))
        for h in range(2):
            index = b.mad(b.mad(f.batch, seq, rows[h]), self.heads, head)
            f.store_f32(dq, h, b.add(dq_ptr, b.mul_wide(index, d * 4)), b.setp("lt", rows[h], seq), self.scale)

    def _delta(self, b: KernelBuilder, f: _Flash, first: Reg, seq: Reg, head: Reg, q_bytes: int) -> list[Reg]:
        """delta = rowsum(dO * O) of this warp's 16 rows from the staged tiles: two lanes per row, each
        half of it; written to global and returned for this lane's accumulator rows (group, group + 8)."""
        row = b.add(b.mul(f.warp, 16), b.shr(f.lane, 1))
        half = b.and_(f.lane, 1)
        chunks = self.head_dim // ELEMS
        offset = self._tile_offset(f)
        parts = []
        for i in range(chunks // 2):
            chunk = b.add(b.mul(half, chunks // 2), i)
            at = b.add(f.smem, offset(row, chunk))
            dos = b.ld("shared", T.B32, Addr(at, q_bytes), 4)
            os_ = b.ld("shared", T.B32, Addr(at, 2 * q_bytes), 4)
            for x, y in zip(dos, os_):
                for u, v in zip(b.unpack(x), b.unpack(y)):
                    parts.append(b.mul(b.cvt(T.F32, u, src=self.dtype_t), b.cvt(T.F32, v, src=self.dtype_t)))
        mine = warp_allreduce(b, tree_sum(b, parts), "add", 2)
        global_row = b.add(first, row)
        b.st("global", Addr(f.stat_ptr("delta", self.heads, head, seq, global_row)), mine,
             guard=b.and_(b.setp("lt", global_row, seq), b.setp("eq", half, 0)))
        return [b.shfl("idx", mine, b.shl(b.add(f.group, 8 * h), 1)) for h in range(2)]

    @property
    def dtype_t(self) -> T:
        return T(self.dtype.value)


@register
@dataclass(frozen=True)
class AttentionTCBackwardQSpec(_BackwardQBase):
    """The dQ kernel on mma.sync: the block's Q and dO rows read into A fragments once."""

    kind: ClassVar[str] = "attention_tc_bwd_q"

    def _start(self, f: _Flash, q_bytes: int) -> tuple[Tiles, Tiles]:
        return f.a_fragments(f.smem), f.a_fragments(f.b.add(f.smem, q_bytes))

    def _tile_offset(self, f: _Flash) -> Callable[[Reg, Reg], Reg]:
        return f.rows.offset

    def _gradient(self, f: _Flash, operands: tuple[Tiles, Tiles], dq: Tiles, stage: Reg,
                  mask: Callable[[Tiles], None], dscores: Callable[[Tiles, Tiles], Tiles]) -> None:
        b, bkv, (q, do) = f.b, self.tile, operands
        s = f.zeros(bkv // 8)
        f.products(s, q, stage, bkv)
        mask(s)
        dp = f.zeros(bkv // 8)
        f.products(dp, do, b.add(stage, bkv * self.head_dim * 2), bkv)
        f.accumulate(dq, dscores(s, dp), stage, bkv)

    @classmethod
    def examples(cls) -> list["AttentionTCBackwardQSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128, tile=32),
                cls(heads=4, kv_heads=4, head_dim=32, causal=False, dtype=MmaType.F16, warps=2, tile=32)]


class _KVStep(NamedTuple):
    """A query tile's elementwise steps, for the dK/dV products between them."""

    mask: Callable[[Tiles], None]  # S^T: -inf where a query does not see a key
    probabilities: Callable[[Tiles], Tiles]  # P^T from the masked S^T (reads the tile's lse and delta)
    dscores: Callable[[Tiles, Tiles], Tiles]  # dS^T from P^T and dP^T


@dataclass(frozen=True)
class _BackwardKVBase(_QkvRows, _FlashBase):
    """What the dK/dV kernels share: dk = scale * sum ds^T q, dv = sum p^T do over the query heads
    of each K/V head's group. The block stages its K and V rows, then per query head of the group
    and per query tile at or after its keys (Q, dO and their lse and delta rows, double-buffered):
    the wait for the tile's first products (``_scores``: S^T = K Q^T, and dP^T = V dO^T where the
    kernel makes it then), the next tile's copies, the rest (``_gradient``: P^T, dV += P^T dO, dP^T,
    dK += dS^T Q), a barrier once the next tile has landed, and the next tile's first products: on
    wgmma, where products run while the warpgroup goes on, a tile's last products and the next
    tile's first run back to back, waited for once (on the H200 3-5% faster than waiting for each;
    the forward and dQ kernels were 12-15% and 3-5% slower that way, with more registers live, and
    wait for each group).

    ``teams``: the block's warps split into that many teams that share its keys and take the query
    tiles in turn (team t the tiles t, t + teams, ...), each with its own stages and barrier; at the
    end the teams' dK and dV are summed in team order through shared memory (no atomics: still
    deterministic). A key tile's causal work is then spread over more warps, where a block per key
    tile alone leaves the first tiles' blocks running long after the last ones are done."""

    teams: int = 1
    qkv_rows: bool = False

    kind: ClassVar[str]
    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "do", "lse", "delta", "dk", "dv")
    written: ClassVar[tuple[str, ...]] = ("dk", "dv")

    @property
    def grid_heads(self) -> int:
        return self.kv_heads

    @property
    def team_threads(self) -> int:
        return self.threads // self.teams

    @property
    def rows_per_block(self) -> int:
        return 16 * self.warps // self.teams

    def validate(self) -> None:
        check_positive("teams", self.teams)
        if self.warps % self.teams:
            raise SpecError(f"{self.warps} warps do not split into {self.teams} teams")
        super().validate()
        if self.tile > self.team_threads:
            raise SpecError(f"tile {self.tile} exceeds the {self.team_threads} threads that load its lse and delta")

    def _stage_bytes(self) -> int:
        """One query tile's stage: Q, dO, then the lse and delta rows."""
        return 2 * (self.tile * self.head_dim * 2 + self.tile * 4)

    def _sums_bytes(self) -> int:
        """The other teams' dK and dV (f32), where their stages were."""
        return (self.teams - 1) * 2 * self.rows_per_block * self.head_dim * 4

    def dynamic_shared_bytes(self) -> int:  # K, V, then two stages a team
        return 2 * self.rows_per_block * self.head_dim * 2 + max(2 * self.teams * self._stage_bytes(),
                                                                 self._sums_bytes())

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        first, kv_head, batch = self._work(b, reversed_rows=False)
        f = _Flash(self, b, batch, align=self._align)
        copy_rows = self._copy_rows(f)
        d, bk, bq = self.head_dim, self.rows_per_block, self.tile
        seq = b.ld_param("seq")
        kv_bytes, q_bytes = bk * d * 2, bq * d * 2
        for i, name in enumerate(("k", "v")):
            with _team_only(f, i % self.teams):
                copy_rows(f.row_ptr(name, seq, first, self.kv_heads, kv_head), self.kv_heads,
                          b.add(f.smem, i * kv_bytes), first, seq, bk)
        b.cp_async_commit()
        f.landed(self._fenced, block=True)
        operands = self._start(f, kv_bytes)
        keys = f.rows_of_warp(first)
        dk, dv = f.zeros(d // 8), f.zeros(d // 8)
        c = self.scale_log2e
        q_begin = b.mul(b.div(first, bq), bq) if self.causal else b.mov(0, T.U32)  # queries that see these keys
        # this team's stages after K and V; its query tiles of those from q_begin on
        qs = Pair(Ring(b, 2, self._stage_bytes(), b.add(f.smem, b.mad(f.team, 2 * self._stage_bytes(), 2 * kv_bytes))))
        q_tiles = b.div(b.add(b.sub(seq, q_begin), bq - 1), bq)
        my_tiles = b.div(b.sub(b.add(q_tiles, self.teams - 1), f.team), self.teams)
        my_begin = b.mad(f.team, bq, q_begin)
        tid_ok = b.setp("lt", f.tid, bq)

        with b.loop(b.mov(self.group, T.U32), "head") as hq:
            head = b.mad(kv_head, self.group, hq)
            q_at = f.row_ptr("q", seq, b.mov(0, T.U32), self.heads, head)
            do_at = f.row_ptr("do", seq, b.mov(0, T.U32), self.heads, head)
            lse_at, delta_at = (f.stat_ptr(n, self.heads, head, seq, b.mov(0, T.U32)) for n in ("lse", "delta"))
            q_row = self.heads * d * 2
            q0 = b.mov(my_begin)

            def copy_q(dst: Reg, row0: Reg) -> None:
                """Q and dO rows row0.. (cp.async), and their lse (in base 2) and delta (plain loads)."""
                copy_rows(b.add(q_at, b.mul_wide(row0, q_row)), self.heads, dst, row0, seq, bq)
                copy_rows(b.add(do_at, b.mul_wide(row0, q_row)), self.heads, b.add(dst, q_bytes), row0, seq, bq)
                row = b.add(row0, f.tid)
                ok = b.and_(tid_ok, b.setp("lt", row, seq))
                for i, (at, scale) in enumerate(((lse_at, LOG2E_F32), (delta_at, 1.0))):
                    x = b.ld("global", T.F32, Addr(b.add(at, b.mul_wide(row, 4))), guard=ok, out=[b.mov(0.0, T.F32)])
                    b.st("shared", Addr(b.add(dst, b.shl(f.tid, 2)), 2 * q_bytes + i * bq * 4),
                         b.mul(x, scale) if scale != 1.0 else x, guard=tid_ok)

            copy_q(qs.at, q0)
            b.cp_async_commit()
            f.landed(self._fenced)

            def off(query: Reg, h: int) -> Reg:  # past the sequence, or (causal) before the key
                out = b.setp("ge", query, seq)
                return b.or_(out, b.setp("gt", keys[h], query)) if self.causal else out

            def mask(st: Tiles) -> None:
                needed = b.setp("gt", b.add(q0, bq), seq)  # the tile passes the sequence's end ...
                if self.causal:  # ... or some query comes before some key
                    needed = b.or_(needed, b.setp("lt", q0, b.add(first, bk)))
                f.mask(st, q0, needed, off)

            dlt: list[list[Reg]] = []

            def probabilities(st: Tiles) -> Tiles:
                stats = b.add(qs.at, b.add(b.shl(f.quad, 3), 2 * q_bytes))  # this lane's column pair's lse
                lse2 = [b.ld("shared", T.F32, Addr(stats, 32 * j), 2) for j in range(bq // 8)]
                dlt[:] = [b.ld("shared", T.F32, Addr(stats, 32 * j + bq * 4), 2) for j in range(bq // 8)]
                return [[exp2(b, b.fma(st[j][e], c, b.neg(lse2[j][e & 1]))) for e in range(4)]
                        for j in range(bq // 8)]

            def dscores(p: Tiles, dpt: Tiles) -> Tiles:
                return [[b.mul(p[j][e], b.sub(dpt[j][e], dlt[j][e & 1])) for e in range(4)] for j in range(bq // 8)]

            # the first tile's first products, by a team that has one (a team with none would multiply
            # stale bytes: wasted, and on mma.sync its warps' reads would race the others' copies)
            scores: list = []  # (S^T, dP^T) on wgmma, S^T's tiles on mma.sync
            f.unless(b.setp("ge", q0, seq), lambda: scores.extend(self._scores(f, operands, qs.at)))
            with b.loop(my_tiles, "q_tile"):
                self._wait(f, team=True)  # this tile's first products, the tile before's dK and dV ones
                copy_q(qs.other, b.add(q0, self.teams * bq))
                b.cp_async_commit()
                self._gradient(f, operands, dk, dv, scores, qs.at, _KVStep(mask, probabilities, dscores))
                f.landed(self._fenced)
                b.add(q0, self.teams * bq, out=q0)
                f.unless(b.setp("ge", q0, seq), lambda: self._scores(f, operands, qs.other, out=scores))
                qs.advance()
            self._wait(f)

        if self.teams > 1:
            self._sum_teams(f, [dk, dv], b.add(f.smem, 2 * kv_bytes))
        with _team_only(f, 0):
            if self.qkv_rows:  # k's heads after q's in the row, v's after k's
                for name, acc, scale, first_head in (("dk", dk, self.scale, self.heads),
                                                     ("dv", dv, 1.0, self.heads + self.kv_heads)):
                    for h in range(2):
                        f.store_qkv_row(name, acc, h, b.mad(f.batch, seq, keys[h]), b.add(kv_head, first_head),
                                        b.setp("lt", keys[h], seq), scale, rotate=name == "dk")
                return
            for name, acc, scale in (("dk", dk, self.scale), ("dv", dv, 1.0)):
                ptr = b.cvta_global(b.ld_param(name))
                for h in range(2):
                    index = b.mad(b.mad(f.batch, seq, keys[h]), self.kv_heads, kv_head)
                    f.store_f32(acc, h, b.add(ptr, b.mul_wide(index, d * 4)), b.setp("lt", keys[h], seq), scale)

    def _sum_teams(self, f: _Flash, accs: list[Tiles], sums: Reg) -> None:
        """Team 0's accumulators += every other team's, in team order: each of teams 1.. writes its
        registers to shared memory (register i of thread t at word i * team_threads + t: the same
        thread of every team holds the same elements), once every team is done with its stages."""
        b = f.b
        regs = [r for acc in accs for tile in acc for r in tile]
        mine = b.add(sums, b.shl(f.tid, 2))

        def slot(team: int, i: int) -> Addr:  # register i of this thread in team ``team``'s sums
            return Addr(mine, ((team - 1) * len(regs) + i) * self.team_threads * 4)

        b.bar_sync()  # every team is done reading its stages, which the sums overwrite
        for team in range(1, self.teams):
            with _team_only(f, team):
                for i, r in enumerate(regs):
                    b.st("shared", slot(team, i), r)
        b.bar_sync()
        with _team_only(f, 0):
            for team in range(1, self.teams):
                for i, r in enumerate(regs):
                    b.add(r, b.ld("shared", T.F32, slot(team, i)), out=r)


@contextlib.contextmanager
def _team_only(f: _Flash, team: int):
    """Emits its body for the threads of one team only (the others branch past it); with one team,
    for every thread."""
    b = f.b
    if f.spec.teams == 1:
        yield
        return
    skip = b.new_label("other_team")
    b.bra(skip, guard=b.setp("ne", f.team, team))
    yield
    b.place(skip)


@register
@dataclass(frozen=True)
class AttentionTCBackwardKVSpec(_BackwardKVBase):
    """The dK/dV kernel on mma.sync: K's and V's A fragments re-read from shared memory per tile
    (not held: registers), dV accumulated before dP^T is made."""

    kind: ClassVar[str] = "attention_tc_bwd_kv"

    def _start(self, f: _Flash, kv_bytes: int) -> None:
        return None

    def _scores(self, f: _Flash, operands: None, stage: Reg, out: Tiles | None = None) -> Tiles:
        """S^T alone (dP^T is made after dV: fewer live registers)."""
        st = f.zeros(self.tile // 8, out)
        f.products(st, f.a_fragments(f.smem), stage, self.tile)
        return st

    def _gradient(self, f: _Flash, operands: None, dk: Tiles, dv: Tiles, st: Tiles, stage: Reg,
                  step: _KVStep) -> None:
        b, bq, q_bytes = f.b, self.tile, self.tile * self.head_dim * 2
        step.mask(st)
        p = step.probabilities(st)
        f.accumulate(dv, p, b.add(stage, q_bytes), bq)
        dpt = f.zeros(bq // 8)
        f.products(dpt, f.a_fragments(b.add(f.smem, self.rows_per_block * self.head_dim * 2)),
                   b.add(stage, q_bytes), bq)
        f.accumulate(dk, step.dscores(p, dpt), stage, bq)

    @classmethod
    def examples(cls) -> list["AttentionTCBackwardKVSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128, tile=32),
                cls(heads=4, kv_heads=4, head_dim=32, causal=False, dtype=MmaType.F16, warps=2, tile=32),
                cls(heads=14, kv_heads=2, head_dim=64, warps=8, teams=2)]
