"""RoPE in the fused q/k/v projection's epilogue (gemm_wgmma's ``rope_heads``): the product's
[q | k | v] columns leave the accumulators as the attention reads them, q and k rotated, all three
in bf16, each into its own matrix, so the f32 [tokens, q + 2 kv] projection is never written nor
read back by the RoPE kernels and v's copy.

A pingpong warpgroup's 64-row half tile sits in its threads' accumulators in the m16n8 layout: a
lane holds columns 8 j + 2 quad + (0, 1) of every n8 tile j, in rows group and group + 8 of its
warp's 16. A head of ``head_dim`` columns starts on a tile boundary (the tile's width a multiple of
it), so the pair (i, i + head_dim / 2) that RoPE rotates together sits in one lane: tiles j and
j + head_dim / 16. Each lane reads its rows' (cos, sin) of its columns' i, 16 bytes for two i, from
the table ``rope.RopeTableSpec`` made once for every layer (the RoPE kernel's own arithmetic:
the same bits), and rotates its pairs (``rope.rotate``) on the f32 values the plain GEMM would
store (the product + bias): bit for bit what the RoPE kernel and the bf16 cast make of those.
q's, k's and v's widths are multiples of the tile's, so a tile is all one of them: its region
picks the destination, its rows' stride and whether the pairs leave rotated (a v tile's are
rotated too and the result dropped, a select: a branch of its own, or the bias added apart from
the rotation, left ptxas too few registers beside the accumulators and it spilled). Each pair
leaves as a 4-byte bf16x2 store to its row of its matrix (k and v: of the rows the caller points
at, a KV cache's from its cached length on).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..builder import Addr, KernelBuilder, Reg, T
from .rope import rotate, table_angles

if TYPE_CHECKING:
    from .gemm_wgmma import GemmWgmmaSpec
    from .tma_pipeline import TmaPipeline


class RopeStore:
    """The ``rope_heads`` epilogue of a pingpong warpgroup (see the module)."""

    def __init__(self, spec: "GemmWgmmaSpec", b: KernelBuilder, p: "TmaPipeline"):
        self.spec, self.b, self.m = spec, b, p.m

    def store(self, acc: list[Reg], row0: Reg, col0: Reg, warp: Reg, lane: Reg) -> None:
        """This warpgroup's 64 rows from ``row0`` (warp ``warp`` holding 16 of them) of the tile at
        ``col0``, their accumulators ``acc``."""
        spec, b = self.spec, self.b
        head_dim, half = spec.rope_head_dim, spec.rope_head_dim // 2
        q_width, kv_width = spec.rope_heads * head_dim, spec.rope_kv_heads * head_dim
        group, quad = b.shr(lane, 2), b.and_(lane, 3)
        bias = b.cvta_global(b.ld_param("bias")) if spec.bias else None

        def values(j: int, h: int) -> list[Reg]:  # the lane's pair of n8 tile j, row h, as the plain GEMM stores it
            pair = acc[4 * j + 2 * h:4 * j + 2 * h + 2]
            if bias is None:
                return pair
            at = Addr(b.add(bias, b.mul_wide(b.add(col0, b.add(b.shl(quad, 1), 8 * j)), 4)))
            return [b.add(x, y) for x, y in zip(pair, b.ld("global", T.F32, at, 2, nc=True))]

        # the tile's region (the addresses made here, from the parameters: nothing held across
        # tiles in the registers, which the accumulators all but fill)
        in_k, in_v = b.setp("ge", col0, q_width), b.setp("ge", col0, q_width + kv_width)
        rotates = b.setp("lt", col0, q_width + kv_width)
        matrix = b.selp(b.cvta_global(b.ld_param("values")), b.selp(b.cvta_global(b.ld_param("keys")),
                        b.cvta_global(b.ld_param("q")), in_k, T.U64), in_v, T.U64)
        first = b.selp(q_width + kv_width, b.selp(q_width, 0, in_k, T.U32), in_v, T.U32)
        width = b.selp(kv_width, q_width, in_k, T.U32)
        col = b.add(b.sub(col0, first), b.shl(quad, 1))  # the lane's first column in its matrix
        second = half // 8  # n8 tiles from a pair's first column to its second
        for h in range(2):  # the lane's two rows, one at a time (few registers beside the accumulators)
            row = b.add(row0, b.add(b.mad(warp, 16, group), 8 * h))
            ok = b.setp("lt", row, self.m)
            at = b.add(matrix, b.mul_wide(b.mad(row, width, col), 2))
            # the row's (cos, sin) of the lane's i in each n8 tile jj of a head's first half (volatile:
            # issued here, not hoisted by ptxas into registers the accumulators need)
            angles = table_angles(b, b.cvta_global(b.ld_param("rope_table")), row, quad, half, ok, volatile=True)
            for jj, cs in enumerate(angles):
                for head in range(spec.block_n // head_dim):
                    j = head * 2 * second + jj
                    x1s, x2s = values(j, h), values(j + second, h)
                    turned = [rotate(b, x1, x2, *cs[2 * e:2 * e + 2]) for e, (x1, x2) in enumerate(zip(x1s, x2s))]
                    for at_j, part, xs in ((j, 0, x1s), (j + second, 1, x2s)):
                        pair = [b.selp(t[part], x, rotates, T.F32) for t, x in zip(turned, xs)]
                        b.st("global", Addr(at, 16 * at_j), b.cvt_bf16x2(pair[1], pair[0]), t=T.B32, guard=ok)
