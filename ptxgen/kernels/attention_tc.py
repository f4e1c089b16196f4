"""Causal GQA attention forward on tensor cores (FlashAttention-2 style): bf16/f16 in, fp32 math.

The tensors are the fp32 attention's (``attention.py``): q, k, v, o [batch, seq, heads, head_dim]
in ``dtype``, lse [batch, heads, seq] f32 (natural log), the same parameters (a KV cache too).

A block takes ``16 * warps`` query rows of one head, a warp 16 of them, and walks the keys in
tiles of ``block_kv``. K and V tiles travel global -> shared by cp.async, double-buffered (the next
tile is in flight under this one's math). Q is read into mma fragments once. Per tile, S = Q K^T
and O += P V run on ``mma.sync.m16n8k16`` with fp32 accumulators; the softmax runs online in base
2 on the S accumulators themselves (a row's values sit in the 4 lanes of a quad), and P goes into
the PV product without a trip through shared memory: an m16n8 accumulator tile holds exactly half
an m16k16 A fragment, so two of them repacked to 16-bit pairs are one. Masking (causal, past
kv_len) is applied only on the tiles that need it. Blocks run from the last query tile down:
under the causal mask those carry the most work.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

from ..builder import Addr, KernelBuilder, Reg, T
from ..reductions import tree_sum, warp_allreduce
from ..registry import register
from ..spec import KernelSpec, SpecError
from .common import check_positive
from .gemm_tc import SHARED_LIMIT
from .mma_tile import CHUNK, ELEMS, MmaType, SharedTile

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


@register
@dataclass(frozen=True)
class AttentionTCSpec(KernelSpec):
    kind: ClassVar[str] = "attention_tc_fwd"
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    dtype: MmaType = MmaType.BF16
    warps: int = 4       # 16 query rows each
    block_kv: int = 64   # keys per tile

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def block_q(self) -> int:
        return 16 * self.warps

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def validate(self) -> None:
        for name in ("heads", "kv_heads", "head_dim", "warps", "block_kv"):
            check_positive(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise SpecError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim not in (32, 64, 128):
            raise SpecError(f"head_dim must be 32, 64 or 128, got {self.head_dim}")
        if self.block_kv not in (16, 32, 64, 128):
            raise SpecError(f"block_kv must be 16, 32, 64 or 128, got {self.block_kv}")
        if self.warps > 8:
            raise SpecError(f"1 to 8 warps, got {self.warps}")
        chunks = self.head_dim // ELEMS
        rows = self.threads // chunks  # rows one pass of the block's 16-byte copies covers
        if self.threads % chunks or rows % 8 or self.block_q % rows or self.block_kv % rows:
            raise SpecError(f"{self.threads} threads do not copy {self.head_dim}-wide rows in passes of "
                            f"whole rows, a multiple of 8 that divides {self.block_q} and {self.block_kv}")
        if self.dynamic_shared_bytes() > SHARED_LIMIT:
            raise SpecError(f"{self.dynamic_shared_bytes()} bytes of shared memory (max {SHARED_LIMIT})")

    def dynamic_shared_bytes(self) -> int:
        return (self.block_q + 4 * self.block_kv) * self.head_dim * 2  # Q, then K and V twice

    def params(self) -> tuple[tuple[str, T], ...]:
        return tuple((n, T.U64) for n in ("q", "k", "v", "o", "lse")) + \
            tuple((n, T.U32) for n in ("seq", "kv_len", "kv_stride", "q_start"))

    def launch_dims(self, batch: int, seq: int) -> tuple[tuple[int, int, int], int]:
        return (-(-seq // self.block_q), self.heads, batch), self.threads

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        d, bq, bkv = self.head_dim, self.block_q, self.block_kv
        seq, kv_len, kv_stride, q_start = (b.ld_param(n) for n in ("seq", "kv_len", "kv_stride", "q_start"))
        tid = b.special("%tid.x")
        lane, warp = b.and_(tid, 31), b.shr(tid, 5)
        group, quad = b.shr(lane, 2), b.and_(lane, 3)  # an accumulator's row (and row + 8), column pair
        first = b.mul(b.sub(b.sub(b.special("%nctaid.x"), 1), b.special("%ctaid.x")), bq)
        head, batch = b.special("%ctaid.y"), b.special("%ctaid.z")
        kv_head = b.div(head, self.group)
        q_row, kv_row = self.heads * d * 2, self.kv_heads * d * 2  # bytes from one token's row to the next
        q_ptr, k_ptr, v_ptr, o_ptr = (b.cvta_global(b.ld_param(n)) for n in "qkvo")

        def rows_of(ptr: Reg, per_batch: Reg, row0: Reg, heads: int, h: Reg) -> Reg:
            return b.add(ptr, b.mul_wide(b.mad(b.mad(batch, per_batch, row0), heads, h), d * 2))

        q_at = rows_of(q_ptr, seq, first, self.heads, head)
        k_at = rows_of(k_ptr, kv_stride, b.mov(0, T.U32), self.kv_heads, kv_head)
        v_at = rows_of(v_ptr, kv_stride, b.mov(0, T.U32), self.kv_heads, kv_head)

        smem = b.addr_of(b.dynamic_shared("tiles", align=128))
        rows_tile, cols_tile = SharedTile(b, d, k_contig=True), SharedTile(b, d, k_contig=False)
        q_bytes, kv_bytes = bq * d * 2, bkv * d * 2

        # cp.async: a thread copies one 16-byte chunk column of every pass_rows-th row
        chunks = d // ELEMS
        pass_rows = self.threads // chunks
        my_row, my_chunk = b.div(tid, chunks), b.rem(tid, chunks)
        my_dst = b.add(smem, rows_tile.offset(my_row, my_chunk))  # one swizzle for every pass
        my_q, my_kv = (b.add(b.mul_wide(my_row, stride), b.mul_wide(my_chunk, CHUNK)) for stride in (q_row, kv_row))

        def copy_rows(at: Reg, mine: Reg, stride: int, dst: int | Reg, row0: Reg, limit: Reg, rows: int) -> None:
            """rows row0.. of a tensor (``at``: its row 0) into the tile at smem + ``dst``; zeros from ``limit``."""
            src = b.add(at, mine)
            base = my_dst if isinstance(dst, int) else b.add(my_dst, dst)
            for i in range(rows // pass_rows):
                ok = b.setp("lt", b.add(b.add(row0, my_row), i * pass_rows), limit)
                b.cp_async(base, b.selp(src, at, ok, T.U64), b.selp(CHUNK, 0, ok, T.U32),
                           dst_offset=(dst if isinstance(dst, int) else 0) + i * pass_rows * d * 2)
                if i + 1 < rows // pass_rows:
                    src = b.add(src, pass_rows * stride)

        # keys this block needs: all kv_len, or (causal) up to its last query's position
        end = b.min(kv_len, b.add(q_start, b.add(first, bq))) if self.causal else kv_len
        key0 = b.mov(0, T.U32)
        stage = b.add(smem, q_bytes)
        other = b.add(stage, 2 * kv_bytes)

        def copy_kv(dst: Reg, key: Reg) -> None:  # keys key.. of K and V into the stage at ``dst``
            offset = b.sub(dst, smem)
            copy_rows(b.add(k_at, b.mul_wide(key, kv_row)), my_kv, kv_row, offset, key, end, bkv)
            copy_rows(b.add(v_at, b.mul_wide(key, kv_row)), my_kv, kv_row, b.add(offset, kv_bytes), key, end, bkv)

        copy_rows(q_at, my_q, q_row, 0, first, seq, bq)
        copy_kv(stage, key0)
        b.cp_async_commit()
        b.cp_async_wait(0)
        b.bar_sync()

        steps_d, steps_kv = range(d // 16), range(bkv // 16)
        q_lane = rows_tile.lane_offsets(lane, b.mul(warp, 16), 0, 1, [2 * kk for kk in steps_d])
        q_frags = [[b.reg(T.B32) for _ in range(4)] for _ in steps_d]
        for kk in steps_d:
            rows_tile.fragment({2 * kk: b.add(smem, q_lane[2 * kk])}, 0, 2 * kk, q_frags[kk])
        k_lane = rows_tile.lane_offsets(lane, b.mov(0, T.U32), 1, 0, [2 * kk for kk in steps_d])
        v_lane = cols_tile.lane_offsets(lane, b.mov(0, T.U32), 1, 0, [2 * p for p in steps_d])

        c = self.scale * LOG2E  # scores in base 2
        m = [b.mov(float("-inf"), T.F32) for _ in range(2)]  # rows group and group + 8 (scaled)
        l_part = [b.mov(0.0, T.F32) for _ in range(2)]       # this lane's share of the row sums
        o = [[b.mov(0.0, T.F32) for _ in range(4)] for _ in range(d // 8)]
        rows = [b.add(b.add(first, b.mad(warp, 16, group)), 8 * h) for h in range(2)]
        positions = [b.add(q_start, r) for r in rows]
        last_free = b.min(kv_len, b.add(q_start, b.add(first, 1))) if self.causal else kv_len

        with b.loop(b.div(b.add(end, bkv - 1), bkv), "kv_tile"):
            copy_kv(other, b.add(key0, bkv))  # the next tile (past ``end``: zero-size copies)
            b.cp_async_commit()

            s = [[b.mov(0.0, T.F32) for _ in range(4)] for _ in range(bkv // 8)]
            at_k = {ch: b.add(stage, off) for ch, off in k_lane.items()}
            for kk in steps_d:
                for pair in range(bkv // 16):
                    frag = [b.reg(T.B32) for _ in range(4)]
                    rows_tile.fragment(at_k, pair * 16, 2 * kk, frag)
                    b.mma_m16n8k16(s[2 * pair], q_frags[kk], frag[0:2], self.dtype.value)
                    b.mma_m16n8k16(s[2 * pair + 1], q_frags[kk], frag[2:4], self.dtype.value)
            self._mask(b, s, key0, quad, positions, kv_len, last_free)

            p = [[None] * 4 for _ in s]
            for h in range(2):  # this lane's values of row group + 8h: accumulator entries 2h, 2h+1
                mine = [(j, q) for j in range(len(s)) for q in (2 * h, 2 * h + 1)]
                row_max = functools.reduce(b.max, [s[j][q] for j, q in mine])
                m_new = b.max(m[h], b.mul(warp_allreduce(b, row_max, "max", 4), c))
                alpha = b.fn("ex2", b.sub(m[h], m_new))
                neg = b.neg(m_new)
                for j, q in mine:
                    p[j][q] = b.fn("ex2", b.fma(s[j][q], c, neg))
                b.fma(l_part[h], alpha, tree_sum(b, [p[j][q] for j, q in mine]), out=l_part[h])
                for acc in o:
                    for q in (2 * h, 2 * h + 1):
                        b.mul(acc[q], alpha, out=acc[q])
                b.mov(m_new, out=m[h])

            to = T(self.dtype.value)
            at_v = {ch: b.add(stage, b.add(off, kv_bytes)) for ch, off in v_lane.items()}
            for kk in steps_kv:  # P's k16 step kk: accumulator tiles 2kk and 2kk+1
                lo, hi = p[2 * kk], p[2 * kk + 1]
                a = [b.cvt_x2(to, lo[1], lo[0]), b.cvt_x2(to, lo[3], lo[2]),
                     b.cvt_x2(to, hi[1], hi[0]), b.cvt_x2(to, hi[3], hi[2])]
                for pair in range(d // 16):
                    frag = [b.reg(T.B32) for _ in range(4)]
                    cols_tile.fragment(at_v, 16 * kk, 2 * pair, frag)
                    b.mma_m16n8k16(o[2 * pair], a, frag[0:2], self.dtype.value)
                    b.mma_m16n8k16(o[2 * pair + 1], a, frag[2:4], self.dtype.value)

            b.cp_async_wait(0)  # the next tile has landed, and every warp is done with this one
            b.bar_sync()
            swap = b.mov(stage)
            b.mov(other, out=stage)
            b.mov(swap, out=other)
            b.add(key0, bkv, out=key0)

        lse_ptr = b.cvta_global(b.ld_param("lse"))
        to = T(self.dtype.value)
        for h in range(2):
            l_row = warp_allreduce(b, l_part[h], "add", 4)
            inv = b.fn("rcp", l_row, "rn")
            valid = b.setp("lt", rows[h], seq)
            out = b.add(rows_of(o_ptr, seq, rows[h], self.heads, head), b.mul_wide(quad, 4))
            for j, acc in enumerate(o):
                b.st("global", Addr(out, 16 * j), b.cvt_x2(to, b.mul(acc[2 * h + 1], inv), b.mul(acc[2 * h], inv)),
                     t=T.B32, guard=valid)
            stat = b.add(lse_ptr, b.mul_wide(b.mad(b.mad(batch, self.heads, head), seq, rows[h]), 4))
            b.st("global", Addr(stat), b.mul(b.add(m[h], b.fn("lg2", l_row)), LN2),
                 guard=b.and_(valid, b.setp("eq", quad, 0)))

    def _mask(self, b: KernelBuilder, s: list[list[Reg]], key0: Reg, quad: Reg, positions: list[Reg],
              kv_len: Reg, last_free: Reg) -> None:
        """-inf for keys past kv_len and (causal) after the row's position, on the tiles that reach
        past ``last_free`` (the first key some row of the block may not see) only."""
        skip = b.new_label("unmasked")
        b.bra(skip, guard=b.setp("le", b.add(key0, self.block_kv), last_free))
        col = b.add(key0, b.shl(quad, 1))
        for j, tile in enumerate(s):
            for q, value in enumerate(tile):
                key = b.add(col, 8 * j + (q & 1))
                off = b.setp("ge", key, kv_len)
                if self.causal:
                    off = b.or_(off, b.setp("gt", key, positions[q >> 1]))
                b.mov(b.selp(float("-inf"), value, off, T.F32), out=value)
        b.place(skip)

    @classmethod
    def examples(cls) -> list["AttentionTCSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128),
                cls(heads=4, kv_heads=4, head_dim=32, causal=False, dtype=MmaType.F16, warps=2, block_kv=32),
                cls(heads=8, kv_heads=2, head_dim=64, warps=8, block_kv=128)]
