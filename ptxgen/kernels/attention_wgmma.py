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
from typing import Callable, ClassVar, NamedTuple

from ..builder import Reg, T
from ..hw import CHUNK, SWIZZLE_ATOM, SWIZZLE_ROW, MmaType
from ..registry import register
from ..spec import SpecError, Target
from .attention_tc import Tiles, _Flash, _ForwardBase
from .gemm_wgmma import descriptor, descriptor_bits


class _ChunkedRows:
    """Where _Flash's cp.async row copies land in a tile of head_dim / 64 column chunks of [rows][128
    bytes], swizzled."""

    def __init__(self, f: _Flash):
        b = f.b
        self.f, self.b = f, b
        my_chunk = b.rem(f.tid, f.d // (CHUNK // 2))  # _Flash's: a thread copies one 16-byte chunk of a row
        # (its pass rows are a multiple of 8: the same swizzle every pass); column chunks rows * SWIZZLE_ROW apart
        self.column = b.shr(my_chunk, 3)
        self.in_row = b.add(b.mul(f.my_row, SWIZZLE_ROW), b.shl(b.xor(b.and_(my_chunk, 7), b.and_(f.my_row, 7)), 4))

    def copy(self, at: Reg, heads: int, dst: Reg, row0: Reg, limit: Reg, rows: int) -> None:
        """``_Flash.copy_rows`` into the chunked tile of ``rows`` rows at shared ``dst``."""
        mine = self.b.add(dst, self.b.mad(self.column, rows * SWIZZLE_ROW, self.in_row))
        self.f.copy_rows(at, heads, dst, row0, limit, rows, mine=mine, row_bytes=SWIZZLE_ROW)


def _k_major(kk: int, rows: int) -> int:
    """Byte offset of k16 step ``kk`` of a K-major chunked tile of ``rows`` rows: 32 bytes along a
    row, the next column chunk every 4 steps."""
    return (kk // 4) * rows * SWIZZLE_ROW + (kk % 4) * 32


class _Queries(NamedTuple):
    rows: Reg  # this warpgroup's 64 rows of the Q tile in shared memory
    overwrite: Reg  # scale-d false: the first k16 step of S
    accumulate: Reg


@register
@dataclass(frozen=True)
class AttentionWgmmaSpec(_ForwardBase):
    """The forward on wgmma; ``warps`` 4 or 8 (64 query rows a warpgroup), ``tile`` 64 or 128 keys
    a step."""

    kind: ClassVar[str] = "attention_wgmma_fwd"
    _align: ClassVar[int] = SWIZZLE_ATOM
    _fenced: ClassVar[bool] = True  # cp.async writes, wgmma reads through the async proxy

    def arch(self, target: Target) -> str:
        if target.arch not in ("sm_90", "sm_90a"):
            raise SpecError(f"attention_wgmma_fwd needs sm_90a (wgmma); the target is {target.arch}")
        return "sm_90a"

    def validate(self) -> None:
        super().validate()
        if self.warps not in (4, 8) or self.tile not in (64, 128) or self.head_dim not in (64, 128):
            raise SpecError("attention_wgmma_fwd: warps 4 or 8 (whole warpgroups), tile 64 or 128, head_dim 64 or 128")

    def _copy_rows(self, f: _Flash) -> Callable:
        return _ChunkedRows(f).copy

    def _start(self, f: _Flash) -> _Queries:
        b = f.b
        rows = b.add(f.smem, b.mul(b.shr(f.tid, 7), 64 * SWIZZLE_ROW))
        overwrite, accumulate = (b.setp("ne", b.mov(x, T.U32), 0) for x in (0, 1))
        return _Queries(rows, overwrite, accumulate)

    def _output(self, f: _Flash) -> Tiles:
        acc = [f.b.mov(0.0, T.F32) for _ in range(self.head_dim // 2)]
        return [acc[4 * j:4 * j + 4] for j in range(self.head_dim // 8)]

    def _scores(self, f: _Flash, q: _Queries, stage: Reg) -> Tiles:
        """S = Q K^T, both K-major from shared memory."""
        b, bits = f.b, descriptor_bits(False)
        acc = [b.reg(T.F32) for _ in range(self.tile // 2)]
        b.wgmma_fence()
        for kk in range(self.head_dim // 16):
            b.wgmma(acc, descriptor(b, b.add(q.rows, _k_major(kk, self.rows_per_block)), bits),
                    descriptor(b, b.add(stage, _k_major(kk, self.tile)), bits), self.dtype.value, self.tile,
                    q.accumulate if kk else q.overwrite)
        b.wgmma_commit()
        b.wgmma_wait(0)
        return [acc[4 * j:4 * j + 4] for j in range(self.tile // 8)]

    def _accumulate(self, f: _Flash, q: _Queries, o: Tiles, p: Tiles, values: Reg) -> None:
        """O += P V: P from registers, V MN-major (its 16 keys of step kk are 16 rows of 128 bytes further)."""
        b, bits = f.b, descriptor_bits(True, self.tile * SWIZZLE_ROW)
        frags = [f.p_fragment(p, kk) for kk in range(self.tile // 16)]
        acc = [r for tile in o for r in tile]
        b.wgmma_fence()
        for kk, frag in enumerate(frags):
            b.wgmma(acc, frag, descriptor(b, b.add(values, kk * 16 * SWIZZLE_ROW), bits), self.dtype.value,
                    self.head_dim, q.accumulate, (False, True))
        b.wgmma_commit()
        b.wgmma_wait(0)

    @classmethod
    def examples(cls) -> list["AttentionWgmmaSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128),
                cls(heads=4, kv_heads=4, head_dim=64, causal=False, dtype=MmaType.F16, warps=8, tile=128)]
