"""Causal GQA attention on Hopper's warpgroup MMA (``wgmma``, sm_90a): bf16/f16 in, fp32 math.

The tensor-core kernels (``attention_tc``: the same tensors, parameters, masking, softmax
statistics, outputs and numpy reference) with every product on wgmma instead of mma.sync. A block
is one or two warpgroups of 64 rows each (``warps`` 4 or 8). Tiles are stored as head_dim / 64
column chunks of [rows][128 bytes] in the 128-byte swizzle (16-byte chunk c of row r at c ^ (r %
8)), copied by cp.async, double-buffered, and fenced into the async proxy wgmma reads through.
Two kinds of product, each a committed group of wgmmas, waited for (``_wait``) as soon as the
forward and dQ kernels need it, and by the dK/dV kernel at the top of its next tile's step:

* rows x tile^T (``_products``): a warpgroup's 64 rows of the block's row tile times a tile of the
  other side, transposed, both K-major (their rows run along head_dim, the contraction) and read
  from shared memory through matrix descriptors: S = Q K^T and dP = dO V^T (forward, dQ), S^T = K
  Q^T and dP^T = V dO^T (dK/dV). The two of a step go in one group.
* accumulators x tile (``_accumulations``): a 64 x tile product's accumulators, repacked to 16-bit
  pairs, as A from registers (an m16n8 accumulator pair of each warp is its m16k16 A fragment, as
  for mma.sync), times a tile read MN-major (its rows are the contraction): O += P V, dQ += dS K,
  dV += P^T dO, dK += dS^T Q.

The backward keeps attention_tc's split, and so its determinism: the dQ kernel (also delta), then
the dK/dV kernel, whose block sums the query heads of its K/V head's group itself (no atomics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

from ..builder import KernelBuilder, Reg, T
from ..hw import CHUNK, SWIZZLE_ATOM, SWIZZLE_ROW, MmaType
from ..registry import register
from ..spec import SpecError, Target
from .attention_tc import Tiles, _BackwardKVBase, _BackwardQBase, _Flash, _ForwardBase, _KVStep
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


def _chunked_offset(b: KernelBuilder, row: Reg, chunk: Reg, rows: int) -> Reg:
    """Byte offset of 16-byte chunk ``chunk`` of row ``row`` in a chunked tile of ``rows`` rows."""
    column = b.mad(b.shr(chunk, 3), rows * SWIZZLE_ROW, b.mul(row, SWIZZLE_ROW))
    return b.add(column, b.shl(b.xor(b.and_(chunk, 7), b.and_(row, 7)), 4))


def _k_major(kk: int, rows: int) -> int:
    """Byte offset of k16 step ``kk`` of a K-major chunked tile of ``rows`` rows: 32 bytes along a
    row, the next column chunk every 4 steps."""
    return (kk // 4) * rows * SWIZZLE_ROW + (kk % 4) * 32


def _warpgroup_rows(f: _Flash, tile: Reg) -> Reg:
    """This warpgroup's 64 rows of the row tile at shared ``tile``."""
    b = f.b
    return b.add(tile, b.mul(b.shr(f.tid, 7), 64 * SWIZZLE_ROW))


class _Flags(NamedTuple):
    overwrite: Reg  # scale-d false: the first k16 step of a product
    accumulate: Reg


def _flags(b: KernelBuilder) -> _Flags:
    return _Flags(*(b.setp("ne", b.mov(x, T.U32), 0) for x in (0, 1)))


class _Wgmma:
    """What the wgmma attention kernels add to their tensor-core base (a mixin before it): sm_90a,
    whole warpgroups, the chunked swizzled tiles and the two products."""

    _align: ClassVar[int] = SWIZZLE_ATOM
    _fenced: ClassVar[bool] = True  # cp.async writes, wgmma reads through the async proxy
    _tiles: ClassVar[tuple[int, ...]] = (64, 128)  # the other side's rows a step

    def arch(self, target: Target) -> str:
        if target.arch not in ("sm_90", "sm_90a"):
            raise SpecError(f"{self.kind} needs sm_90a (wgmma); the target is {target.arch}")
        return "sm_90a"

    def validate(self) -> None:
        super().validate()
        if self.warps not in (4, 8) or self.tile not in self._tiles or self.head_dim not in (64, 128):
            *others, last = self._tiles
            raise SpecError(f"{self.kind}: warps 4 or 8 (whole warpgroups), tile {', '.join(map(str, others))} "
                            f"or {last}, head_dim 64 or 128")
        if self.team_threads % 128:
            raise SpecError(f"{self.kind}: a team is whole warpgroups, got {self.team_threads // 32} warps")

    def _copy_rows(self, f: _Flash) -> Callable:
        return _ChunkedRows(f).copy

    def _wait(self, f: _Flash, team: bool = False) -> None:
        f.b.wgmma_wait(0)
        if team and self.team_threads > 128:
            f.b.bar_sync(*f.barrier)

    def _products(self, f: _Flash, pairs: list[tuple[Reg, Reg]], flags: _Flags,
                  out: list[Tiles] | None = None) -> list[Tiles]:
        """For each (rows, stage): this warpgroup's 64 rows (at ``rows`` in the block's row tile)
        times the tile at ``stage``, transposed, into new accumulators (or ``out``'s); one group,
        issued, not waited for."""
        b, bits = f.b, descriptor_bits(False)
        accs = ([[b.reg(T.F32) for _ in range(self.tile // 2)] for _ in pairs] if out is None
                else [[r for tile in acc for r in tile] for acc in out])
        b.wgmma_fence()
        for acc, (rows, stage) in zip(accs, pairs):
            for kk in range(self.head_dim // 16):
                b.wgmma(acc, descriptor(b, b.add(rows, _k_major(kk, self.rows_per_block)), bits),
                        descriptor(b, b.add(stage, _k_major(kk, self.tile)), bits), self.dtype.value, self.tile,
                        flags.accumulate if kk else flags.overwrite)
        b.wgmma_commit()
        return [[acc[4 * j:4 * j + 4] for j in range(self.tile // 8)] for acc in accs]

    def _accumulations(self, f: _Flash, terms: list[tuple[Tiles, Tiles, Reg]], flags: _Flags) -> None:
        """For each (out, p, values): out (64 x head_dim) += P (64 x tile accumulators, rounded to 16
        bits) times the tile at ``values``, read MN-major (its 16 rows of step kk are 16 rows of 128
        bytes further); one group, issued, not waited for."""
        b, bits = f.b, descriptor_bits(True, self.tile * SWIZZLE_ROW)
        frags = [[f.p_fragment(p, kk) for kk in range(self.tile // 16)] for _, p, _ in terms]
        b.wgmma_fence()
        for (out, _, values), steps in zip(terms, frags):
            acc = [r for tile in out for r in tile]
            for kk, frag in enumerate(steps):
                b.wgmma(acc, frag, descriptor(b, b.add(values, kk * 16 * SWIZZLE_ROW), bits), self.dtype.value,
                        self.head_dim, flags.accumulate, (False, True))
        b.wgmma_commit()


class _Queries(NamedTuple):
    rows: Reg  # this warpgroup's 64 rows of the Q tile in shared memory
    flags: _Flags


@register
@dataclass(frozen=True)
class AttentionWgmmaSpec(_Wgmma, _ForwardBase):
    """The forward on wgmma; ``warps`` 4 or 8 (64 query rows a warpgroup), ``tile`` 64 or 128 keys
    a step: S = Q K^T, then O += P V with P from registers and V MN-major."""

    kind: ClassVar[str] = "attention_wgmma_fwd"

    def _start(self, f: _Flash) -> _Queries:
        return _Queries(_warpgroup_rows(f, f.smem), _flags(f.b))

    def _output(self, f: _Flash) -> Tiles:
        acc = [f.b.mov(0.0, T.F32) for _ in range(self.head_dim // 2)]
        return [acc[4 * j:4 * j + 4] for j in range(self.head_dim // 8)]

    def _scores(self, f: _Flash, q: _Queries, stage: Reg) -> Tiles:
        s = self._products(f, [(q.rows, stage)], q.flags)[0]
        self._wait(f)
        return s

    def _accumulate(self, f: _Flash, q: _Queries, o: Tiles, p: Tiles, values: Reg) -> None:
        self._accumulations(f, [(o, p, values)], q.flags)
        self._wait(f)

    @classmethod
    def examples(cls) -> list["AttentionWgmmaSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128),
                cls(heads=4, kv_heads=4, head_dim=64, causal=False, dtype=MmaType.F16, warps=8, tile=128)]


class _RowPair(NamedTuple):
    """This warpgroup's 64 rows of the block's two staged row tiles (Q and dO, or K and V)."""

    first: Reg
    second: Reg
    flags: _Flags


def _row_pair(f: _Flash, tile_bytes: int) -> _RowPair:
    rows = _warpgroup_rows(f, f.smem)
    return _RowPair(rows, f.b.add(rows, tile_bytes), _flags(f.b))


@register
@dataclass(frozen=True)
class AttentionWgmmaBackwardQSpec(_Wgmma, _BackwardQBase):
    """attention_tc_bwd_q on wgmma: per key tile, S = Q K^T and dP = dO V^T in one group, then
    dQ += dS K (dS from registers, K MN-major). ``tile`` 32, 64 or 128 keys a step."""

    kind: ClassVar[str] = "attention_wgmma_bwd_q"
    _tiles: ClassVar[tuple[int, ...]] = (32, 64, 128)

    def _start(self, f: _Flash, q_bytes: int) -> _RowPair:
        return _row_pair(f, q_bytes)

    def _tile_offset(self, f: _Flash) -> Callable[[Reg, Reg], Reg]:
        return lambda row, chunk: _chunked_offset(f.b, row, chunk, self.rows_per_block)

    def _gradient(self, f: _Flash, rows: _RowPair, dq: Tiles, stage: Reg,
                  mask: Callable[[Tiles], None], dscores: Callable[[Tiles, Tiles], Tiles]) -> None:
        values = f.b.add(stage, self.tile * self.head_dim * 2)
        s, dp = self._products(f, [(rows.first, stage), (rows.second, values)], rows.flags)
        self._wait(f)
        mask(s)
        self._accumulations(f, [(dq, dscores(s, dp), stage)], rows.flags)
        self._wait(f)

    @classmethod
    def examples(cls) -> list["AttentionWgmmaBackwardQSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128),
                cls(heads=4, kv_heads=4, head_dim=64, causal=False, dtype=MmaType.F16, warps=8, tile=32)]


@register
@dataclass(frozen=True)
class AttentionWgmmaBackwardKVSpec(_Wgmma, _BackwardKVBase):
    """attention_tc_bwd_kv on wgmma: per query tile, S^T = K Q^T and dP^T = V dO^T in one group, then
    dV += P^T dO and dK += dS^T Q in another (P^T, dS^T from registers; dO, Q MN-major), the next
    tile's first group issued right behind it, both waited for at the next tile's top. ``tile``
    32, 64 or 128 queries a step; each stage rounded up to the swizzle's 1024-byte alignment."""

    kind: ClassVar[str] = "attention_wgmma_bwd_kv"
    _tiles: ClassVar[tuple[int, ...]] = (32, 64, 128)

    def _stage_bytes(self) -> int:
        return -(-super()._stage_bytes() // SWIZZLE_ATOM) * SWIZZLE_ATOM

    def _start(self, f: _Flash, kv_bytes: int) -> _RowPair:
        return _row_pair(f, kv_bytes)

    def _grads(self, f: _Flash, stage: Reg) -> Reg:
        return f.b.add(stage, self.tile * self.head_dim * 2)  # dO, after Q

    def _scores(self, f: _Flash, rows: _RowPair, stage: Reg, out: list[Tiles] | None = None) -> list[Tiles]:
        return self._products(f, [(rows.first, stage), (rows.second, self._grads(f, stage))], rows.flags, out)

    def _gradient(self, f: _Flash, rows: _RowPair, dk: Tiles, dv: Tiles, scores: list[Tiles], stage: Reg,
                  step: _KVStep) -> None:
        st, dpt = scores
        step.mask(st)
        p = step.probabilities(st)
        grads = self._grads(f, stage)
        self._accumulations(f, [(dv, p, grads), (dk, step.dscores(p, dpt), stage)], rows.flags)

    @classmethod
    def examples(cls) -> list["AttentionWgmmaBackwardKVSpec"]:
        return [cls(heads=14, kv_heads=2, head_dim=64), cls(heads=14, kv_heads=2, head_dim=128, tile=32),
                cls(heads=4, kv_heads=4, head_dim=64, causal=False, dtype=MmaType.F16, warps=8, tile=32),
                cls(heads=14, kv_heads=2, head_dim=64, warps=8, teams=2, tile=64),
                cls(heads=14, kv_heads=2, head_dim=128, warps=8, teams=2, tile=32)]
