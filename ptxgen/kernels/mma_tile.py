"""Shared-memory tiles for the mma.sync kernels: 16-byte chunks, XOR swizzle, ldmatrix addressing.

A tile is rows of ``row_elems`` 16-bit elements; chunk c of row r is stored at chunk
c ^ ((r >> shift) & mask) (``swizzle``), so the eight rows one ldmatrix reads hit eight different
16-byte bank groups. An operand whose rows run along K (the mma's contraction) is read with
``ldmatrix``; one whose rows run along M or N with ``ldmatrix.trans``.
"""
from __future__ import annotations

from ..builder import KernelBuilder, Reg
from ..hw import CHUNK

ELEMS = CHUNK // 2  # 16-bit elements per chunk


def swizzle(chunks_per_row: int) -> tuple[int, int]:
    """(shift, mask): chunk c of row r is stored at c ^ ((r >> shift) & mask).

    Chosen so that any 8 consecutive rows put a given chunk in 8 different 16-byte bank groups
    (a 128-byte line holds 8 chunks): rows of 8+ chunks XOR with r & 7, of 4 with (r >> 1) & 3,
    of 2 with (r >> 2) & 1.
    """
    return {2: (2, 1), 4: (1, 3)}.get(chunks_per_row, (0, 7))


class SharedTile:
    """Byte offsets in a swizzled tile that starts ``base`` bytes into a stage."""

    def __init__(self, b: KernelBuilder, row_elems: int, k_contig: bool, base: int = 0):
        self.b, self.k_contig, self.base = b, k_contig, base
        self.row_bytes = row_elems * 2
        self.chunks = row_elems // ELEMS
        self.shift, self.mask = swizzle(self.chunks)

    def offset(self, row: Reg, chunk: Reg) -> Reg:
        """Where chunk ``chunk`` of row ``row`` is stored (without ``base``)."""
        b = self.b
        return b.mad(row, self.row_bytes, b.shl(b.xor(chunk, b.and_(b.shr(row, self.shift), self.mask)), 4))

    def lane_offsets(self, lane: Reg, outer_base: Reg, outer_bit: int, k_bit: int,
                     chunks: list[int]) -> dict[int, Reg]:
        """Per lane, for x4 ldmatrix: for each compile-time chunk offset c, the lane's byte offset
        in a stage at row offset 0 and chunk offset c (its chunk XOR its swizzle, shifted), so a
        fragment is one ``[stage + offset + row * row_bytes]``. ``outer_bit``/``k_bit``: which
        bit of the lane's matrix index (lane >> 3) steps 8 along the outer / the k dimension.
        Compile-time row offsets must be multiples of 8 and chunk offsets must not carry into
        the lane's own chunk bits (powers of two per warp tile), so the XOR splits."""
        b = self.b
        i, j = b.and_(lane, 7), b.shr(lane, 3)
        outer_step = b.and_(b.shr(j, outer_bit), 1)
        k_step = b.and_(b.shr(j, k_bit), 1)
        swz = b.and_(b.shr(i, self.shift), self.mask)  # depends on row bits below 8 only: i's
        if self.k_contig:  # rows are outer, chunks are k: row = outer_base + i + 8 * outer_step
            row = b.add(outer_base, b.add(i, b.shl(outer_step, 3)))
            lane_chunk = b.xor(k_step, swz)
        else:  # rows are k (i + 8 * k_step), chunks are outer: outer_base / 8 + outer_step
            row = b.add(i, b.shl(k_step, 3))
            lane_chunk = b.xor(b.add(b.shr(outer_base, 3), outer_step), swz)
        lane_row = b.mad(row, self.row_bytes, self.base)
        return {c: b.add(lane_row, b.shl(b.xor(lane_chunk, c), 4)) for c in chunks}

    def fragment(self, at: dict[int, Reg], row: int, chunk: int, out: list[Reg]) -> None:
        """ldmatrix.x4 at compile-time row / chunk offsets (``at``: the lane's stage addresses by chunk)."""
        self.b.ldmatrix(at[chunk], 4, trans=not self.k_contig, offset=row * self.row_bytes, out=out)
