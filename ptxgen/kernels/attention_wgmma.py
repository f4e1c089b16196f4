"""Causal GQA attention forward on Hopper's warpgroup MMA (``wgmma``, sm_90a): bf16/f16 in, fp32 math.

The tensor-core forward (``attention_tc``: the same tensors, parameters, masking, online softmax
and outputs) with both products on wgmma instead of mma.sync. A block is one or two warpgroups of
64 query rows each (``warps`` 4 or 8); per key tile, S = Q K^T reads Q and K straight from shared
memory through matrix descriptors (both K-major), and O += P V takes P from the S accumulators
repacked to 16-bit pairs in registers (wgmma's A-from-registers form: an m16n8 accumulator pair of
each warp is its m16k16 A fragment, as for mma.sync) and V from shared memory MN-major (V's rows
are keys, the contraction). Q, K and V tiles are stored as head_dim / 64 column chunks of [rows][128
bytes] in the 128-byte swizzle (16-byte chunk c of row r at c ^ (r % 8)), copied by cp.async,
double-buffered, and fenced into the async proxy wgmma reads through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..builder import KernelBuilder, Reg, T
from ..registry import register
from ..spec import SpecError, Target
from .attention_tc import LOG2E, Tiles, _Flash, _FlashBase
from .gemm_wgmma import descriptor_bits
from .mma_tile import CHUNK, MmaType
from .tma_pipeline import ATOM_BYTES, ROW

COLUMNS = ROW // 2  # 16-bit elements of a column chunk's row


class _ChunkedRows:
    """Where _Flash's cp.async row copies land in a tile of head_dim / 64 column chunks of [rows][128
    bytes], swizzled, and the shared addresses of a k16 step of such a tile."""

    def __init__(self, f: _Flash):
        b = f.b
        self.f, self.b = f, b
        my_chunk = b.rem(f.tid, f.d // (CHUNK // 2))  # _Flash's: a thread copies one 16-byte chunk of a row
        # (its pass rows are a multiple of 8: the same swizzle every pass); column chunks rows * ROW apart
        self.column = b.shr(my_chunk, 3)
        self.in_row = b.add(b.mul(f.my_row, ROW), b.shl(b.xor(b.and_(my_chunk, 7), b.and_(f.my_row, 7)), 4))

    def copy(self, at: Reg, heads: int, dst: Reg, row0: Reg, limit: Reg, rows: int) -> None:
        """``_Flash.copy_rows`` into the chunked tile of ``rows`` rows at shared ``dst``."""
        mine = self.b.add(dst, self.b.mad(self.column, rows * ROW, self.in_row))
        self.f.copy_rows(at, heads, dst, row0, limit, rows, mine=mine, row_bytes=ROW)

    @staticmethod
    def k_major(kk: int, rows: int) -> int:
        """Byte offset of k16 step ``kk`` of a K-major tile of ``rows`` rows: 32 bytes along a row,
        the next column chunk every 4 steps."""
        return (kk // 4) * rows * ROW + (kk % 4) * 32


@register
@dataclass(frozen=True)
class AttentionWgmmaSpec(_FlashBase):
    """o = softmax(q k^T * scale, causal) v per head and lse, over ``kv_len`` keys (a cache of
    ``kv_stride`` rows per batch) for ``seq`` queries at positions q_start..; ``warps`` 4 or 8 (64
    query rows a warpgroup), ``tile`` 64 or 128 keys a step."""

    kind: ClassVar[str] = "attention_wgmma_fwd"
    pointers: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "lse")
    scalars: ClassVar[tuple[str, ...]] = ("seq", "kv_len", "kv_stride", "q_start")

    def arch(self, target: Target) -> str:
        if target.arch not in ("sm_90", "sm_90a"):
            raise SpecError(f"attention_wgmma_fwd needs sm_90a (wgmma); the target is {target.arch}")
        return "sm_90a"

    def validate(self) -> None:
        super().validate()
        if self.warps not in (4, 8) or self.tile not in (64, 128) or self.head_dim not in (64, 128):
            raise SpecError("attention_wgmma_fwd: warps 4 or 8 (whole warpgroups), tile 64 or 128, head_dim 64 or 128")

    def dynamic_shared_bytes(self) -> int:
        return (self.rows_per_block + 4 * self.tile) * self.head_dim * 2  # Q, then K and V twice

    def build(self, b: KernelBuilder) -> None:
        b.launch_bounds(self.threads)
        f = _Flash(self, b, align=ATOM_BYTES)
        tiles = _ChunkedRows(f)
        d, bq, bkv = self.head_dim, self.rows_per_block, self.tile
        seq, kv_len, kv_stride, q_start = (b.ld_param(n) for n in ("seq", "kv_len", "kv_stride", "q_start"))
        first = self._reversed_first(b)
        head = b.special("%ctaid.y")
        kv_head = b.div(head, self.group)
        copy_kv = f.kv_copier(kv_head, kv_stride, bkv, tiles.copy)
        kv_bytes = bkv * d * 2

        def landed() -> None:  # every thread's copies, visible to the async proxy, for every thread
            b.cp_async_wait(0)
            b.fence_proxy_async()
            b.bar_sync()

        end = f.key_end(first, q_start, kv_len)
        key0 = b.mov(0, T.U32)
        stage = b.add(f.smem, bq * d * 2)
        other = b.add(stage, 2 * kv_bytes)
        tiles.copy(f.row_ptr("q", seq, first, self.heads, head), self.heads, f.smem, first, seq, bq)
        copy_kv(stage, key0, end)
        b.cp_async_commit()
        landed()

        q_rows = b.add(f.smem, b.mul(b.shr(f.tid, 7), 64 * ROW))  # this warpgroup's 64 rows of Q
        k_bits, v_bits = descriptor_bits(False), descriptor_bits(True, bkv * ROW)
        desc = lambda addr, bits: b.or_(b.cvt(T.U64, b.shr(addr, 4)), bits, T.B64)  # noqa: E731
        overwrite, accumulate = (b.setp("ne", b.mov(x, T.U32), 0) for x in (0, 1))
        c = self.scale * LOG2E
        m, l_part = f.softmax_state()
        o_acc = [b.mov(0.0, T.F32) for _ in range(d // 2)]
        o: Tiles = [o_acc[4 * j:4 * j + 4] for j in range(d // 8)]
        rows, last_free, off = f.forward_masking(first, q_start, kv_len)
        with b.loop(b.div(b.add(end, bkv - 1), bkv), "kv_tile"):
            copy_kv(other, b.add(key0, bkv), end)  # the next tile (past ``end``: zero-size copies)
            b.cp_async_commit()
            s_acc = [b.reg(T.F32) for _ in range(bkv // 2)]
            b.wgmma_fence()
            for kk in range(d // 16):
                b.wgmma(s_acc, desc(b.add(q_rows, tiles.k_major(kk, bq)), k_bits),
                        desc(b.add(stage, tiles.k_major(kk, bkv)), k_bits), self.dtype.value, bkv,
                        accumulate if kk else overwrite)
            b.wgmma_commit()
            b.wgmma_wait(0)
            s: Tiles = [s_acc[4 * j:4 * j + 4] for j in range(bkv // 8)]
            f.mask(s, key0, b.setp("gt", b.add(key0, bkv), last_free), off)
            p = f.online_softmax(s, m, l_part, o, c)
            frags = [[b.cvt_x2(f.to, lo[1], lo[0]), b.cvt_x2(f.to, lo[3], lo[2]),
                      b.cvt_x2(f.to, hi[1], hi[0]), b.cvt_x2(f.to, hi[3], hi[2])]
                     for lo, hi in zip(p[0::2], p[1::2])]  # P's k16 steps: accumulator tiles 2kk, 2kk+1
            values = b.add(stage, kv_bytes)
            b.wgmma_fence()
            for kk, frag in enumerate(frags):  # V's 16 keys of step kk: 16 rows of 128 bytes further
                b.wgmma(o_acc, frag, desc(b.add(values, kk * 16 * ROW), v_bits), self.dtype.value, d, accumulate,
                        (False, True))
            b.wgmma_commit()
            b.wgmma_wait(0)
            landed()  # the next tile, and every warpgroup is done with this one
            f.swap(stage, other)
            b.add(key0, bkv, out=key0)
        f.store_output(o, m, l_part, rows, seq, head)

    @classmethod
    def examples(cls) -> list["AttentionWgmmaSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128),
                cls(heads=4, kv_heads=4, head_dim=64, causal=False, dtype=MmaType.F16, warps=8, tile=128)]
